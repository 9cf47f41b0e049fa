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
        self._start_epoch()

    def _start_epoch(self) -> None:
        """Iterate the loader from the dataset's position; ``_whole`` is whether that is an epoch's beginning."""
        self._whole = self.loader.dataset.position == 0
        self._batches: Iterator[Batch] = iter(self.loader)

    def _next_batch(self) -> Batch:
        # The end of an epoch: start the next one. Under data parallelism a rank's share of one epoch may hold
        # no usable record (the dataset moves on to the next); two such whole epochs in a row stop the run.
        empty = 0
        while True:
            try:
                batch = next(self._batches)
                self._whole = False
                return batch
            except StopIteration:
                empty += int(self._whole)
                self._start_epoch()
                if empty == 2:
                    break
        dataset = self.loader.dataset
        who = f"data rank {dataset.rank} of {dataset.num_ranks}" if dataset.num_ranks > 1 else "this process"
        raise Gemma3VLError(f"{dataset.config.path}: {who} read no usable record in two epochs in a row (fewer "
                            f"records than data-parallel ranks, or only bad ones in its share?); {dataset.summary()}")

    def next_step(self) -> list[Batch]:
        return [self._next_batch() for _ in range(self.micro_batches_per_step)]

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def summary(self) -> Any:
        """The dataset's counts so far (records read, samples, skipped ...): ``data.DataSummary``."""
        return self.loader.dataset.summary()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._start_epoch()
