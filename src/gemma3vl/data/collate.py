"""Samples -> model batches: one conversation per padded row, or several packed into each row.

Both layouts produce the same :class:`Batch`: ids, shifted targets that never cross a conversation boundary,
and the :class:`TokenInfo` mask description (positions restarting at 0 per conversation, segment ids 1, 2, 3, …
per conversation in a row with 0 for padding, image blocks numbered per row). The model computes exactly the
per-conversation logits either way, so the loss of a packed batch is the token-weighted mean of the
conversations' own losses.

Packing is first-fit in the given order: each sample goes into the first row with room, a new row is opened
when none has. It is deterministic and keeps the data order within rows, so a streaming loader packs as it reads and
resumes exactly; first-fit-decreasing would fill rows a little tighter but reorders the data by length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gemma3vl.data.batch import IGNORE, Batch, Sample
from gemma3vl.errors import Gemma3VLError
from gemma3vl.model.attention import TokenInfo, image_block_ids


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """``targets[t] = labels[t + 1]``; the last position has nothing to predict within its conversation."""
    targets = torch.full_like(labels, IGNORE)
    targets[:-1] = labels[1:]
    return targets


def pack(samples: Sequence[Sample], seq_length: int) -> list[list[Sample]]:
    """Group samples into rows of at most ``seq_length`` tokens, first-fit in order (see the module doc)."""
    rows: list[list[Sample]] = []
    room: list[int] = []
    for sample in samples:
        place_first_fit(sample, rows, room, seq_length)
    return rows


def place_first_fit(
    sample: Sample, rows: list[list[Sample]], room: list[int], seq_length: int, max_rows: int | None = None
) -> bool:
    """Append ``sample`` to the first row with room for it, else to a new row; False (nothing changed) when
    that would make more than ``max_rows`` rows. ``room[i]`` is the free length of ``rows[i]``, kept updated."""
    _check_fits(sample, seq_length)
    for index, free in enumerate(room):
        if len(sample) <= free:
            rows[index].append(sample)
            room[index] -= len(sample)
            return True
    if max_rows is not None and len(rows) >= max_rows:
        return False
    rows.append([sample])
    room.append(seq_length - len(sample))
    return True


def collate_padded(
    samples: Sequence[Sample], pad_token_id: int, seq_length: int | None = None, *, image_token_id: int | None = None
) -> Batch:
    """One conversation per row, right-padded to ``seq_length`` (default: the longest sample)."""
    if not samples:
        raise Gemma3VLError("cannot collate an empty list of samples")
    length = seq_length if seq_length is not None else max(len(s) for s in samples)
    return collate_packed([[s] for s in samples], length, pad_token_id, image_token_id=image_token_id)


def collate_packed(
    rows: Sequence[Sequence[Sample]], seq_length: int, pad_token_id: int, *, image_token_id: int | None = None
) -> Batch:
    """Rows of packed conversations -> one batch of ``[len(rows), seq_length]``.

    ``image_token_id`` (the ``<image_soft_token>`` id) is needed to number image blocks; it may be left out only
    when no sample has images.
    """
    if not rows or any(not row for row in rows):
        raise Gemma3VLError("cannot collate: every row needs at least one sample")
    shape = (len(rows), seq_length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    pixels: list[torch.Tensor] = []
    for r, row in enumerate(rows):
        used = sum(len(sample) for sample in row)
        if used > seq_length:
            raise Gemma3VLError(
                f"row {r} holds {used} tokens ({', '.join(s.source or '?' for s in row)}), over seq_length {seq_length}"
            )
        offset = 0
        for segment, sample in enumerate(row, start=1):
            span = slice(offset, offset + len(sample))
            input_ids[r, span] = sample.input_ids
            targets[r, span] = shifted_targets(sample.labels)
            positions[r, span] = torch.arange(len(sample))
            segment_ids[r, span] = segment
            offset += len(sample)
            if sample.pixel_values is not None:
                pixels.append(sample.pixel_values)
    if pixels and image_token_id is None:
        raise Gemma3VLError("the samples have images: pass image_token_id so image blocks can be numbered")
    blocks = image_block_ids(input_ids, image_token_id)
    blocks = torch.where(segment_ids == 0, torch.full_like(blocks, -1), blocks)
    return Batch(
        input_ids=input_ids,
        targets=targets,
        info=TokenInfo(positions=positions, segment_ids=segment_ids, image_block_ids=blocks),
        pixel_values=torch.cat(pixels) if pixels else None,
        sources=[[sample.source for sample in row] for row in rows],
    )


def _check_fits(sample: Sample, seq_length: int) -> None:
    if len(sample) > seq_length:
        name = sample.source or "a sample"
        raise Gemma3VLError(f"{name}: {len(sample)} tokens do not fit in seq_length {seq_length}")
    if len(sample) == 0:
        raise Gemma3VLError(f"{sample.source or 'a sample'}: has no tokens")
