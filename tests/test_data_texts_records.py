"""HuggingFaceM4/the_cauldron and HuggingFaceM4/FineVision records: ``{"images": [...], "texts": [{"user", "assistant",
...}]}``, read for training and evaluation as the equivalent LLaVA / messages records.

The oracle is the equivalent ``messages`` record, which the other data tests hold to transformers'
``apply_chat_template`` (and, where cheap, ``apply_chat_template`` itself).
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from gemma3vl.data import (BadRecord, ConversationDataset, ConversationEncoder, DataConfig, ImageRef, Turn,
                           parse_record)
from gemma3vl.errors import Gemma3VLError
from gemma3vl.evaluation.layouts import ExampleFile
from gemma3vl.pictures import draw_picture
from gemma3vl.train.config import build_config
import test_data_common
from test_data_common import opened, write_jsonl, write_pictures

processor = test_data_common.processor  # the tiny processor fixture (session-scoped)


def entry(question: str, answer: str, **extra) -> dict:
    return {"user": question, "assistant": answer, **extra}


def human(text: str) -> dict:
    return {"from": "human", "value": text}


def gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


def image_parts(*names: str) -> list[dict]:
    return [{"type": "image", "image": name} for name in names]


# (texts record, the same as LLaVA, the same as messages with the image parts first)
EQUIVALENT = {
    "one_entry_two_images": (
        {"images": ["a.png", "b.png"], "texts": [entry("Compare the two images.", "Red, then blue.", source="x")]},
        {"images": ["a.png", "b.png"], "conversations": [human("Compare the two images."), gpt("Red, then blue.")]},
        {"messages": [
            {"role": "user", "content": image_parts("a.png", "b.png") + [
                {"type": "text", "text": "Compare the two images."}]},
            {"role": "assistant", "content": "Red, then blue."}]},
    ),
    "three_entries": (
        {"images": ["a.png"], "texts": [entry("What is in this picture?", "A red circle.", source="vqa"),
                                        entry("What colour is it?", ""),  # an empty reply, as other formats allow
                                        entry("Sure?", "Yes, red.")]},
        {"image": "a.png", "conversations": [human("What is in this picture?"), gpt("A red circle."),
                                             human("What colour is it?"), gpt(""), human("Sure?"), gpt("Yes, red.")]},
        {"messages": [
            {"role": "user", "content": image_parts("a.png") + [{"type": "text", "text": "What is in this picture?"}]},
            {"role": "assistant", "content": "A red circle."},
            {"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": ""},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes, red."}]},
    ),
    "text_only": (
        {"images": [], "texts": [entry("Hello!", "Hi.")]},
        {"conversations": [human("Hello!"), gpt("Hi.")]},
        {"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}]},
    ),
}


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("name", sorted(EQUIVALENT))
def test_texts_records_parse_as_their_llava_and_messages_equivalents(name):
    texts, llava, messages = EQUIVALENT[name]
    turns = parse_record(texts, "r:1").turns
    assert turns == parse_record(llava, "r:1").turns
    assert turns == parse_record(messages, "r:1").turns
    assert parse_record(texts, "r:1", record_format="texts").turns == turns
    assert [turn.role for turn in turns] == ["user", "assistant"] * len(texts["texts"])
    if texts["images"]:  # without <image> markers the images open the first user turn, before its text
        assert turns[0].content[: len(texts["images"])] == [ImageRef(image) for image in texts["images"]]
        assert all(isinstance(turn.content, str) for turn in turns[1:])


def test_forced_formats_and_the_image_key():
    texts = {"image": "a.png", "texts": [entry("What?", "A circle.")]}
    assert parse_record(texts, "r:1").images == [ImageRef("a.png")]
    with pytest.raises(BadRecord, match="a texts record needs 'texts'"):
        parse_record(EQUIVALENT["text_only"][1], "r:1", record_format="texts")
    with pytest.raises(BadRecord, match="a LLaVA record needs 'conversations'"):
        parse_record(texts, "r:1", record_format="llava")
    with pytest.raises(Gemma3VLError, match="choose auto, messages, llava or texts"):
        parse_record(texts, "r:1", record_format="cauldron")


def test_a_null_key_beside_texts_is_a_key_the_record_lacks():
    """A table holding messages and texts rows side by side gives each row both columns, one null."""
    expected = parse_record({"texts": [entry("Hi", "Hello")]}, "r:1").turns
    for other in ("messages", "conversations"):
        assert parse_record({other: None, "texts": [entry("Hi", "Hello")]}, "r:1").turns == expected
    messages = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert parse_record({**messages, "texts": None}, "r:1").turns == expected
    llava = {"conversations": [human("Other"), gpt("Reply")]}
    with pytest.raises(BadRecord, match="the record has both 'messages' and 'conversations'") as refused:
        parse_record({**messages, **llava}, "r:1")  # never read as one, the other's turns left out
    assert refused.value.reason == "invalid_schema"


# ------------------------------------------------------------------------------------------------ markers
def test_image_markers_in_user_text_place_the_images():
    record = {"images": ["a.png", "b.png"], "texts": [entry("Compare <image> and <image>.", "Red, blue.")]}
    assert parse_record(record, "r:1").turns[0].content == [
        "Compare ", ImageRef("a.png"), " and ", ImageRef("b.png"), "."]
    across = {"images": ["a.png", "b.png"], "texts": [entry("<image>\nWhat is it?", "A circle."),
                                                      entry("And <image>?", "A square.")]}
    turns = parse_record(across, "r:1").turns
    assert turns[0].content == [ImageRef("a.png"), "\nWhat is it?"]
    assert turns[2].content == ["And ", ImageRef("b.png"), "?"]
    llava = {"images": ["a.png", "b.png"], "conversations": [human("<image>\nWhat is it?"), gpt("A circle."),
                                                             human("And <image>?"), gpt("A square.")]}
    assert turns == parse_record(llava, "r:1").turns


@pytest.mark.parametrize("record,words", [
    ({"images": ["a.png"], "texts": [entry("<image> and <image>?", "x")]}, "2 <image> marker(s) but 'image' names 1"),
    ({"images": ["a.png", "b.png"], "texts": [entry("<image>?", "x")]}, "1 <image> marker(s) but 'image' names 2"),
    ({"texts": [entry("<image>?", "x")]}, "1 <image> marker(s) but 'image' names 0"),
    ({"images": ["a.png"], "texts": [entry("q", "x"), entry("<image> and <image>?", "y")]}, "2 <image> marker(s)"),
])
def test_a_marker_count_that_does_not_match_is_an_image_count_mismatch(record, words):
    with pytest.raises(BadRecord) as caught:
        parse_record(record, "data.jsonl:4")
    assert caught.value.reason == "image_count_mismatch" and words in str(caught.value)


# ------------------------------------------------------------------------------------------------ bad records
GOOD_ENTRY = entry("Q?", "A.")
BAD = [  # (record, reason, words the message must contain)
    ({"texts": "Q? A."}, "invalid_schema", "'texts' must be a non-empty list, got a string"),
    ({"texts": {"user": "Q?", "assistant": "A."}}, "invalid_schema", "'texts' must be a non-empty list, got an object"),
    ({"texts": []}, "invalid_schema", "'texts' must be a non-empty list"),
    ({"texts": None}, "invalid_schema", "'texts' must be a non-empty list, got null"),
    ({"texts": [GOOD_ENTRY, "Q? A."]}, "invalid_schema", "texts[1] must be an object"),
    ({"texts": [GOOD_ENTRY, GOOD_ENTRY, {"user": "Q?"}]}, "invalid_schema", "texts[2] needs 'assistant'"),
    ({"texts": [{"assistant": "A."}]}, "invalid_schema", "texts[0] needs 'user'"),
    ({"texts": [GOOD_ENTRY, {"user": None, "assistant": "A."}]}, "invalid_schema",
     "texts[1].user must be a string, got null"),
    ({"texts": [{"user": 3, "assistant": "A."}]}, "invalid_schema", "texts[0].user must be a string, got int"),
    ({"texts": [{"user": "Q?", "assistant": None}]}, "invalid_schema", "texts[0].assistant must be a string, got null"),
    ({"texts": [{"user": "Q?", "assistant": ["A."]}]}, "invalid_schema",
     "texts[0].assistant must be a string, got a list"),
    ({"texts": [GOOD_ENTRY], "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]},
     "invalid_schema", "the record has both 'messages' and 'texts'"),
    ({"texts": [GOOD_ENTRY], "conversations": [human("Q?"), gpt("A.")]}, "invalid_schema",
     "the record has both 'conversations' and 'texts'"),
    ({"texts": [GOOD_ENTRY], "messages": [], "conversations": []}, "invalid_schema",
     "the record has 'messages', 'conversations' and 'texts'"),
    ({"images": ["a.png"], "text": "Q?"}, "invalid_schema",
     "a record needs 'messages' (or LLaVA 'conversations', or the_cauldron / FineVision 'texts'); "
     "its keys: images, text"),
    ({"image": "a.png", "images": ["b.png"], "texts": [GOOD_ENTRY]}, "invalid_schema", "both 'image' and 'images'"),
    ({"images": [7], "texts": [GOOD_ENTRY]}, "invalid_schema", "'images'[0] must be an image path"),
    ({"images": ["a.png"], "texts": [entry("Q?", "<image> A.")]}, "invalid_schema", "(assistant) holds an image"),
]


@pytest.mark.parametrize("record,reason,words", BAD)
def test_each_bad_shape_is_named(record, reason, words):
    with pytest.raises(BadRecord) as caught:
        parse_record(record, "data.jsonl:12")
    assert caught.value.reason == reason
    assert str(caught.value).startswith("data.jsonl:12: ")
    assert words in str(caught.value)


# ------------------------------------------------------------------------------------------------ token ids
@pytest.mark.parametrize("name", sorted(EQUIVALENT))
def test_texts_records_encode_as_their_messages_equivalents(processor, tmp_path, name):
    """The ids, labels and pixels of a texts record are those of the equivalent messages record; the other data tests
    hold messages records to transformers' apply_chat_template, so equality with it is the oracle (checked here
    directly too)."""
    write_pictures(tmp_path)
    texts, _, messages = EQUIVALENT[name]
    encoder = ConversationEncoder(processor)
    ours = encoder.encode(parse_record(texts, "r:1", tmp_path))
    reference = encoder.encode(parse_record(messages, "r:1", tmp_path))
    assert ours.input_ids.tolist() == reference.input_ids.tolist()
    assert ours.labels.tolist() == reference.labels.tolist()
    assert (ours.pixel_values is None) == (reference.pixel_values is None)
    if ours.pixel_values is not None:
        assert torch.equal(ours.pixel_values, reference.pixel_values)
    expected = processor.apply_chat_template(opened(messages["messages"], tmp_path), tokenize=True, return_dict=True)
    assert ours.input_ids.tolist() == expected["input_ids"][0]


def test_a_jsonl_of_texts_records_trains_as_messages(processor, tmp_path):
    write_pictures(tmp_path)
    names = sorted(EQUIVALENT)
    texts = write_jsonl(tmp_path / "cauldron.jsonl", [EQUIVALENT[name][0] for name in names])
    messages = write_jsonl(tmp_path / "messages.jsonl", [EQUIVALENT[name][2] for name in names])
    for data_format in ("auto", "texts"):
        ours = list(ConversationDataset(DataConfig(texts, format=data_format, shuffle=False, on_bad_record="error"),
                                        processor))
        reference = list(ConversationDataset(DataConfig(messages, shuffle=False, on_bad_record="error"), processor))
        assert [s.input_ids.tolist() for s in ours] == [s.input_ids.tolist() for s in reference]
        assert [s.labels.tolist() for s in ours] == [s.labels.tolist() for s in reference]
    # data.format=texts reads every record as texts: a messages record is then a bad record
    dataset = ConversationDataset(DataConfig(messages, format="texts", shuffle=False), processor)
    with pytest.raises(Gemma3VLError, match="no usable record"):
        list(dataset)


# ------------------------------------------------------------------------------------------------ parquet
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TEXTS = pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())]))


def png(kind: str) -> bytes:
    buffer = io.BytesIO()
    draw_picture(kind, size=(40, 32)).save(buffer, format="PNG")
    return buffer.getvalue()


def cauldron_rows() -> list[dict]:
    """Two rows as the_cauldron publishes them, with a FineVision-like extra column."""
    return [
        {"images": [{"bytes": png("red circle"), "path": None}, {"bytes": png("blue square"), "path": "b.png"}],
         "texts": [entry("Compare the two images.", "Red, then blue.", source="cauldron/x"),
                   entry("Which is round?", "The first.", source="cauldron/x")],
         "relevance_ratings": [5, 4]},
        {"images": [{"bytes": png("green triangle"), "path": None}],
         "texts": [entry("What shape is this?", "A triangle.", source=None)],
         "relevance_ratings": [3]},
    ]


def cauldron_messages(row: dict) -> list[dict]:
    """The row as transformers' chat messages, images opened from the bytes, all opening the first user turn."""
    pictures = [{"type": "image", "image": Image.open(io.BytesIO(image["bytes"]))} for image in row["images"]]
    out = []
    for index, item in enumerate(row["texts"]):
        content = pictures + [{"type": "text", "text": item["user"]}] if index == 0 else item["user"]
        out += [{"role": "user", "content": content}, {"role": "assistant", "content": item["assistant"]}]
    return out


