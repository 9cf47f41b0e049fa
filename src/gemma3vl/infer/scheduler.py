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

A job asking for ``n`` choices (OpenAI's ``n``) is ``n`` rows of the engine (added one after another, they share
one prefill: ``ContinuousBatcher.add``), each its own sample (a seeded job's choice ``i`` draws with
``derived_seed(seed, i)``). Its rows take free slots as they come, oldest job first, so a job may start with
some of its rows and the rest join as slots free; it counts as one waiting job until its last row has a slot.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from gemma3vl.infer.completion import Row
from gemma3vl.infer.conversation import EncodedPrompt
from gemma3vl.infer.engine import ContinuousBatcher
from gemma3vl.infer.generate import Sampling
from gemma3vl.infer.sampling import derived_seed

_job_numbers = itertools.count()
SHUTTING_DOWN = "the server is shutting down"


class QueueFull(Exception):
    """``max_waiting`` jobs already wait for a slot."""


@dataclass(eq=False)  # identity, not field-by-field (tensors)
class Job:
    """One request for the scheduler: ``n`` choices of one prompt. Its ``events`` queue yields, per choice
    ``index``, ``("text", index, (delta, logprobs))`` items then one ``("done", index, Completion)``; or, for the
    whole job, ``("error", message)``."""

    prompt: EncodedPrompt
    sampling: Sampling
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    n: int = 1  # choices, each its own row and sample
    logprobs: int | None = None  # per token its logprob and this many alternatives' (None: no logprobs)
    events: queue.Queue = field(default_factory=queue.Queue)
    queued_at: float = field(default_factory=time.monotonic)
    batch_size: int = 0  # the most rows it shared a decode step with, itself included (for the request log)
    number: int = field(default_factory=lambda: next(_job_numbers))
    admitted: int = 0  # choices given a slot so far (the scheduler's count)
    ended: int = 0  # choices whose rows have ended (the scheduler's count)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Nobody waits for this answer any more (the client went away)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def row(self, index: int = 0) -> Row:
        """Choice ``index``'s row."""
        return Row(prompt=self.prompt, max_new_tokens=self.max_new_tokens, stop_strings=self.stop_strings,
                   logprobs=self.logprobs,
                   on_delta=lambda text, logprobs: self.events.put(("text", index, (text, logprobs))),
                   on_finish=lambda completion: self.events.put(("done", index, completion)),
                   is_cancelled=lambda: self.cancelled)

    def choice_sampling(self, index: int) -> Sampling:
        """Choice ``index``'s sampling: the job's, with a seed of its own when the job is seeded."""
        if self.sampling.seed is None:
            return self.sampling
        return replace(self.sampling, seed=derived_seed(self.sampling.seed, index))


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
    def _waiting_rows(self) -> int:
        return sum(job.n - job.admitted for job in self._pending)

    def _admissions(self, engine: ContinuousBatcher) -> list[tuple[Job, int]] | None:
        """Wait for work; then the waiting rows (job, choice) that fit in the free slots, oldest job first (None
        when stopping)."""
        with self._cond:
            while not self._pending and not engine.active and not self._stopping:
                self._cond.wait()
            if not engine.active and self._pending:  # idle: let requests that arrive together start together
                deadline = self._pending[0].queued_at + self.batch_wait_s
                while not self._stopping and self._waiting_rows() < engine.free_slots:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            if self._stopping:
                return None
            admitted: list[tuple[Job, int]] = []
            free = engine.free_slots
            while self._pending and free:
                job = self._pending[0]
                if job.cancelled:  # nobody waits for the rest of it
                    self._pending.pop(0)
                    self._retire(job)
                    continue
                count = min(free, job.n - job.admitted)
                admitted += [(job, job.admitted + i) for i in range(count)]
                job.admitted += count
                free -= count
                if job.admitted == job.n:
                    self._pending.pop(0)
                if job not in self._running:
                    self._running.append(job)
            if engine.active:
                self.joined_running += len(admitted)
            return admitted

    def _retire(self, job: Job) -> None:
        """Forget ``job`` once none of its rows runs or waits any more (under ``_cond``)."""
        if job.ended == job.admitted and job not in self._pending and job in self._running:
            self._running.remove(job)
            self.jobs_done += 1

    def _loop(self) -> None:
        engine = self.engine
        engine.warm_up()  # should compiling fail: serve eagerly, and say why in /health
        while True:
            admitted = self._admissions(engine)
            if admitted is None:
                break
            for job, index in admitted:
                try:
                    engine.add(job.row(index), job.choice_sampling(index), tag=(job, index))
                except Exception as exc:  # a request that cannot run fails alone
                    self._fail([job], exc)
            if not engine.active:
                continue
            batch = engine.active
            for job, _ in engine.tags():
                job.batch_size = max(job.batch_size, batch)
            try:
                ended = engine.step()
            except Exception as exc:  # a failed step fails the rows in it, not the server
                self._fail(_jobs(engine.drop_all()), exc)
                ended = []
            with self._cond:
                self.steps += 1
                self.largest_batch = max(self.largest_batch, batch)
                for job, _ in ended:
                    job.ended += 1
                    self._retire(job)
        stopped = _jobs(engine.cancel_all())  # stopping: each running row hears "cancelled"
        with self._cond:
            self._running = [job for job in self._running if job not in stopped]

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        """Tell ``jobs`` why they failed and forget them (rows of theirs still running end as cancelled once the
        server has stopped waiting for them)."""
        message = f"generation failed: {type(exc).__name__}: {exc}"
        with self._cond:
            for job in jobs:
                job.events.put(("error", message))
            self._running = [job for job in self._running if job not in jobs]
            self._pending = [job for job in self._pending if job not in jobs]


def _jobs(tags: list[tuple[Job, int]]) -> list[Job]:
    """The jobs of the engine rows tagged ``(job, choice)``, each once."""
    return list(dict.fromkeys(job for job, _ in tags))
