"""The record parser: every schema fault is a BadRecord with its reason and source, never another exception."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma3vl.data import BadRecord, ConversationEncoder, ImageRef, parse_record
from gemma3vl.data.records import parse_json_line
from gemma3vl.errors import Gemma3VLError
from test_data_common import processor  # noqa: F401  (fixture)

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


BAD = [  # (record, reason, words the message must contain)
    ([], "invalid_schema", "JSON object"),
    ({"text": "hi"}, "invalid_schema", "'messages'"),
    ({"messages": []}, "invalid_schema", "non-empty list"),
    ({"messages": "hi"}, "invalid_schema", "non-empty list"),
    ({"messages": [user("Hi"), "Hello"]}, "invalid_schema", "messages[1] must be an object"),
    ({"messages": [{"role": "user"}, assistant("x")]}, "invalid_schema", "needs 'role' and 'content'"),
    ({"messages": [user(3), assistant("x")]}, "invalid_schema", "string or a list"),
    ({"messages": [user([{"type": "text", "text": 1}]), assistant("x")]}, "invalid_schema", "'text' is"),
    ({"messages": [user([{"type": "video"}]), assistant("x")]}, "invalid_schema", "'video'"),
    ({"messages": [user([{"type": "image", "image": 5}]), assistant("x")]}, "invalid_schema", "path or URL"),
    ({"messages": [user([{"type": "text", "content": "x"}]), assistant("x")]}, "invalid_schema", "keys: content, type"),
    ({"messages": [user([{"type": "image_url", "image_url": {}}]), assistant("x")]}, "invalid_schema",
     "'image_url.url' must be a path or URL"),
    ({"messages": [user([{"type": "image_url"}]), assistant("x")], "images": ["a.png"]}, "invalid_schema",
     "'image_url' must be a path or URL"),
    ({"messages": [{"role": "bot", "content": "x"}, assistant("x")]}, "unknown_role", "'bot'"),
    ({"messages": [{"role": ["user"], "content": "x"}, assistant("x")]}, "unknown_role", "role"),
    ({"messages": [assistant("x"), user("y")]}, "role_order", "alternate"),
    ({"messages": [user("x"), user("y"), assistant("z")]}, "role_order", "alternate"),
    ({"messages": [user("x"), {"role": "system", "content": "s"}, assistant("z")]}, "role_order", "alternate"),
    ({"messages": [user("x"), assistant("y"), user("z")]}, "role_order", "ends with a user turn"),
    ({"messages": [user("x")]}, "no_assistant_turn", "no assistant turn"),
    ({"messages": [{"role": "system", "content": "s"}]}, "no_assistant_turn", "no assistant turn"),
    ({"messages": [{"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                   user("x"), assistant("y")]}, "invalid_schema", "system message"),
    ({"messages": [user("x"), assistant([{"type": "image", "image": "a.png"}])]}, "invalid_schema", "assistant"),
    ({"messages": [user([{"type": "image"}]), assistant("y")]}, "image_count_mismatch", "no 'images' list"),
    ({"messages": [user([{"type": "image"}]), assistant("y")], "images": ["a.png", "b.png"]},
     "image_count_mismatch", "1 image part(s) but 'images' holds 2"),
    # the key the record used; a LLaVA marker in a messages record is named as such
    ({"messages": [user("<image>\nWhat?"), assistant("y")], "image": "a.png", "images": []},
     "image_count_mismatch", "0 image part(s) but 'image' holds 1; an '<image>' marker in the text places an image "
                             "only in a LLaVA 'conversations' record"),
    ({"messages": [user([{"type": "image"}, {"type": "image", "image": "a.png"}]), assistant("y")],
      "images": ["b.png"]}, "image_count_mismatch", "all name their image"),
    ({"conversations": "x"}, "invalid_schema", "'conversations'"),
    ({"conversations": [{"from": "human"}]}, "invalid_schema", "'from' and 'value'"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown_role", "'robot'"),
    ({"conversations": [{"from": "human", "value": 3}]}, "invalid_schema", "value must be a string"),
    ({"image": "a.png",
      "conversations": [{"from": "human", "value": "<image><image>x"}, {"from": "gpt", "value": "y"}]},
     "image_count_mismatch", "2 <image> marker(s)"),
    ({"conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]},
     "image_count_mismatch", "1 <image> marker(s) but 'image' names 0"),
    ({"image": 7, "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
     "invalid_schema", "'image'[0]"),
]


@pytest.mark.parametrize("record,reason,words", BAD)
def test_each_schema_fault_is_named(record, reason, words):
    with pytest.raises(BadRecord) as caught:
        parse_record(record, "data.jsonl:12")
    assert caught.value.reason == reason
    assert str(caught.value).startswith("data.jsonl:12: ")
    assert words in str(caught.value)


def test_bad_json_is_a_bad_record():
    for text in ("{", "not json", '{"a": 1} x', "1" * 5000, "[" * 100000):
        with pytest.raises(BadRecord) as caught:
            parse_json_line(text, "f.jsonl:3")
        assert caught.value.reason == "invalid_json" and str(caught.value).startswith("f.jsonl:3: ")


def test_shared_images_fill_image_parts_in_order():
    record = {
        "messages": [user([{"type": "image"}, {"type": "text", "text": "x"}, {"type": "image", "image": None}]),
                     assistant("y")],
        "images": ["a.png", "data:image/png;base64,AAAA"],
    }
    conversation = parse_record(record, "r:1")
    assert conversation.images == [ImageRef("a.png"), ImageRef("data:image/png;base64,AAAA")]


def test_image_parts_in_transformers_and_openai_spellings():
    """transformers' chat format names an image part's source "image", "url" or "path"; OpenAI's is an
    "image_url" part. All are the same image part (not a part with no image, nor an unknown type)."""
    text = {"type": "text", "text": "What is it?"}
    expected = parse_record({"messages": [user([{"type": "image", "image": "a.png"}, text]), assistant("y")]}, "r:1")
    for part in ({"type": "image", "url": "a.png"}, {"type": "image", "path": "a.png"},
                 {"type": "image", "image": None, "url": "a.png"},
                 {"type": "image_url", "image_url": {"url": "a.png"}}, {"type": "image_url", "image_url": "a.png"}):
        conversation = parse_record({"messages": [user([part, text]), assistant("y")]}, "r:1")
        assert conversation.turns == expected.turns, part


def test_images_under_either_top_level_key_are_used_never_dropped():
    """LLaMA-Factory's ShareGPT records keep LLaVA's images under "images"; HF datasets often have one "image"
    column beside "messages". Either key supplies the images (they used to be dropped without a word, or
    refused as a count mismatch); both at once is refused."""
    llava = {"images": ["a.png"], "conversations": [{"from": "human", "value": "What is it?"},
                                                    {"from": "gpt", "value": "A cat."}]}
    assert parse_record(llava, "r:1").turns[0].content == [ImageRef("a.png"), "What is it?"]
    marked = {**llava, "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "y"}]}
    assert parse_record(marked, "r:1").images == [ImageRef("a.png")]
    messages = {"image": "a.png", "messages": [user([{"type": "image"}, {"type": "text", "text": "x"}]), assistant("y")]}
    assert parse_record(messages, "r:1").images == [ImageRef("a.png")]
    unused = {"image": "a.png", "messages": [user("x"), assistant("y")]}
    for record in (unused, {**llava, "image": "b.png"}):
        with pytest.raises(BadRecord):
            parse_record(record, "r:1")


def test_llava_without_markers_puts_images_first_in_the_first_human_turn():
    record = {"image": ["a.png", "b.png"], "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Compare them."}, {"from": "gpt", "value": "Same."}]}
    turns = parse_record(record, "r:1").turns
    assert [t.role for t in turns] == ["system", "user", "assistant"]
    assert turns[1].content == [ImageRef("a.png"), ImageRef("b.png"), "Compare them."]


def test_formats_can_be_forced():
    llava = {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}
    assert parse_record(llava, "r:1", record_format="llava").turns[1].role == "assistant"
    with pytest.raises(BadRecord):
        parse_record(llava, "r:1", record_format="messages")
    with pytest.raises(BadRecord):
        parse_record(GOOD, "r:1", record_format="llava")


# Random JSON-like values, biased towards the schema's own keys and values so the parser gets deep.
KEYS = st.sampled_from(
    ["messages", "role", "content", "type", "text", "image", "images", "conversations", "from", "value", "x"]
)
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8),
    st.sampled_from(["user", "assistant", "system", "human", "gpt", "text", "image", "<image>", "a.png",
                     "Hi <image> there", "data:image/png;base64,AAAA"]),
)
JSONISH = st.recursive(
    LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSONISH)
def test_random_records_raise_only_gemma3vl_errors(record):
    try:
        conversation = parse_record(record, "r:1")
    except Gemma3VLError:
        return
    roles = [turn.role for turn in conversation.turns]
    body = roles[1:] if roles[0] == "system" else roles
    assert body and body == ["user", "assistant"] * (len(body) // 2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12)), min_size=1, max_size=3))
def test_random_text_conversations_encode_or_raise_bad_record(processor, pairs):
    messages = [m for u, a in pairs for m in (user(u), assistant(a))]
    try:
        sample = ConversationEncoder(processor).encode(parse_record({"messages": messages}, "r:1"))
    except BadRecord as bad:
        assert bad.reason == "special_token_in_text"
        return
    assert len(sample.labels) == len(sample.input_ids)


@given(st.text(max_size=40))
def test_random_lines_raise_only_bad_records(text):
    try:
        parse_record(parse_json_line(text, "f:1"), "f:1")
    except Gemma3VLError as error:
        assert str(error).startswith("f:1: ")


def test_sharegpt_role_content_entries_and_gemma_role_names():
    """ShareGPT exports spell LLaVA's entries role/content, and speakers user/assistant (or Gemma's "model"):
    string contents are the LLaVA shape (<image> markers place the images), content parts the messages shape.
    They used to be refused as invalid_schema / unknown_role."""
    llava = {"image": "a.png", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]}
    expected = parse_record(llava, "r:1").turns
    for system, human, gpt in (("system", "user", "assistant"), ("system", "user", "model")):
        for keys in (("from", "value"), ("role", "content")):
            record = {"image": "a.png", "conversations": [
                {keys[0]: system, keys[1]: "Be brief."},
                {keys[0]: human, keys[1]: "<image>\nWhat?"}, {keys[0]: gpt, keys[1]: "A cat."}]}
            assert parse_record(record, "r:1").turns == expected, (human, gpt, keys)
    parts = {"conversations": [user([{"type": "image", "image": "a.png"}, {"type": "text", "text": "What?"}]),
                               {"role": "model", "content": [{"type": "text", "text": "A cat."}]}]}
    messages = {"messages": [user([{"type": "image", "image": "a.png"}, {"type": "text", "text": "What?"}]),
                             assistant([{"type": "text", "text": "A cat."}])]}
    assert parse_record(parts, "r:1").turns == parse_record(messages, "r:1").turns
    model = {"messages": [user("x"), {"role": "model", "content": "y"}]}
    assert parse_record(model, "r:1").turns[1].role == "assistant"
    shared = {"images": ["a.png"], "conversations": [user([{"type": "image"}, {"type": "text", "text": "What?"}]),
                                                      {"role": "gpt", "content": "A cat."}]}
    assert parse_record(shared, "r:1").images == [ImageRef("a.png")]


SHAREGPT_BAD = [  # the new spellings keep refusing what cannot be trained on, with the same reasons
    ({"conversations": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "unknown_role", "has role 'bot'"),
    ({"conversations": [{"role": "bot", "content": [{"type": "text", "text": "x"}]}, assistant("y")]},
     "unknown_role", "conversations[0] has role 'bot'"),
    ({"messages": [user("x"), {"role": "gpt", "content": "y"}]}, "unknown_role", "'gpt'"),
    ({"conversations": [{"role": "user", "content": "x", "from": "human", "value": "x"}, assistant("y")]},
     "invalid_schema", "both 'from'/'value' and 'role'/'content'"),
    ({"conversations": [{"role": "user"}, assistant("y")]}, "invalid_schema", "'from' and 'value' (or 'role'"),
    ({"conversations": [{"role": "user", "content": None}, assistant("y")]}, "invalid_schema", "content must be"),
    ({"conversations": [{"role": "user", "content": "<image>x"}, assistant("y")]}, "image_count_mismatch",
     "1 <image> marker(s)"),
    ({"image": "a.png", "conversations": [user([{"type": "image"}]), user("<image>"), assistant("y")]},
     "invalid_schema", "content parts and <image> markers"),
    ({"conversations": [{"role": "model", "content": "y"}, user("x")]}, "role_order", "alternate"),
]


@pytest.mark.parametrize("record,reason,words", SHAREGPT_BAD)
def test_sharegpt_spellings_still_refuse_bad_records(record, reason, words):
    with pytest.raises(BadRecord) as caught:
        parse_record(record, "data.jsonl:12")
    assert caught.value.reason == reason and str(caught.value).startswith("data.jsonl:12: ")
    assert words in str(caught.value)


def test_an_empty_top_level_image_is_no_image():
    """LLaVA exports write "image": "" (or null, or "images": []) on text-only records: that is no image. It used
    to be an image named "" (an unreadable_image, or an image_count_mismatch on a messages record); with
    <image> markers it is a count mismatch, and "" inside a list of images is refused."""
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    text_only = parse_record({"conversations": turns}, "r:1")
    for empty in ({"image": ""}, {"image": None}, {"images": []}, {"image": []}, {"images": ""},
                  {"image": "", "images": []}):
        assert parse_record({**empty, "conversations": turns}, "r:1").turns == text_only.turns, empty
        record = {**empty, "messages": [user("Hi"), assistant("Hello")]}
        assert parse_record(record, "r:1").images == [], empty
        marked = {**empty, "conversations": [{"from": "human", "value": "<image>\nHi"}, turns[1]]}
        with pytest.raises(BadRecord) as caught:
            parse_record(marked, "r:1")
        assert caught.value.reason == "image_count_mismatch", empty
    one = {"image": "", "images": ["a.png"], "conversations": turns}
    assert parse_record(one, "r:1").images == [ImageRef("a.png")]
    with pytest.raises(BadRecord, match=r"'images'\[1\] is an empty string") as caught:
        parse_record({"images": ["a.png", ""], "conversations": turns}, "r:1")
    assert caught.value.reason == "invalid_schema"
