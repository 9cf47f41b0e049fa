"""Training records with function calling (``tools``, assistant ``tool_calls``, ``tool`` messages): encoded as the
plain conversation ``gemma3vl.infer.tool_calls`` documents, against transformers' ``apply_chat_template`` on that
plain conversation (the oracle); the calls are trained on, the results are not; and the server's prompt for the
same history is the training sample's prefix (a model fine-tuned on tools is served the prompt it learned).
Tiny random checkpoint and processor."""

from __future__ import annotations

import json

import pytest
import torch

from gemma3vl.data import BadRecord, ConversationEncoder, parse_record
from gemma3vl.data.records import ROLE_ORDER
from gemma3vl.infer.tool_calls import Tool, ToolUse, instructions, output_block
from test_data_common import opened, processor, user, write_pictures  # noqa: F401 (processor: a fixture)
from test_data_encode import assistant_texts, labelled_runs

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
USE = ToolUse(tools=(Tool(WEATHER["name"], WEATHER["description"], WEATHER["parameters"]),))


def record_messages(call_arguments):
    return [
        {"role": "system", "content": "Be brief."},
        user("What is the weather where this picture was taken?", "a.png"),
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": call_arguments}}]},
        {"role": "tool", "content": "Sunny, 21 C"},
        {"role": "assistant", "content": "It is sunny."},
    ]


PLAIN = [
    {"role": "system", "content": "Be brief.\n\n" + instructions(USE)},
    user("What is the weather where this picture was taken?", "a.png"),
    {"role": "assistant", "content": '[get_weather(city="Paris")]'},
    {"role": "user", "content": output_block("Sunny, 21 C")},
    {"role": "assistant", "content": "It is sunny."},
]


@pytest.fixture
def dataset_dir(tmp_path):
    write_pictures(tmp_path)
    return tmp_path


@pytest.mark.parametrize("tools, arguments", [
    ([{"type": "function", "function": WEATHER}], {"city": "Paris"}),  # OpenAI's form; arguments as an object
    ([WEATHER], '{"city": "Paris"}'),  # bare functions; arguments as JSON text
    (json.dumps([WEATHER]), {"city": "Paris"}),  # the list's JSON text (as some datasets store it)
])
@pytest.mark.parametrize("shared_images", [False, True])
def test_a_tool_conversation_trains_as_the_documented_plain_conversation(processor, dataset_dir, tools, arguments,
                                                                          shared_images):
    record = {"tools": tools, "messages": record_messages(arguments)}
    if shared_images:  # the image part names no image: the record's "images" list gives it (TRL's layout)
        record["messages"][1]["content"][0] = {"type": "image"}
        record["images"] = ["a.png"]
    conversation = parse_record(record, "x:1", dataset_dir)
    sample = ConversationEncoder(processor).encode(conversation)
    expected = processor.apply_chat_template(opened(PLAIN, dataset_dir), tokenize=True, return_dict=True,
                                             return_tensors="pt")
    assert sample.input_ids.tolist() == expected["input_ids"][0].tolist()
    assert torch.equal(sample.pixel_values, expected["pixel_values"])
    trained = [processor.tokenizer.decode(sample.input_ids[a:b]) for a, b in labelled_runs(sample)]
    assert trained == [text + "<end_of_turn>" for text in assistant_texts(PLAIN)]


def test_the_server_prompt_for_the_history_is_the_training_samples_prefix(processor, dataset_dir, runtime):
    from PIL import Image

    from test_server import data_url, live_server, post_json

    picture = Image.open(dataset_dir / "a.png")
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture)}},
                                     {"type": "text", "text": "What is the weather where this picture was taken?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny, 21 C"},
    ]
    with live_server(runtime) as server:
        status, reply = post_json(server, {"messages": history, "tools": [{"type": "function", "function": WEATHER}]},
                                  path="/tokenize")
    assert status == 200, reply
    trained = ConversationEncoder(runtime.processor).encode(
        parse_record({"tools": [WEATHER], "messages": record_messages({"city": "Paris"})}, "x:1", dataset_dir))
    header = runtime.tokenizer.encode("<start_of_turn>model\n", add_special_tokens=False)
    served = reply["tokens"]
    assert served[-len(header):] == header
    assert trained.input_ids[:len(served)].tolist() == served


@pytest.mark.parametrize("record, reason, named", [
    ({"messages": [user("Hi"), {"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, ROLE_ORDER,
     "messages[1]"),
    ({"tools": "[{not json", "messages": [user("Hi"), {"role": "assistant", "content": "y"}]}, "invalid_schema",
     "not JSON"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}],
      "messages": [user("Hi"), {"role": "assistant", "content": "y"}]}, "invalid_schema", "tools[0].function.name"),
    ({"messages": [user("Hi"), {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
                   {"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "invalid_schema",
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [{**user("Hi"), "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
                   {"role": "assistant", "content": "y"}]}, "invalid_schema", "only assistant messages make calls"),
    ({"tools": [WEATHER], "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "y"}]},
     "invalid_schema", "only in 'messages' records"),
])
def test_bad_tool_records_are_refused_naming_what(record, reason, named):
    with pytest.raises(BadRecord) as caught:
        parse_record(record, "data.jsonl:3")
    assert caught.value.reason == reason and named in str(caught.value) and "data.jsonl:3" in str(caught.value)
