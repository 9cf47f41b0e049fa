"""The dataset: bad records named and counted, seeded order, exact resumption, JSON arrays and HF datasets."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from gemma3vl.data import BadRecord, BatchLoader, ConversationDataset, DataConfig
from gemma3vl.errors import Gemma3VLError
from gemma3vl.pictures import draw_picture
from test_data_common import (  # noqa: F401  (fixture)
    CONVERSATIONS,
    PICTURES,
    assistant,
    opened,
    processor,
    user,
    write_jsonl,
    write_pictures,
)


def good(i: int) -> dict:
    return {"messages": [user(f"What is {i}?"), assistant(f"The answer is {i}.")]}


# (line content, reason) — each planted on its own line between good records
BAD_LINES = [
    ("{not json", "invalid_json"),
    ({"messages": [user(5), assistant("x")]}, "invalid_schema"),
    ({"messages": [{"role": "bot", "content": "x"}, assistant("x")]}, "unknown_role"),
    ({"messages": [user("x"), user("y"), assistant("z")]}, "role_order"),
    ({"messages": [user("x")]}, "no_assistant_turn"),
    ({"messages": [user("x"), assistant("y")], "images": ["a.png"]}, "image_count_mismatch"),
    ({"messages": [user("x", "missing.png"), assistant("y")]}, "unreadable_image"),
    ({"messages": [user("x", "broken.png"), assistant("y")]}, "unreadable_image"),
    ({"messages": [user("x", "../outside.png"), assistant("y")]}, "image_outside_dataset"),
    ({"messages": [user("x", "http://example.com/a.png"), assistant("y")]}, "remote_image_refused"),
    ({"messages": [user("x"), assistant("<end_of_turn> y")]}, "special_token_in_text"),
    ({"messages": [user("word " * 300), assistant("y")]}, "too_long"),
]


@pytest.fixture
def bad_file(tmp_path):
    data = tmp_path / "data"
    write_pictures(data)
    (data / "broken.png").write_bytes(b"not an image")
    draw_picture("black cross").save(tmp_path / "outside.png")
    lines, expected = [], {}
    for index, (bad, reason) in enumerate(BAD_LINES):
        lines.append(good(index))
        lines.append(bad)
        expected[len(lines)] = reason  # 1-based line number of the bad record
    lines.append("")  # a blank line is not a record
    lines.append(good(99))
    return write_jsonl(data / "train.jsonl", lines), expected


def test_bad_records_are_skipped_named_and_counted(processor, bad_file, caplog):
    path, expected = bad_file
    dataset = ConversationDataset(DataConfig(path, seq_length=200, shuffle=False), processor)
    with caplog.at_level(logging.WARNING, logger="gemma3vl.data"):
        samples = list(dataset)
    assert [s.source for s in samples] == [f"{path}:{line}" for line in range(1, 2 * len(BAD_LINES), 2)] + [
        f"{path}:{2 * len(BAD_LINES) + 2}"
    ]
    summary = dataset.summary()
    reasons = [reason for _, reason in BAD_LINES]
    assert dict(summary.skipped) == {reason: reasons.count(reason) for reason in set(reasons)}
    assert summary.records == 2 * len(BAD_LINES) + 1 and summary.samples == len(BAD_LINES) + 1
    for line in expected:
        assert any(f"{path}:{line}: " in message for message in caplog.messages), line
    text = str(summary)
    assert f"{len(BAD_LINES)} skipped" in text and "too_long: 1" in text and "unreadable_image: 2" in text


def test_bad_records_are_fatal_when_asked(processor, bad_file):
    path, expected = bad_file
    for line, reason in expected.items():
        bad_line = path.read_text().splitlines()[line - 1]
        single = write_jsonl(path.parent / "one.jsonl", [good(0)] * (line - 1) + [bad_line])
        # the single bad record sits on the same line number as in the big file
        dataset = ConversationDataset(
            DataConfig(single, seq_length=200, shuffle=False, on_bad_record="error"), processor
        )
        with pytest.raises(BadRecord) as caught:
            list(dataset)
        assert caught.value.reason == reason
        assert str(caught.value).startswith(f"{single}:{line}: ")


def test_truncated_samples_are_counted(processor, tmp_path):
    long = {"messages": [user("Hi"), assistant("Hello"), user("word " * 100), assistant("y")]}
    dataset = ConversationDataset(DataConfig(write_jsonl(tmp_path / "t.jsonl", [long]), seq_length=40), processor)
    (sample,) = list(dataset)
    assert len(sample) <= 40 and dataset.summary().truncated == 1


def test_an_epoch_without_usable_records_fails_clearly(processor, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ["nope", "{}"])
    with pytest.raises(Gemma3VLError, match="no usable record"):
        list(ConversationDataset(DataConfig(path), processor))


@pytest.mark.parametrize("text", ["", "\n \r\n\n", "\ufeff\n", "[]", "\ufeff[ ]\n"])
def test_a_file_without_records_is_refused_when_opened(processor, tmp_path, text):
    """An empty training file must be a clear error, not a loader that never yields a batch."""
    path = tmp_path / "empty.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(Gemma3VLError, match="empty.jsonl: the dataset holds no records"):
        ConversationDataset(DataConfig(path), processor)


def sources(samples):
    return [s.source for s in samples]


def test_shuffle_is_seeded_per_epoch(processor, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [good(i) for i in range(12)])
    dataset = ConversationDataset(DataConfig(path, seed=3), processor)
    epoch0, epoch1 = sources(dataset), sources(dataset)
    again = ConversationDataset(DataConfig(path, seed=3), processor)
    assert sources(again) == epoch0 and sources(again) == epoch1
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    assert sources(ConversationDataset(DataConfig(path, seed=4), processor)) != epoch0
    assert sources(ConversationDataset(DataConfig(path, shuffle=False), processor)) == [
        f"{path}:{i}" for i in range(1, 13)
    ]


def next_sample(dataset):
    """The next sample, crossing into the next epoch when the current one is exhausted."""
    for _ in range(2):
        for sample in dataset:
            return sample
    raise AssertionError("no sample in two epochs")


def test_resume_continues_with_the_exact_next_sample(processor, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [good(i) if i % 4 else "bad" for i in range(10)])
    config = DataConfig(path, seed=1)
    reference = ConversationDataset(config, processor)
    stream = [s for _ in range(3) for s in reference]  # three epochs
    for stop in (0, 1, 5, 8, 9, 13):  # including an epoch boundary
        run = ConversationDataset(config, processor)
        taken = []
        while len(taken) < stop:
            for sample in run:
                taken.append(sample)
                if len(taken) == stop:
                    break
        state = json.loads(json.dumps(run.state_dict()))  # it must survive a JSON round trip
        resumed = ConversationDataset(config, processor)
        resumed.load_state_dict(state)
        assert resumed.summary().records == run.summary().records
        following = next_sample(resumed)
        assert following.source == stream[stop].source and torch.equal(following.input_ids, stream[stop].input_ids)
    with pytest.raises(Gemma3VLError, match="cannot resume"):
        ConversationDataset(DataConfig(path, seed=2), processor).load_state_dict(state)


def test_batch_loader_resumes_exactly(processor, tmp_path):
    write_pictures(tmp_path)
    records = [{"messages": CONVERSATIONS[name]} for name in sorted(CONVERSATIONS)] * 3 + [good(i) for i in range(6)]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    config = DataConfig(path, seq_length=160, seed=5)
    reference = list(BatchLoader(ConversationDataset(config, processor), rows_per_batch=2))
    assert len(reference) >= 3
    assert sum(len(row) for batch in reference for row in batch.sources) == len(records)
    for stop in range(1, len(reference)):
        loader = BatchLoader(ConversationDataset(config, processor), rows_per_batch=2)
        iterator = iter(loader)
        for _ in range(stop):
            next(iterator)
        resumed = BatchLoader(ConversationDataset(config, processor), rows_per_batch=2)
        resumed.load_state_dict(loader.state_dict())
        rest = list(resumed)
        assert [b.sources for b in rest] == [b.sources for b in reference[stop:]]
        assert torch.equal(rest[0].input_ids, reference[stop].input_ids)
    padded = list(BatchLoader(ConversationDataset(DataConfig(path, packing=False, seed=5), processor), 4))
    assert [len(b.sources) for b in padded] == [4, 4, 4, 4, 2]
    assert all(len(row) == 1 for b in padded for row in b.sources)


def test_json_array_files_and_llava_records(processor, tmp_path):
    write_pictures(tmp_path)
    records = [
        {"id": 1, "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in this picture?"},
            {"from": "gpt", "value": "A red circle."}]},
        {"id": 2, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": 3, "conversations": [{"from": "human", "value": "Hi"}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records, indent=1))
    dataset = ConversationDataset(DataConfig(path, shuffle=False), processor)
    samples = list(dataset)
    text = path.read_text().splitlines()
    lines = [i + 1 for i, line in enumerate(text) if line == " {"]
    assert sources(samples) == [f"{path}:{lines[0]}", f"{path}:{lines[1]}"]
    assert dataset.summary().examples["no_assistant_turn"].startswith(f"{path}:{lines[2]}: ")
    expected = processor.apply_chat_template(
        opened([user("What is in this picture?", "a.png"), assistant("A red circle.")], tmp_path),
        tokenize=True, return_dict=True,
    )["input_ids"][0]
    assert samples[0].input_ids.tolist() == expected
    path.write_text('[{"conversations": []},\n {"x": 1}\n {"y": 2}]')
    with pytest.raises(Gemma3VLError, match=r"llava\.json:3: expected ',' or ']'"):
        ConversationDataset(DataConfig(path), processor)


def test_config_is_checked():
    for kwargs, words in (({"format": "csv"}, "format"), ({"truncation": "cut"}, "truncation"),
                          ({"on_bad_record": "warn"}, "on_bad_record"), ({"seq_length": 0}, "seq_length"),
                          ({"columns": {"messages": 3}}, "columns")):
        with pytest.raises(Gemma3VLError, match=words):
            DataConfig("x.jsonl", **kwargs)


def test_local_hf_datasets(processor, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    write_pictures(tmp_path)
    conversations = [CONVERSATIONS["system_one_image"], CONVERSATIONS["multi_turn_0_1_2"]]

    def without_paths(messages):  # TRL layout: image parts name no image, the images column holds them
        return [
            {"role": m["role"], "content": [
                {"type": p["type"], "text": p.get("text")} for p in m["content"]
            ] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]}
            for m in messages
        ]

    def image_names(messages):
        return [p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"]
                if p["type"] == "image"]

    table = datasets.Dataset.from_dict(
        {
            "chat": [without_paths(m) for m in conversations],
            "pictures": [[draw_picture(PICTURES[name]) for name in image_names(m)] for m in conversations],
        }
    ).cast_column("pictures", datasets.Sequence(datasets.Image()))
    (tmp_path / "saved").mkdir()
    table.save_to_disk(str(tmp_path / "saved"))
    table.to_parquet(str(tmp_path / "data.parquet"))
    columns = {"messages": "chat", "images": "pictures"}
    for path in (tmp_path / "saved", tmp_path / "data.parquet"):
        samples = list(ConversationDataset(DataConfig(path, shuffle=False, columns=columns), processor))
        assert sources(samples) == [f"{path}:row 0", f"{path}:row 1"]
        for sample, messages in zip(samples, conversations):
            content_lists = [
                {"role": m["role"], "content": m["content"] if isinstance(m["content"], list) else
                 [{"type": "text", "text": m["content"]}]} for m in messages
            ]
            expected = processor.apply_chat_template(
                _with_pictures(content_lists), tokenize=True, return_dict=True, return_tensors="pt"
            )
            assert sample.input_ids.tolist() == expected["input_ids"][0].tolist()
            assert torch.equal(sample.pixel_values, expected["pixel_values"])
    with pytest.raises(Gemma3VLError, match="no column"):
        ConversationDataset(DataConfig(tmp_path / "saved", columns={"messages": "nope"}), processor)
    with pytest.raises(Gemma3VLError, match="no 'messages' or 'conversations' column"):
        ConversationDataset(DataConfig(tmp_path / "saved"), processor)


def _with_pictures(messages):
    """Image parts (named a.png / b.png in CONVERSATIONS) replaced by the pictures the dataset holds."""
    return [
        {"role": m["role"], "content": [
            {"type": "image", "image": draw_picture(PICTURES[p["image"]])} if p["type"] == "image" else p
            for p in m["content"]
        ]}
        for m in messages
    ]


def test_sharegpt_spellings_encode_as_the_processor_renders_their_messages(processor, tmp_path):
    """ShareGPT role/content entries, user/assistant/model speakers and an empty "image" give exactly the ids
    transformers' apply_chat_template gives for the equivalent messages (they used to be bad records)."""
    write_pictures(tmp_path)
    records = [
        {"image": "a.png", "conversations": [{"role": "user", "content": "<image>\nWhat is in this picture?"},
                                             {"role": "assistant", "content": "A red circle."}]},
        {"image": ["a.png", "b.png"], "conversations": [
            {"from": "system", "value": "Be brief."}, {"from": "user", "value": "Compare <image> and <image>."},
            {"from": "model", "value": "Red, blue."}, {"from": "user", "value": "Sure?"},
            {"from": "assistant", "value": "Yes."}]},
        {"conversations": [user("What is in this picture?", "b.png"), {"role": "model", "content": "A square."}]},
        {"image": "", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"images": [], "messages": [user("Hi"), {"role": "model", "content": "Hello"}]},
    ]
    equivalent = [
        [user("What is in this picture?", "a.png"), assistant("A red circle.")],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image", "image": "a.png"},
                                      {"type": "text", "text": " and "}, {"type": "image", "image": "b.png"},
                                      {"type": "text", "text": "."}]},
         {"role": "model", "content": "Red, blue."}, {"role": "user", "content": "Sure?"}, assistant("Yes.")],
        [user("What is in this picture?", "b.png"), {"role": "model", "content": "A square."}],
        [{"role": "user", "content": "Hi"}, assistant("Hello")],
        [user("Hi"), assistant("Hello")],
    ]
    path = write_jsonl(tmp_path / "sharegpt.jsonl", records)
    dataset = ConversationDataset(DataConfig(path, shuffle=False, on_bad_record="error"), processor)
    samples = list(dataset)
    assert sources(samples) == [f"{path}:{line}" for line in range(1, len(records) + 1)]
    for sample, messages in zip(samples, equivalent):
        expected = processor.apply_chat_template(opened(messages, tmp_path), tokenize=True, return_dict=True,
                                                 return_tensors="pt")
        assert sample.input_ids.tolist() == expected["input_ids"][0].tolist(), messages
        if "pixel_values" in expected:
            assert torch.equal(sample.pixel_values, expected["pixel_values"])


