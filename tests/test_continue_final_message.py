"""Continuing the final message (response prefill): vLLM's ``continue_final_message`` on the chat endpoint and
``/tokenize``, ``Model.chat(continue_final_message=True)`` in the Python API. The conversation ends with an
assistant message that the model goes on with; the answer is the continuation only.

The oracle is transformers itself (tiny random fp32 model): the prompt's tokens are those of the processor's
``apply_chat_template(continue_final_message=True)``, with images, and the answer is our ``generate`` on them
(whose tokens equal transformers' ``generate``, tested elsewhere)."""

from __future__ import annotations

import openai
import pytest

from gemma3vl.infer.generate import Sampling, generate
from gemma3vl.infer.messages import turns_of_messages
from test_server import hf_messages, image_messages, live_server, post_json

MAX_TOKENS = 5


@pytest.fixture(scope="module")
def server(runtime):
    with live_server(runtime, max_batch_size=2, batch_wait_s=0.05, max_tokens=MAX_TOKENS) as live:
        yield live


def prefilled(kind="red circle"):
    """A user message with an image, then the start of the assistant's answer."""
    return [*image_messages("What is in the picture?", kind),
            {"role": "assistant", "content": "The picture shows a"}]


def transformers_ids(runtime, messages):
    return runtime.processor.apply_chat_template(hf_messages(messages), add_generation_prompt=False,
                                                 continue_final_message=True, tokenize=True, return_dict=True,
                                                 return_tensors="pt")


def test_the_prompt_is_transformers_continue_final_message(runtime):
    """The tokens end inside the assistant's turn (no end of turn after its text), images and all."""
    messages = prefilled()
    expected = transformers_ids(runtime, messages)
    ours = runtime.encode_conversation(turns_of_messages(messages), continue_final=True)
    assert ours.input_ids.tolist() == expected["input_ids"][0].tolist()
    assert runtime.tokenizer.decode(ours.input_ids).endswith("<start_of_turn>model\nThe picture shows a")
    plain = runtime.encode_conversation(turns_of_messages(messages[:1]))
    assert ours.length > plain.length


def test_the_server_continues_the_final_message(server, runtime):
    """The answer (streamed or not) is ``generate``'s continuation of transformers' prompt, and so is the Python
    API's; ``/tokenize`` counts the same prompt."""
    from gemma3vl.api import Model

    messages = prefilled()
    encoded = transformers_ids(runtime, messages)
    stop = tuple(runtime.config.stop_token_ids)
    tokens = generate(runtime.model, encoded["input_ids"], attention_mask=encoded["attention_mask"],
                      pixel_values=encoded["pixel_values"],
                      sampling=Sampling(max_new_tokens=MAX_TOKENS, stop_token_ids=stop))[0]
    expected = runtime.tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=True)
    status, reply = post_json(server, {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
                                       "continue_final_message": True, "add_generation_prompt": False})
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == expected
    assert reply["usage"]["prompt_tokens"] == encoded["input_ids"].shape[1]
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        chunks = client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=MAX_TOKENS,
                                                temperature=0, stream=True,
                                                extra_body={"continue_final_message": True})
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    status, counted = post_json(server, {"messages": messages, "continue_final_message": True,
                                         "add_generation_prompt": False}, path="/tokenize")
    assert (status, counted["tokens"]) == (200, encoded["input_ids"][0].tolist())
    assert Model(runtime).chat(messages, continue_final_message=True, greedy=True,
                               max_new_tokens=MAX_TOKENS) == expected


@pytest.mark.parametrize("fields, param, code", [
    ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message", "invalid_value"),
    ({"add_generation_prompt": False}, "add_generation_prompt", "unsupported_parameter"),
    ({"continue_final_message": "yes"}, "continue_final_message", "invalid_value"),
    ({"continue_final_message": True, "response_format": {"type": "json_object"}}, "continue_final_message",
     "invalid_value"),
])
def test_bad_combinations_are_a_400_naming_the_field(server, fields, param, code):
    status, reply = post_json(server, {"messages": prefilled(), "max_tokens": 2, **fields})
    assert (status, reply["error"]["param"], reply["error"]["code"]) == (400, param, code), reply


def test_only_an_assistant_message_with_text_can_be_continued(server):
    for messages in (image_messages(), [*image_messages(), {"role": "assistant", "content": "  "}]):
        status, reply = post_json(server, {"messages": messages, "max_tokens": 2, "continue_final_message": True})
        assert (status, reply["error"]["param"]) == (400, "messages"), reply
        assert "the last message must be an assistant message with text" in reply["error"]["message"]
    status, reply = post_json(server, {"input": "hi", "continue_final_message": True}, path="/v1/responses")
    assert (status, reply["error"]["param"]) == (400, "continue_final_message")
