"""Function calling end to end: fine-tune the tiny random model on conversations with tools (``gemma3vl.fine_tune``,
the ``tiny_sft`` recipe), serve its exported HF checkpoint, and ask through the official ``openai`` client with the
same tools: the model makes the call it learned, which comes back as ``tool_calls``; the tool's result sent back
gets the answer it learned. (The training data and the request are written by one code path,
``gemma3vl.infer.tool_calls``; that it matches transformers' chat template is tested in test_data_tools.py and
test_server_tools.py.)"""

from __future__ import annotations

import json

import pytest

import gemma3vl
from gemma3vl.infer.runtime import InferenceRuntime
from test_server import live_server

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALLED = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                               "arguments": {"city": "Paris"}}}]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tools-e2e")
    records = [{"tools": TOOLS, "messages": [*ASK, CALLED]},
               {"tools": TOOLS, "messages": [*ASK, CALLED, {"role": "tool", "content": "Sunny"},
                                             {"role": "assistant", "content": "Sunny."}]}]
    data = directory / "tools.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    gemma3vl.fine_tune("tiny_sft", data=data, out=directory / "run", settings={
        "train.steps": 30, "train.seq_length": 768, "train.global_batch_size": 2, "train.micro_batch_size": 2,
        "optim.warmup_steps": 2, "logging.progress": "false"})
    return directory / "run" / "hf"


def test_a_model_fine_tuned_on_tool_calls_calls_the_tool_through_the_openai_client(trained):
    import openai

    runtime = InferenceRuntime.load(trained, device="cpu", dtype="float32")
    with live_server(runtime, max_tokens=40) as server:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0) as client:
            settings = dict(model=server.model_name, tools=TOOLS, temperature=0, max_tokens=40)
            first = client.chat.completions.create(messages=ASK, **settings).choices[0]
            assert first.finish_reason == "tool_calls", first.message.content
            (call,) = first.message.tool_calls
            assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
            second = client.chat.completions.create(messages=[
                *ASK, first.message, {"role": "tool", "tool_call_id": call.id, "content": "Sunny"}], **settings)
    assert (second.choices[0].message.content, second.choices[0].finish_reason) == ("Sunny.", "stop")