def test_pretty_printed_jsonl_is_read_whole(processor, tmp_path):
    """`jq .` output or json.dump(indent=2) saved as .jsonl: every line used to be invalid_json and the run ended
    with "no usable record". It is read as the JSON objects it holds (each labelled with the line it starts on),
    and a syntax error in it is fatal and says what the file looks like."""
    write_pictures(tmp_path)
    records = [{"messages": CONVERSATIONS[name]} for name in ("text", "system_one_image")]
    path = tmp_path / "pretty.jsonl"
    path.write_text("\ufeff" + "\n".join(json.dumps(r, indent=2) for r in records) + "\n", encoding="utf-8")
    lines = [i + 1 for i, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines()) if line == "{"]
    samples = list(ConversationDataset(DataConfig(path, shuffle=False, on_bad_record="error"), processor))
    assert sources(samples) == [f"{path}:{line}" for line in lines]
    for sample, record in zip(samples, records):
        expected = processor.apply_chat_template(opened(record["messages"], tmp_path), tokenize=True,
                                                 return_dict=True)["input_ids"][0]
        assert sample.input_ids.tolist() == expected
    one = tmp_path / "one.json"  # a single pretty-printed object, whatever the file's name
    one.write_text(json.dumps(records[0], indent=4))
    assert sources(ConversationDataset(DataConfig(one), processor)) == [f"{one}:1"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(records[0], indent=2).replace('"Hello, world!"', '"Hello, world!",'))
    with pytest.raises(Gemma3VLError, match=r"broken\.jsonl:6: this file looks like pretty-printed JSON.*not valid"):
        ConversationDataset(DataConfig(broken), processor)
    # one multi-line record in the middle of a JSONL file: its lines are bad records that say why
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [good(0), json.dumps(good(1), indent=2), good(2)])
    dataset = ConversationDataset(DataConfig(mixed, shuffle=False), processor)
    assert sources(dataset) == [f"{mixed}:1", f"{mixed}:{len(mixed.read_text().splitlines())}"]
    assert "the line ends before its JSON value does" in dataset.summary().examples["invalid_json"]
    assert dataset.summary().examples["invalid_json"].startswith(f"{mixed}:2: ")


