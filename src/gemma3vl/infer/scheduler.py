"""The thread that owns the model: queued requests are run together in batches between generate calls.

HTTP handler threads only parse, fetch images and encode prompts; then they queue a :class:`Job` and read
its events. One scheduler thread takes the oldest waiting job plus up to ``max_batch_size - 1`` others that
can share a batch with it (same sampling settings, because ``generate`` samples every row the same way),
after waiting ``batch_wait_s`` from the oldest job's arrival so that requests arriving together run
together. Jobs that arrive while a batch runs join the next one (dynamic batching between ``generate``
calls; the engine cannot add rows to a running batch). Events go to each job's own queue, so a slow
client never stalls the batch.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Hashable

from gemma3vl.infer.completion import Row
from gemma3vl.infer.conversation import EncodedPrompt
from gemma3vl.infer.generate import Sampling

_job_numbers = itertools.count()


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
    batch_size: int = 0  # rows in the batch it ran in (for the request log)
    number: int = field(default_factory=lambda: next(_job_numbers))
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Nobody waits for this answer any more (the client went away)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def batch_key(self) -> Hashable:
        """Jobs with equal keys can share a batch. A seeded sampled job runs alone: its seed then gives the
        same answer as ``generate`` with that seed, whatever else is queued."""
        s = self.sampling
        if s.greedy:
            return ("greedy", s.stop_token_ids)
        if s.seed is not None:
            return ("seeded", self.number)
        return ("sample", s.temperature, s.top_k, s.top_p, s.stop_token_ids)


class BatchScheduler:
    def __init__(self, runtime: Any, *, max_batch_size: int = 8, batch_wait_s: float = 0.005):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._pending: list[Job] = []
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.jobs_done = 0
        self.largest_batch = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gemma3vl-scheduler", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stopping:
                job.events.put(("error", "the server is shutting down"))
                return job
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"waiting": len(self._pending), "running": len(self._running), "batches": self.batches,
                    "requests_done": self.jobs_done, "largest_batch": self.largest_batch,
                    "max_batch_size": self.max_batch_size}

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new jobs, end the running batch at its next step, fail the waiting ones."""
        with self._cond:
            self._stopping = True
            for job in self._running:
                job.cancel()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._cond:
            for job in self._pending:
                job.events.put(("error", "the server is shutting down"))
            self._pending.clear()

    def _take_batch(self) -> list[Job] | None:
        """Wait for work, then the oldest job and the compatible ones (None when stopping)."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            key = self._pending[0].batch_key()
            deadline = self._pending[0].queued_at + self.batch_wait_s
            while not self._stopping:
                compatible = [job for job in self._pending if job.batch_key() == key]
                remaining = deadline - time.monotonic()
                if len(compatible) >= self.max_batch_size or remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._stopping:
                return None
            batch = [job for job in self._pending if job.batch_key() == key][: self.max_batch_size]
            self._pending = [job for job in self._pending if job not in batch]
            batch = [job for job in batch if not job.cancelled]
            self._running = batch
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)
            with self._cond:
                self._running = []

    def _run(self, batch: list[Job]) -> None:
        rows = [
            Row(prompt=job.prompt, max_new_tokens=job.max_new_tokens, stop_strings=job.stop_strings,
                on_text=lambda text, job=job: job.events.put(("text", text)),
                on_finish=lambda completion, job=job: job.events.put(("done", completion)),
                is_cancelled=lambda job=job: job.cancelled)
            for job in batch
        ]
        for job in batch:
            job.batch_size = len(batch)
        with self._cond:
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
        try:
            self.runtime.complete(rows, batch[0].sampling)  # each job hears "done" when its own row ends
        except Exception as exc:  # a failed batch must not take the server down; every job hears why
            for job in batch:
                job.events.put(("error", f"generation failed: {type(exc).__name__}: {exc}"))
            return
        with self._cond:
            self.jobs_done += len(batch)
