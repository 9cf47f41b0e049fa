"""Batches straight from a :class:`ConversationDataset`, resumable to the sample.

Packed (``DataConfig.packing``): samples fill ``rows_per_batch`` rows of ``seq_length`` first-fit in order; the
first sample that fits in no row closes the batch and opens the next one. Padded: ``rows_per_batch`` samples,
one per row, padded to the longest. Either way :meth:`BatchLoader.state_dict` is the dataset's position just
after the last sample *in* the last batch handed out, so a sample read ahead (the one that closed the batch)
is read again after a resume instead of being lost.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from gemma3vl.data.batch import Batch, Sample
from gemma3vl.data.collate import collate_packed, collate_padded, place_first_fit
from gemma3vl.data.dataset import ConversationDataset
from gemma3vl.errors import Gemma3VLError


class BatchLoader:
    """Iterating gives one epoch of batches from the dataset's current position."""

    def __init__(self, dataset: ConversationDataset, rows_per_batch: int):
        if rows_per_batch < 1:
            raise Gemma3VLError(f"rows_per_batch must be at least 1, got {rows_per_batch}")
        self.dataset = dataset
        self.rows_per_batch = rows_per_batch
        self.packing = dataset.config.packing
        self.seq_length = dataset.config.seq_length
        self._state = dataset.state_dict()

    def __iter__(self) -> Iterator[Batch]:
        rows: list[list[Sample]] = []
        room: list[int] = []
        state_after_rows = self.dataset.state_dict()
        for sample in self.dataset:
            if not self._place(sample, rows, room):
                self._state = state_after_rows
                yield self._collate(rows)
                rows, room = [], []
                self._place(sample, rows, room)
            state_after_rows = self.dataset.state_dict()
        self._state = self.dataset.state_dict()  # the epoch is over: resume at the next one
        if rows:
            yield self._collate(rows)

    def _place(self, sample: Sample, rows: list[list[Sample]], room: list[int]) -> bool:
        """Put the sample in the batch being built; False when the batch is full."""
        if self.packing:
            return place_first_fit(sample, rows, room, self.seq_length, self.rows_per_batch)
        if len(rows) == self.rows_per_batch:
            return False
        rows.append([sample])
        return True

    def _collate(self, rows: list[list[Sample]]) -> Batch:
        encoder = self.dataset.encoder
        if self.packing:
            return collate_packed(rows, self.seq_length, encoder.pad_token_id, image_token_id=encoder.image_token_id)
        return collate_padded([row[0] for row in rows], encoder.pad_token_id, image_token_id=encoder.image_token_id)

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self._state = self.dataset.state_dict()