def test_text_after_a_json_array_is_refused(processor, tmp_path):
    """Two arrays in one file (concatenated exports) used to train on the first one only, the second dropped
    without a word; any text after the closing ']' is now an error naming its line."""
    path = tmp_path / "two.json"
    path.write_text(json.dumps([good(0), good(1)]) + "\n" + json.dumps([good(2)]) + "\n")
    with pytest.raises(Gemma3VLError, match=r"two\.json:2: text after the array's closing"):
        ConversationDataset(DataConfig(path), processor)
    path.write_text(json.dumps([good(0), good(1)], indent=1) + "\n\n")  # trailing space is fine
    assert len(ConversationDataset(DataConfig(path), processor)) == 2
    path.write_bytes(b"[" + json.dumps(good(0)).encode() + b",\n" + json.dumps(good(1)).encode().replace(b"1", b"\xe9")
                     + b"]")
    with pytest.raises(Gemma3VLError, match=r"two\.json:2: not UTF-8 text"):  # the line of the byte, not only its offset
        ConversationDataset(DataConfig(path), processor)


def _parquet(path, rows):
    """``rows`` (dicts) as a parquet file, the schema inferred from all of them (nulls where a row lacks a key)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_struct_array(pa.array(rows)), str(path))
    return path


def test_hf_rows_read_nulls_as_missing_keys(processor, tmp_path, monkeypatch):
    """A table holding both messages and LLaVA rows has a null 'messages' in the LLaVA rows (and null fields in
    structs): those rows used to be invalid_schema bad records ("'messages' must be a non-empty list, got null")."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    write_pictures(tmp_path)
    rows = [
        {"messages": [user("What is in this picture?", "a.png"), {"role": "assistant", "content": [
            {"type": "text", "text": "A red circle."}]}]},
        {"image": "b.png", "conversations": [{"from": "human", "value": "<image>\nAnd this?"},
                                             {"from": "gpt", "value": "A square."}]},
        {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    table = _parquet(tmp_path / "mixed.parquet", rows)
    lines = write_jsonl(tmp_path / "mixed.jsonl", rows)
    from_table = list(ConversationDataset(DataConfig(table, shuffle=False, on_bad_record="error"), processor))
    from_lines = list(ConversationDataset(DataConfig(lines, shuffle=False, on_bad_record="error"), processor))
    assert sources(from_table) == [f"{table}:row {i}" for i in range(3)]
    assert [s.input_ids.tolist() for s in from_table] == [s.input_ids.tolist() for s in from_lines]
    assert all(torch.equal(a.pixel_values, b.pixel_values) for a, b in zip(from_table[:2], from_lines[:2]))


def test_hf_image_columns_are_opened_under_the_data_settings(processor, tmp_path, monkeypatch):
    """datasets decoded an Image column itself: a corrupt picture ended the run with PIL's traceback, the pixel
    limit was checked only after the whole picture was decoded, and a path outside the dataset (or a URL) was
    opened (fetched) whatever data.allow_outside_paths / allow_remote_images said. The pictures are now read
    undecoded and opened as those of JSON records are."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    import pyarrow.parquet as pq

    write_pictures(tmp_path / "data")
    draw_picture("black cross").save(tmp_path / "outside.png")
    png = (tmp_path / "data" / "a.png").read_bytes()
    pictures = [{"bytes": png, "path": None}, {"bytes": b"not a picture", "path": None},
                {"bytes": png[:150], "path": None}, {"bytes": None, "path": str(tmp_path / "outside.png")},
                {"bytes": None, "path": "http://127.0.0.1:9/remote.png"}]
    messages = [[{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": f"Q{i}?"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "A."}]}] for i in range(len(pictures))]
    features = datasets.Dataset.from_dict({"messages": messages}).features
    features["images"] = datasets.List(datasets.Image())
    table = datasets.Dataset.from_dict({"messages": messages, "images": [[p] for p in pictures]}, features=features)
    path = tmp_path / "data" / "pictures.parquet"
    pq.write_table(table.data.table, str(path))  # (to_parquet would look the URL up)

    def read(**settings):
        dataset = ConversationDataset(DataConfig(path, shuffle=False, **settings), processor)
        return sources(dataset), dataset.summary()

    kept, summary = read()
    assert kept == [f"{path}:row 0"]
    assert dict(summary.skipped) == {"unreadable_image": 2, "image_outside_dataset": 1, "remote_image_refused": 1}
    assert summary.examples["unreadable_image"].startswith(f"{path}:row 1: ")
    assert read(allow_outside_paths=True)[0] == [f"{path}:row 0", f"{path}:row 3"]
    with pytest.raises(BadRecord, match=r"row 0: .*96x64 = 6144 pixels is over the limit of 1000"):
        list(ConversationDataset(DataConfig(path, shuffle=False, max_image_pixels=1000, on_bad_record="error"),
                                 processor))


def test_data_directories(processor, tmp_path, monkeypatch):
    """A data directory's files are read by their kind, never as an image folder because pictures beside them
    outnumber them (that ended in "no 'messages' column (columns: ['image'])"); its JSONL files are each read as one
    file is: bad lines skipped and named by file and line (datasets' JSON reader made a bad line fatal, naming
    nothing), image paths relative to the file, the split told by the files' names."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    tables = tmp_path / "tables"
    write_pictures(tables / "images")
    answer = {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}
    rows = [{"messages": [user("What is in this picture?", "images/a.png"), answer]},
            {"messages": [user("What is 1?"), answer]}]
    _parquet(tables / "conversations.parquet", rows)
    assert sources(ConversationDataset(DataConfig(tables, shuffle=False), processor)) == [
        f"{tables / 'conversations.parquet'}:row 0", f"{tables / 'conversations.parquet'}:row 1"]
    # shards: each row named by its own file and row (it was a row of the whole directory, and a test split's rows
    # had the train rows' labels)
    shards = tmp_path / "shards"
    write_pictures(shards / "images")
    _parquet(shards / "train-00000-of-00002.parquet", rows)
    _parquet(shards / "train-00001-of-00002.parquet", rows[:1])
    _parquet(shards / "test-00000-of-00001.parquet", rows[1:])
    assert sources(ConversationDataset(DataConfig(shards, shuffle=False), processor)) == [
        f"{shards / 'train-00000-of-00002.parquet'}:row 0", f"{shards / 'train-00000-of-00002.parquet'}:row 1",
        f"{shards / 'train-00001-of-00002.parquet'}:row 0"]
    assert sources(ConversationDataset(DataConfig(shards, shuffle=False, split="test"), processor)) == [
        f"{shards / 'test-00000-of-00001.parquet'}:row 0"]

    lines = tmp_path / "lines"
    write_pictures(lines / "part")
    first = write_jsonl(lines / "train-00000-of-00002.jsonl", [good(0), "{broken", good(2)])
    second = write_jsonl(lines / "part" / "train-00001-of-00002.jsonl",
                         [{"messages": [user("What is in this picture?", "b.png"), assistant("A square.")]},
                          {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}])
    test = write_jsonl(lines / "test-00000-of-00001.jsonl", [good(7)])
    dataset = ConversationDataset(DataConfig(lines, shuffle=False), processor)
    assert sources(dataset) == [f"{second}:1", f"{second}:2", f"{first}:1", f"{first}:3"]  # in path order
    assert dataset.summary().examples["invalid_json"].startswith(f"{first}:2: ")
    assert sources(ConversationDataset(DataConfig(lines, shuffle=False, split="test"), processor)) == [f"{test}:1"]
    with pytest.raises(Gemma3VLError, match=r"no split 'validation' \(splits: \['test', 'train'\]\)"):
        ConversationDataset(DataConfig(lines, split="validation"), processor)


def test_a_split_is_not_chosen_from_a_source_without_splits(processor, tmp_path):
    """A single parquet file or a ``save_to_disk`` Dataset has no splits: ``data.eval_split=test`` on it (the
    training file given as held-out data) read the same rows, so the held-out loss was the training loss. A split
    other than ``train`` is refused there, unless the file's own name or folder gives it."""
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "Hi"},
                                                       {"role": "assistant", "content": "Hello"}]]})
    table.to_parquet(str(tmp_path / "data.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "test").mkdir()
    table.to_parquet(str(tmp_path / "test" / "0000.parquet"))
    table.to_parquet(str(tmp_path / "test-00000-of-00001.parquet"))
    for path in (tmp_path / "data.parquet", tmp_path / "saved"):
        assert len(list(ConversationDataset(DataConfig(path, shuffle=False), processor))) == 1  # train: read whole
        with pytest.raises(Gemma3VLError, match=r"read whole: it has no split 'test' to choose"):
            ConversationDataset(DataConfig(path, split="test"), processor)
    for path in (tmp_path / "test" / "0000.parquet", tmp_path / "test-00000-of-00001.parquet"):
        assert len(list(ConversationDataset(DataConfig(path, shuffle=False, split="test"), processor))) == 1
