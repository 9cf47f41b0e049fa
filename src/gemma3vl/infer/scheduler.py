"""The thread that owns the model: requests join the running batch between decode steps (continuous batching).

HTTP handler threads only parse, fetch images and encode prompts; then they queue a :class:`Job` and read
its events. One scheduler thread runs a :class:`ContinuousBatcher`: between two decode steps it admits waiting
jobs into free slots (each prefilled on its own, then decoded with the others), and a job leaves its slot the
step it ends, so a short answer never waits for a long one and a new request never waits for a batch to drain.
Every row samples with its own settings and seeded generator, so greedy and sampled requests share a batch and
a seeded request gets the answer ``generate`` gives with that seed. When the engine is idle, the first job waits
``batch_wait_s`` from its arrival so that requests arriving together start together. At most ``max_waiting``
jobs wait for a slot; beyond that ``submit`` refuses (the server answers 429). Events go to each job's own
queue, so a slow client never stalls the batch.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from gemma3vl.infer.completion import Row
from gemma3vl.infer.conversation import EncodedPrompt
from gemma3vl.infer.engine import ContinuousBatcher
from gemma3vl.infer.generate import Sampling

_job_numbers = itertools.count()
SHUTTING_DOWN = "the server is shutting down"


class QueueFull(Exception):
    """``max_waiting`` jobs already wait for a slot."""


@dataclass(eq=False)  # identity, not field-by-field (tensors)
class Job:
    """One request for the scheduler. Its ``events`` queue yields ``("text", delta)`` items, then one
    ``("done", Completion)`` or ``("error", message)``."""

    prompt: EncodedPrompt
    sampling: Sampling
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    events: queue.Queue = field(default_factory=queue.Queue)
    queued_at: float = field(default_factory=time.monotonic)
    batch_size: int = 0  # the most rows it shared a decode step with, itself included (for the request log)
    number: int = field(default_factory=lambda: next(_job_numbers))
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Nobody waits for this answer any more (the client went away)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def row(self) -> Row:
        return Row(prompt=self.prompt, max_new_tokens=self.max_new_tokens, stop_strings=self.stop_strings,
                   on_text=lambda text: self.events.put(("text", text)),
                   on_finish=lambda completion: self.events.put(("done", completion)),
                   is_cancelled=lambda: self.cancelled)


class BatchScheduler:
    def __init__(self, runtime: Any, *, max_batch_size: int = 8, batch_wait_s: float = 0.005,
                 max_waiting: int | None = None, max_length: int | None = None, compile: bool = False):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_waiting = max_waiting
        # positions per row (prompt + answer); the engine's cache holds max_batch_size of them
        self.max_length = min(max_length or runtime.context_length, runtime.context_length)
        self.compile = compile
        self.engine: ContinuousBatcher | None = None
        self._pending: list[Job] = []
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.jobs_done = 0
        self.largest_batch = 0
        self.joined_running = 0  # jobs admitted while others were decoding
        self.compile_error: str | None = None

    def start(self) -> None:
        self.engine = ContinuousBatcher(self.runtime.model, self.runtime.tokenizer, slots=self.max_batch_size,
                                        max_length=self.max_length, compile=self.compile,
                                        decode_lock=self.runtime.lock, report=self._compile_failed)
        self._thread = threading.Thread(target=self._loop, name="gemma3vl-scheduler", daemon=True)
        self._thread.start()

    def _compile_failed(self, why: str) -> None:
        self.compile_error = why

    def submit(self, job: Job) -> Job:
        """Queue ``job`` (:class:`QueueFull` when ``max_waiting`` jobs already wait). A stopping scheduler answers
        the job with an error event."""
        with self._cond:
            if self._stopping:
                job.events.put(("error", SHUTTING_DOWN))
                return job
            if self.max_waiting is not None and len(self._pending) >= self.max_waiting:
                raise QueueFull(f"{len(self._pending)} requests are already waiting")
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"waiting": len(self._pending), "running": len(self._running), "steps": self.steps,
                    "requests_done": self.jobs_done, "largest_batch": self.largest_batch,
                    "joined_running": self.joined_running, "max_batch_size": self.max_batch_size}

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new jobs, end the running ones at the next step boundary (as cancelled), fail the waiting ones."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._cond:
            for job in self._pending:
                job.events.put(("error", SHUTTING_DOWN))
            self._pending.clear()

    # ------------------------------------------------------------------------------------------ the loop
    def _admissions(self, engine: ContinuousBatcher) -> list[Job] | None:
        """Wait for work; then the waiting jobs that fit in the free slots, oldest first (None when stopping)."""
        with self._cond:
            while not self._pending and not engine.active and not self._stopping:
                self._cond.wait()
            if not engine.active and self._pending:  # idle: let requests that arrive together start together
                deadline = self._pending[0].queued_at + self.batch_wait_s
                while not self._stopping and len(self._pending) < engine.free_slots:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            if self._stopping:
                return None
            taken = self._pending[: engine.free_slots]
            self._pending = self._pending[len(taken):]
            admitted = [job for job in taken if not job.cancelled]
            if engine.active:
                self.joined_running += len(admitted)
            self._running += admitted
            return admitted

    def _loop(self) -> None:
        engine = self.engine
        engine.warm_up()  # should compiling fail: serve eagerly, and say why in /health
        while True:
            admitted = self._admissions(engine)
            if admitted is None:
                break
            for job in admitted:
                try:
                    engine.add(job.row(), job.sampling, tag=job)
                except Exception as exc:  # a request that cannot run fails alone
                    self._fail([job], exc)
            if not engine.active:
                continue
            batch = engine.active
            for job in engine.tags():
                job.batch_size = max(job.batch_size, batch)
            try:
                ended = engine.step()
            except Exception as exc:  # a failed step fails the rows in it, not the server
                self._fail(engine.drop_all(), exc)
                ended = []
            with self._cond:
                self.steps += 1
                self.largest_batch = max(self.largest_batch, batch)
                self.jobs_done += len(ended)
                self._running = [job for job in self._running if job not in ended]
        for job in engine.cancel_all():  # stopping: each running job hears "cancelled"
            with self._cond:
                self._running = [other for other in self._running if other is not job]

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        message = f"generation failed: {type(exc).__name__}: {exc}"
        with self._cond:
            for job in jobs:
                job.events.put(("error", message))
            self._running = [job for job in self._running if job not in jobs]
