"""Batching: padded and packed rows, targets that never cross conversations, and the packed-loss identity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemma3vl.data import IGNORE, ConversationEncoder, Sample, collate_packed, collate_padded, pack, parse_record
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.loading import load_model
from gemma3vl.tiny import tiny_hf_config
from gemma3vl.tiny_tokenizer import write_tokenizer_and_processor
from test_data_common import CONVERSATIONS, assistant, load_tiny_processor, user, write_pictures

IMAGE = 9  # the tiny tokenizer's <image_soft_token>


def toy(source: str, ids: list[int], trained: list[int]) -> Sample:
    """A sample whose labels are the ids at the positions in ``trained``."""
    input_ids = torch.tensor(ids)
    labels = torch.full_like(input_ids, IGNORE)
    labels[trained] = input_ids[trained]
    images = sum(1 for t, i in enumerate(ids) if i == IMAGE and (t == 0 or ids[t - 1] != IMAGE))
    pixels = torch.randn(images, 3, 4, 4) if images else None
    return Sample(input_ids, labels, pixels, source)


def test_pack_is_first_fit_in_order():
    lengths = [5, 7, 3, 6, 2, 4]
    samples = [toy(f"s{i}", [20] * n, []) for i, n in enumerate(lengths)]
    rows = pack(samples, 10)
    assert [[s.source for s in row] for row in rows] == [["s0", "s2", "s4"], ["s1"], ["s3", "s5"]]
    assert pack(samples, 10) == rows  # deterministic
    with pytest.raises(Gemma3VLError, match="s1: 7 tokens do not fit in seq_length 6"):
        pack(samples, 6)


def test_packed_rows_segments_positions_targets_and_images():
    a = toy("a", [2, 30, IMAGE, IMAGE, 31, 32, 33], [5, 6])
    b = toy("b", [2, 40, 41, 42], [2, 3])
    c = toy("c", [2, IMAGE, IMAGE, 50, IMAGE, IMAGE, 51], [6])
    batch = collate_packed([[a, b], [c]], 12, pad_token_id=0, image_token_id=IMAGE)
    assert batch.input_ids.tolist() == [
        [2, 30, 9, 9, 31, 32, 33, 2, 40, 41, 42, 0],
        [2, 9, 9, 50, 9, 9, 51, 0, 0, 0, 0, 0],
    ]
    assert batch.info.segment_ids.tolist() == [[1] * 7 + [2] * 4 + [0], [1] * 7 + [0] * 5]
    assert batch.info.positions.tolist() == [list(range(7)) + list(range(4)) + [0], list(range(7)) + [0] * 5]
    assert batch.info.image_block_ids.tolist() == [
        [-1, -1, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1],
        [-1, 0, 0, -1, 1, 1, -1, -1, -1, -1, -1, -1],
    ]
    n = IGNORE
    # targets[t] = labels[t + 1] inside a conversation; a conversation's last token predicts nothing
    assert batch.targets.tolist() == [
        [n, n, n, n, 32, 33, n, n, 41, 42, n, n],
        [n, n, n, n, n, 51, n, n, n, n, n, n],
    ]
    assert torch.equal(batch.pixel_values, torch.cat([a.pixel_values, c.pixel_values]))
    assert batch.sources == [["a", "b"], ["c"]]
    assert batch.num_tokens == 18 and batch.num_target_tokens == 5
    with pytest.raises(Gemma3VLError, match="image_token_id"):
        collate_packed([[a]], 12, pad_token_id=0)
    with pytest.raises(Gemma3VLError, match="row 0 holds 11 tokens"):
        collate_packed([[a, b]], 10, pad_token_id=0, image_token_id=IMAGE)


def test_padded_rows():
    a = toy("a", [2, 30, 31], [2])
    b = toy("b", [2, 40, 41, 42, 43], [3, 4])
    batch = collate_padded([a, b], pad_token_id=0)
    assert batch.input_ids.tolist() == [[2, 30, 31, 0, 0], [2, 40, 41, 42, 43]]
    assert batch.info.segment_ids.tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch.info.positions.tolist() == [[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]]
    assert batch.targets.tolist() == [[IGNORE, 31, IGNORE, IGNORE, IGNORE], [IGNORE, IGNORE, 42, 43, IGNORE]]
    assert batch.pixel_values is None
    assert collate_padded([a], pad_token_id=0, seq_length=8).input_ids.shape == (1, 8)


def test_packed_loss_is_the_token_weighted_mean_of_per_sample_losses(hf_checkpoint, tmp_path):
    """THE packing invariant, on a tiny random model: packing changes nothing but the batch layout."""
    directory, _ = hf_checkpoint()
    write_tokenizer_and_processor(directory, tiny_hf_config())
    model, _ = load_model(directory, device="cpu", dtype="float32")
    proc = load_tiny_processor(tmp_path / "tok")
    pictures = tmp_path / "pictures"
    write_pictures(pictures)
    encoder = ConversationEncoder(proc)
    conversations = list(CONVERSATIONS.values()) + [
        [user("What is it?", "b.png"), assistant("A blue square.")],
        [{"role": "user", "content": "Count from 1 to 9."}, assistant("1 2 3 4 5 6 7 8 9.")],
    ]
    samples = [encoder.encode(parse_record({"messages": m}, f"s{i}", pictures)) for i, m in enumerate(conversations)]
    seq_length = max(len(s) for s in samples) + 40
    rows = pack(samples, seq_length)
    assert any(len(row) > 1 for row in rows) and any(s.num_images for row in rows for s in row[1:])

    def loss_sum_and_count(batch):
        with torch.no_grad():
            logits = model(batch.input_ids, batch.pixel_values, info=batch.info)
        total = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return total, batch.num_target_tokens

    packed = collate_packed(rows, seq_length, proc.tokenizer.pad_token_id, image_token_id=proc.tokenizer.image_token_id)
    packed_sum, packed_count = loss_sum_and_count(packed)
    pad_id, image_id = proc.tokenizer.pad_token_id, proc.tokenizer.image_token_id
    singles = [loss_sum_and_count(collate_padded([s], pad_id, image_token_id=image_id)) for s in samples]
    count = sum(c for _, c in singles)
    assert packed_count == count
    reference = sum(total for total, _ in singles) / count
    assert abs(float(packed_sum / packed_count) - float(reference)) < 1e-5
    # and the padded layout of the same samples agrees too
    padded_sum, padded_count = loss_sum_and_count(
        collate_padded(samples, proc.tokenizer.pad_token_id, image_token_id=proc.tokenizer.image_token_id)
    )
    assert padded_count == count and abs(float(padded_sum / padded_count) - float(reference)) < 1e-5