def write_cauldron_parquet(path, rows, *, hf_features: bool):
    """The rows as the_cauldron's parquet files: an ``images`` list of Image structs and a ``texts`` list of structs.
    ``hf_features``: with the ``datasets`` feature metadata the hub's files carry (``images`` an ``Image`` list)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("images", pa.list_(IMAGE)), ("texts", TEXTS), ("relevance_ratings", pa.list_(pa.int64()))])
    table = pa.Table.from_pylist(rows, schema=schema)
    if hf_features:
        datasets = pytest.importorskip("datasets")
        features = datasets.Features({
            "images": datasets.List(datasets.Image()),
            "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                                    "source": datasets.Value("string")}),
            "relevance_ratings": datasets.List(datasets.Value("int64")),
        })
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features.to_dict()}})})
    pq.write_table(table, str(path))
    return path


@pytest.mark.parametrize("hf_features", [True, False])
def test_a_cauldron_parquet_file_trains_as_its_conversations(processor, tmp_path, monkeypatch, hf_features):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = cauldron_rows()
    path = write_cauldron_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", rows, hf_features=hf_features)
    for data_format in ("auto", "texts", "hf"):
        dataset = ConversationDataset(DataConfig(path, format=data_format, shuffle=False, on_bad_record="error"),
                                      processor)
        assert dataset.records.columns == {"images": "images", "texts": "texts"}  # relevance_ratings left out
        conversation = dataset.conversation(0)
        assert [turn.role for turn in conversation.turns] == ["user", "assistant"] * 2
        assert [type(part) for part in conversation.turns[0].content] == [ImageRef, ImageRef, str]
        assert conversation.turns[0].content[2] == "Compare the two images."
        assert conversation.turns[1:] == [Turn("assistant", "Red, then blue."), Turn("user", "Which is round?"),
                                          Turn("assistant", "The first.")]
        samples = list(dataset)
        assert [s.source for s in samples] == [f"{path}:row 0", f"{path}:row 1"]
        for sample, row in zip(samples, rows):
            expected = processor.apply_chat_template(cauldron_messages(row), tokenize=True, return_dict=True,
                                                     return_tensors="pt")
            assert sample.input_ids.tolist() == expected["input_ids"][0].tolist()
            assert torch.equal(sample.pixel_values, expected["pixel_values"])


def test_a_texts_column_of_another_name_is_mapped(processor, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    row = cauldron_rows()[1]
    table = pa.Table.from_pylist([{"pictures": row["images"], "dialog": row["texts"]}],
                                 schema=pa.schema([("pictures", pa.list_(IMAGE)), ("dialog", TEXTS)]))
    path = tmp_path / "renamed.parquet"
    pq.write_table(table, str(path))
    with pytest.raises(Gemma3VLError, match=r"no 'messages' or 'conversations' column \(nor the_cauldron / "
                                            r"FineVision 'texts'; columns: \['dialog', 'pictures'\]\)"):
        ConversationDataset(DataConfig(path), processor)
    columns = {"texts": "dialog", "images": "pictures"}
    (sample,) = list(ConversationDataset(DataConfig(path, columns=columns, on_bad_record="error"), processor))
    expected = processor.apply_chat_template(cauldron_messages(row), tokenize=True, return_dict=True)
    assert sample.input_ids.tolist() == expected["input_ids"][0]
    cfg = build_config("tiny_sft", None, ["data.columns=texts=dialog,images=pictures"])
    assert cfg.data.column_map() == columns


# ------------------------------------------------------------------------------------------------ evaluation
@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_eval_reads_cauldron_rows_as_conversations(tmp_path, kind):
    rows = cauldron_rows()
    if kind == "parquet":
        path = write_cauldron_parquet(tmp_path / "cauldron.parquet", rows, hf_features=True)
    else:
        write_pictures(tmp_path)
        lines = [{"images": ["a.png", "b.png"], "texts": rows[0]["texts"], "relevance_ratings": [5, 4]},
                 {"images": ["c.png"], "texts": rows[1]["texts"], "relevance_ratings": [3]}]
        path = write_jsonl(tmp_path / "cauldron.jsonl", lines)
    examples = ExampleFile(path)
    assert examples.layout == "conversation"
    assert ExampleFile(path, layout="conversation").layout == "conversation"
    example = examples.example(0)
    # the prompt is everything up to the last assistant turn, the target that turn
    assert [turn.role for turn in example.turns] == ["user", "assistant", "user"]
    assert example.target == "The first." and example.references == ["The first."]
    assert example.prompt_text == ("user: <image><image>Compare the two images.\nassistant: Red, then blue.\n"
                                   "user: Which is round?")
    assert len([part for part in example.turns[0].content if isinstance(part, ImageRef)]) == 2
    single = examples.example(1)
    assert single.target == "A triangle." and single.prompt_text == "<image>What shape is this?"
    assert [index for index, item in examples.iter_examples()] == [0, 1]
    assert all(not isinstance(item, BadRecord) for _, item in examples.iter_examples())


def test_the_conversation_layout_names_texts_among_its_columns(tmp_path):
    path = tmp_path / "odd.parquet"
    pq.write_table(pa.Table.from_pylist([{"picture": b"x", "text": "y"}]), str(path))
    with pytest.raises(Gemma3VLError, match=r"conversations \(messages, LLaVA conversations, or the_cauldron / "
                                            r"FineVision texts\)"):
        ExampleFile(path)
    with pytest.raises(Gemma3VLError, match=r"the conversation layout needs column\(s\) messages or conversations or "
                                            r"texts"):
        ExampleFile(path, layout="conversation")


# ------------------------------------------------------------------------------------------------ settings
def test_data_format_texts_is_a_setting():
    assert build_config("tiny_sft", None, ["data.format=texts"]).data.format == "texts"
    with pytest.raises(Gemma3VLError, match=r"data.format='bogus' is not one of auto, messages, llava, texts, hf"):
        build_config("tiny_sft", None, ["data.format=bogus"])
    assert DataConfig("x.jsonl", format="texts").record_format == "texts"
    with pytest.raises(Gemma3VLError, match="data format must be one of auto, messages, llava, texts, hf"):
        DataConfig("x.jsonl", format="bogus")
