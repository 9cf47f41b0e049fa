"""Packing, truncation and batching, attacked end to end.

The oracle for the losses is transformers itself: each conversation run alone through
``Gemma3ForConditionalGeneration`` (sdpa, fp32, ``token_type_ids`` from the processor, so image blocks are
bidirectional as in training) on a tiny random model whose sliding window (8) is shorter than every conversation.
A packed row must give every conversation exactly those per-token losses.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from gemma3vl.data import (
    IGNORE,
    BadRecord,
    BatchLoader,
    ConversationDataset,
    ConversationEncoder,
    DataConfig,
    collate_packed,
    pack,
    parse_record,
)
from gemma3vl.data.collate import shifted_targets
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.loading import load_model
from gemma3vl.model.attention import dense_mask
from gemma3vl.tiny import tiny_hf_config
from gemma3vl.tiny_tokenizer import write_tokenizer_and_processor
from gemma3vl.train.steps import StepFeed
from test_data_common import (  # noqa: F401  (fixture)
    CONVERSATIONS,
    assistant,
    opened,
    processor,
    user,
    write_jsonl,
    write_pictures,
)


def oracle_inputs(proc, messages, directory):
    """transformers' processor output for the conversation (ids, pixels, token_type_ids)."""
    encoded = proc.apply_chat_template(opened(messages, directory), tokenize=True, return_dict=True,
                                       return_tensors="pt")
    return encoded


def test_packed_rows_give_each_conversation_its_own_per_token_losses_transformers_is_the_oracle(
    hf_checkpoint, processor, tmp_path
):
    """Several rows, first-fit placing later conversations (with images) in earlier rows, a truncated
    conversation, an empty reply, a row filled to exactly seq_length, padding: every token's loss equals
    transformers' on that conversation alone; targets never cross a boundary and padding is never one."""
    directory, reference = hf_checkpoint()
    assert reference.config.text_config.sliding_window == 8
    write_tokenizer_and_processor(directory, tiny_hf_config())
    model, _ = load_model(directory, device="cpu", dtype="float32")
    pictures = tmp_path / "pictures"
    write_pictures(pictures)
    long_turns = CONVERSATIONS["multi_turn_0_1_2"]
    conversations = [
        long_turns,  # truncated below to its first two pairs
        [user("Count from 1 to 9."), assistant("1 2 3 4 5 6 7 8 9.")],
        [user("Count from 1 to 20."), assistant(" ".join(str(i) for i in range(1, 21)) + ".")],
        CONVERSATIONS["system_one_image"],  # first fit: back into the row before the one above
        [user("What is it?", "b.png"), assistant("A blue square.")],
        CONVERSATIONS["text"],
        [user("Say nothing."), assistant("")],  # an empty reply: its only target is <end_of_turn>
        CONVERSATIONS["images_after_text"],
    ]
    full = ConversationEncoder(processor)
    whole = full.encode_whole(parse_record({"messages": long_turns}, "long", pictures))
    seq_length = whole.pair_ends[1]  # the long one keeps two pairs and fills its row exactly
    encoder = ConversationEncoder(processor, seq_length=seq_length)
    samples, oracles = [], []
    for index, messages in enumerate(conversations):
        sample, truncated = encoder.fit(full.encode_whole(parse_record({"messages": messages}, f"s{index}", pictures)))
        assert truncated == (index == 0)
        kept = messages[: 1 + 2 * 2] if index == 0 else messages  # system + two user/assistant pairs
        expected = oracle_inputs(processor, kept, pictures)
        assert sample.input_ids.tolist() == expected["input_ids"][0].tolist()
        assert "token_type_ids" in expected  # without them transformers' images would not be bidirectional
        samples.append(sample)
        oracles.append(expected)
    assert len(samples[0]) == seq_length
    rows = pack(samples, seq_length)
    order = [[int(s.source[1:]) for s in row] for row in rows]
    assert order[0] == [0] and len(rows) >= 3
    flat = [index for row in order for index in row]
    assert flat != sorted(flat)  # first fit put a later conversation into an earlier row
    assert any(samples[i].num_images for row in order for i in row[1:])  # images after a first conversation
    assert any(sum(len(samples[i]) for i in row) == seq_length for row in order[1:])  # a packed row exactly full
    pad_id, image_id = processor.tokenizer.pad_token_id, processor.tokenizer.image_token_id
    batch = collate_packed(rows, seq_length, pad_id, image_token_id=image_id)
    assert batch.info.positions.max() >= 8 < seq_length  # rows much longer than the window

    # The mask: nothing crosses a conversation, padding is never attended to.
    mask = dense_mask(batch.info, batch.info, window=None)[:, 0]
    segments = batch.info.segment_ids
    real = segments != 0
    crossing = (segments[:, :, None] != segments[:, None, :]) & real[:, :, None]
    assert not (mask & crossing).any()

    with torch.no_grad():
        logits = model(batch.input_ids, batch.pixel_values, info=batch.info)
    per_token = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE,
                                reduction="none").view(batch.targets.shape)
    with torch.no_grad():
        summed, count = model.loss(batch.input_ids, batch.targets, batch.info, batch.pixel_values)
    assert count == batch.num_target_tokens
    assert abs(float(summed) - float(per_token.sum())) < 1e-3

    total_targets = 0
    for r, row in enumerate(rows):
        offset = 0
        for sample in row:
            index = int(sample.source[1:])
            span = slice(offset, offset + len(sample))
            targets = batch.targets[r, span]
            assert targets.tolist() == shifted_targets(sample.labels).tolist()
            assert targets[-1] == IGNORE  # the next conversation's first token is never this one's target
            assert (targets != IGNORE).sum() >= 1
            inputs = {k: v for k, v in oracles[index].items() if k in ("input_ids", "attention_mask",
                                                                      "pixel_values", "token_type_ids")}
            with torch.no_grad():
                theirs = reference(**inputs).logits[0].float()
            expected = F.cross_entropy(theirs, targets, ignore_index=IGNORE, reduction="none")
            torch.testing.assert_close(per_token[r, span], expected, rtol=1e-4, atol=1e-5)
            with torch.no_grad():  # and transformers' own shifted loss on the conversation's labels
                hf_loss = reference(**inputs, labels=sample.labels[None]).loss
            ours = per_token[r, span].sum() / (targets != IGNORE).sum()
            assert abs(float(hf_loss) - float(ours)) < 1e-4
            total_targets += int((targets != IGNORE).sum())
            offset += len(sample)
        assert (batch.targets[r, offset:] == IGNORE).all() and (segments[r, offset:] == 0).all()
    assert total_targets == batch.num_target_tokens
    assert batch.num_tokens == sum(len(s) for s in samples) < batch.input_ids.numel()  # padding not counted


