"""Whole optimizer steps of batches prepared ahead by one background thread while the current step trains.

Building a step on the host (reading records, decoding and resizing images, tokenising, packing, collating) takes
tens of milliseconds per image; done between steps, the accelerator waits for it. :class:`PrefetchFeed` wraps the
trainer's feed (anything with ``next_step()`` and ``state_dict()``: ``train.steps.StepFeed``, or
``parallel.context.ContextParallelFeed`` around it) and keeps up to ``depth`` whole steps ready in a bounded queue,
built by one thread (PIL, numpy, torch and the fast tokenizer release the GIL for most of their work). It hands out
exactly the steps the wrapped feed would, in the same order: it only calls the feed earlier.

* **Position.** Each step travels with the feed's ``state_dict()`` taken just after that step was built, and
  :meth:`PrefetchFeed.state_dict` is the one of the last step *handed out*: a checkpoint never covers a step that
  was only prepared, so a resumed run reads those steps again. The same for the feed's ``summary()`` (the data's
  counts, when the feed has one): the run's ``data_summary.json`` counts what the steps trained on read.
* **Errors.** An exception in the thread (a bad record under ``data.on_bad_record=error``, an unreadable image, a
  bug) is queued in place of the step it interrupted: the ``next_step`` that would have received that step raises
  the same exception object, and so does every later call. The consumer never waits on a thread that is gone.
* **End.** :meth:`close` (or leaving a ``with`` block) stops the thread: it finishes at most the step it is
  building and ends; ``close`` waits up to ``join_timeout`` seconds for that, and the thread is a daemon, so it
  never keeps the process alive.
* :meth:`paused` holds the thread between two steps: for work on the main thread that shares objects with the
  data pipeline (the held-out evaluation uses the same processor and tokenizer).
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gemma3vl.errors import Gemma3VLError


@dataclass
class _Failed:
    error: BaseException


class PrefetchFeed:
    """``feed`` with up to ``depth`` steps built ahead by one thread (started here; see the module doc)."""

    def __init__(self, feed: Any, depth: int, *, join_timeout: float = 10.0, name: str = "gemma3vl-prefetch"):
        if depth < 1:
            raise Gemma3VLError(f"prefetch depth must be at least 1, got {depth}")
        self.feed = feed
        self.depth = depth
        self.join_timeout = join_timeout
        self._state = copy.deepcopy(feed.state_dict())  # the position before any step handed out
        self._summary = self._feed_summary()  # and the data's counts then
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._building = threading.Lock()  # held by the thread while it builds a step
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the thread
    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                with self._building:
                    if self._stop.is_set():
                        return
                    step = self.feed.next_step()
                    state = copy.deepcopy(self.feed.state_dict())
                    summary = self._feed_summary()
                self._queue.put((step, state, summary))  # blocks while `depth` steps wait; close() makes room
        except BaseException as error:  # handed to the consumer, whatever it is
            self._queue.put(_Failed(error))

    # ------------------------------------------------------------------ the consumer
    def next_step(self) -> list[Any]:
        if self._error is not None:
            raise self._error
        if self._stop.is_set():
            raise Gemma3VLError("the data prefetcher is closed")
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                # (never expected: the thread always queues a step or its error before it ends)
                if not self._thread.is_alive() and self._queue.empty():
                    raise Gemma3VLError("the data prefetch thread ended without handing on a step or an error")
        if isinstance(item, _Failed):
            self._error = item.error
            raise item.error
        step, self._state, self._summary = item
        return step

    def state_dict(self) -> dict[str, Any]:
        """The feed's position just after the last step handed out (never after one only prepared)."""
        return copy.deepcopy(self._state)

    def summary(self) -> Any:
        """The feed's ``summary()`` as it was just after the last step handed out (None: the feed has none)."""
        return copy.deepcopy(self._summary)

    def _feed_summary(self) -> Any:
        summary = getattr(self.feed, "summary", None)
        return None if summary is None else copy.deepcopy(summary())

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The thread builds nothing inside this block (it finishes the step it is building first)."""
        with self._building:
            yield

    def close(self) -> None:
        self._stop.set()
        while True:  # room for a blocked put, so the thread sees the stop
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(self.join_timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> "PrefetchFeed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
