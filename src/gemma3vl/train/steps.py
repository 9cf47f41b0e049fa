"""The micro-batches of each optimizer step, from a resumable batch loader, across epochs.

The loader (``gemma3vl.data.loader.BatchLoader``) gives micro-batches of ``train.micro_batch_size`` rows
and a position that always points just after the last conversation handed out; one optimizer step takes
``global_batch_size / micro_batch_size`` of them, so a run resumed from a checkpoint sees exactly the
batches an uninterrupted run would.
"""

from __future__ import annotations

from typing import Any, Iterator

from gemma3vl.data.batch import Batch
from gemma3vl.data.loader import BatchLoader
from gemma3vl.errors import Gemma3VLError


class StepFeed:
    def __init__(self, loader: BatchLoader, micro_batches_per_step: int):
        self.loader = loader
        self.micro_batches_per_step = micro_batches_per_step
        self._batches: Iterator[Batch] = iter(loader)

    def _next_batch(self) -> Batch:
        for _ in range(2):  # the end of an epoch: start the next one
            try:
                return next(self._batches)
            except StopIteration:
                self._batches = iter(self.loader)
        raise Gemma3VLError(f"{self.loader.dataset.config.path}: this process read no batch in a whole epoch "
                            "(fewer records than data-parallel ranks?)")

    def next_step(self) -> list[Batch]:
        return [self._next_batch() for _ in range(self.micro_batches_per_step)]

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._batches = iter(self.loader)