def good(i: int) -> dict:
    return {"messages": [user(f"What is {i}?" + " more" * (i % 6)), assistant(f"The answer is {i}.")]}


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("micro, per_step", [(1, 3), (3, 2)])
def test_steps_see_every_conversation_once_per_epoch_and_resume_exactly(processor, tmp_path, caplog, packing, micro,
                                                                        per_step):
    """Epochs wrap inside steps (the last micro-batch of an epoch may be short); each epoch holds every usable
    record exactly once; the order is fixed by the seed; a feed restored from any step's state gives exactly
    the following batches (ids included) and the same data summary."""
    records = [good(i) if i % 5 != 3 else "not json" for i in range(17)]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    usable = sorted(f"{path}:{i + 1}" for i, r in enumerate(records) if r != "not json")
    config = DataConfig(path, seq_length=48, seed=11, packing=packing)

    def feed():
        return StepFeed(BatchLoader(ConversationDataset(config, processor), micro), per_step)

    caplog.set_level(logging.ERROR, logger="gemma3vl.data")
    steps = 10
    reference = feed()
    batches = [reference.next_step() for _ in range(steps)]
    assert all(len(step) == per_step for step in batches)
    assert all(1 <= len(b.sources) <= micro for step in batches for b in step)
    stream = [s for step in batches for b in step for row in b.sources for s in row]
    epochs = [stream[i:i + len(usable)] for i in range(0, len(stream), len(usable))]
    assert len(epochs) >= 3
    for epoch in epochs[:-1]:
        assert sorted(epoch) == usable  # each once, none twice
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    again = feed()
    assert [[b.sources for b in again.next_step()] for _ in range(steps)] == [[b.sources for b in s] for s in batches]
    for stop in range(1, steps):
        run = feed()
        for _ in range(stop):
            run.next_step()
        state = json.loads(json.dumps(run.state_dict()))
        resumed = feed()
        resumed.load_state_dict(state)
        for expected in batches[stop:]:
            got = resumed.next_step()
            assert [b.sources for b in got] == [b.sources for b in expected]
            assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
                       for a, b in zip(got, expected))
        assert resumed.loader.dataset.summary().to_dict() == reference.loader.dataset.summary().to_dict()


def test_degenerate_conversations(processor, tmp_path, caplog):
    """An empty reply trains <end_of_turn> only; no assistant turn, or a first pair (prompt) over seq_length, is a
    counted bad record, never a row without targets; a conversation exactly seq_length long is kept whole;
    seq_length below one image block skips image records and keeps text ones."""
    write_pictures(tmp_path)
    empty_reply = [user("Say nothing."), assistant("")]
    records = [
        {"messages": empty_reply},
        {"messages": [{"role": "system", "content": "Be brief."}, user("Hi")]},
        {"messages": [user("word " * 60), assistant("y")]},
        {"messages": [user("Look.", "a.png"), assistant("Red.")]},
        {"messages": [user("Hi"), assistant(""), user("And?"), assistant("Yes.")]},
    ]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    encoder = ConversationEncoder(processor)
    lengths = [len(encoder.encode(parse_record(r, f"x:{i}", tmp_path))) if "messages" in r and
               r["messages"][-1]["role"] == "assistant" else None for i, r in enumerate(records)]
    image_length = lengths[3]
    first_pair = len(encoder.encode(parse_record({"messages": records[4]["messages"][:2]}, "x:5")))
    caplog.set_level(logging.ERROR, logger="gemma3vl.data")

    dataset = ConversationDataset(DataConfig(path, seq_length=image_length, shuffle=False), processor)
    samples = {s.source.rsplit(":", 1)[1]: s for s in dataset}
    assert sorted(samples) == ["1", "4", "5"]
    assert len(samples["4"]) == image_length  # exactly seq_length: kept whole, not truncated
    assert int((samples["1"].labels != IGNORE).sum()) == 1
    assert samples["1"].labels[samples["1"].labels != IGNORE].tolist() == [encoder.end_of_turn_id]
    summary = dataset.summary()
    assert dict(summary.skipped) == {"no_assistant_turn": 1, "too_long": 1}
    assert summary.truncated == 1 and len(samples["5"]) == first_pair  # record 5 keeps its first pair only
    rows = [[s] for s in samples.values()]
    batch = collate_packed(rows, image_length, processor.tokenizer.pad_token_id,
                           image_token_id=processor.tokenizer.image_token_id)
    assert ((batch.targets != IGNORE).sum(dim=1) >= 1).all()
    assert batch.num_tokens == sum(len(s) for s in samples.values())

    # seq_length below one image block: the image record cannot fit even its first pair, text ones can
    dataset = ConversationDataset(DataConfig(path, seq_length=first_pair, shuffle=False), processor)
    assert [s.source.rsplit(":", 1)[1] for s in dataset] == ["5"]
    assert dataset.summary().skipped["too_long"] == 3
    # and below every first pair (tiny: an image block is 4 soft tokens): a clear error, not an empty loader
    dataset = ConversationDataset(DataConfig(path, seq_length=processor.image_seq_length, shuffle=False), processor)
    with pytest.raises(Gemma3VLError, match="no usable record in a whole epoch.*too_long: 4"):
        list(dataset)
    # truncation keeps the first pair when only it fits: the empty reply, one target
    cut = ConversationEncoder(processor, seq_length=first_pair).encode(parse_record(records[4], "x:5"))
    assert len(cut) == first_pair and int((cut.labels != IGNORE).sum()) == 1
    with pytest.raises(BadRecord, match="first user\\+assistant pair"):
        ConversationEncoder(processor, seq_length=first_pair - 1).encode(parse_record(records[4], "x:5"))


def test_a_data_rank_whose_share_of_one_epoch_is_all_bad_moves_on(processor, tmp_path, caplog):
    """Under data parallelism a rank reads every other record of each epoch's order. An epoch in which its share
    happened to hold only bad records used to stop the whole run with "no usable record in a whole epoch", though
    the data set has usable records (the other rank's, and this rank's own in the next epoch). It moves on to the
    next epoch; a share that never holds a usable record is still a clear error naming the rank."""
    caplog.set_level(logging.ERROR, logger="gemma3vl.data")
    records = ["not json" if i % 2 == 0 else good(i) for i in range(6)]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    config = DataConfig(path, seed=22)  # epoch 0's order puts records 1, 3, 5 (0-based: 4, 0, 2) on rank 0
    dataset = ConversationDataset(config, processor).shard(0, 2)
    assert [i % 2 for i in dataset.order(0)[0::2]] == [0, 0, 0] and any(i % 2 for i in dataset.order(1)[0::2])
    feed = StepFeed(BatchLoader(dataset, 1), 2)
    step = feed.next_step()
    assert all(source.endswith((":2", ":4", ":6")) for b in step for row in b.sources for source in row)
    # in the middle of a run: seed 113 gives rank 0 record 1 (line 2) in epoch 0, nothing usable in epoch 1
    dataset = ConversationDataset(DataConfig(path, seed=113), processor).shard(0, 2)
    assert [sum(i % 2 for i in dataset.order(epoch)[0::2]) for epoch in range(3)] == [1, 0, 1]
    feed = StepFeed(BatchLoader(dataset, 1), 1)
    assert [feed.next_step()[0].sources for _ in range(2)] == [[[f"{path}:2"]], [[f"{path}:2"]]]
    assert dataset.epoch == 3  # (epoch 2 read to its end: record 1 was its last of rank 0)
    # file order: rank 0 holds only the bad lines 1, 3, 5 in every epoch
    fixed = StepFeed(BatchLoader(ConversationDataset(DataConfig(path, shuffle=False), processor).shard(0, 2), 1), 1)
    with pytest.raises(Gemma3VLError, match=r"data rank 0 of 2 read no usable record.*invalid_json: 6"):
        fixed.next_step()
    other = StepFeed(BatchLoader(ConversationDataset(DataConfig(path, shuffle=False), processor).shard(1, 2), 1), 1)
    assert other.next_step()[0].sources == [[f"{path}:2", f"{path}:4", f"{path}:6"]]
