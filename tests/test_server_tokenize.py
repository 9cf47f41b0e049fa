"""vLLM's ``POST /tokenize`` and ``POST /detokenize`` on the live server (tiny random checkpoint, CPU).

The oracle is transformers itself: a prompt's tokens are its tokenizer's (with ``<bos>``, as ``/v1/completions``
reads text), a conversation's are what its processor's chat template gives (images as their soft tokens) and
what ``/v1/chat/completions`` counts as the prompt; ``/detokenize`` is the tokenizer's ``decode``."""

from __future__ import annotations

import io

import pytest

from gemma3vl.infer.server import ChatCompletionServer, ServerSettings
from test_server import decode_data_url, image_messages, post_json


@pytest.fixture(scope="module")
def server(runtime):
    with ChatCompletionServer(runtime, ServerSettings(port=0, max_tokens=4, max_sequence_length=512),
                              log=io.StringIO()) as live:
        yield live


def test_a_prompt_tokenizes_as_the_tokenizer_and_detokenizes_back(server, runtime):
    status, reply = post_json(server, {"prompt": "the cat sat", "return_token_strs": True}, path="/tokenize")
    tokenizer = runtime.tokenizer
    expected = tokenizer("the cat sat")["input_ids"]
    assert status == 200 and reply["tokens"] == expected and expected[0] == tokenizer.bos_token_id, reply
    assert (reply["count"], reply["max_model_len"]) == (len(expected), 512)
    assert reply["token_strs"] == tokenizer.convert_ids_to_tokens(expected)
    status, plain = post_json(server, {"prompt": "the cat sat", "add_special_tokens": False}, path="/tokenize")
    assert plain["tokens"] == expected[1:] and plain["token_strs"] is None
    status, back = post_json(server, {"tokens": reply["tokens"]}, path="/detokenize")
    assert status == 200 and back == {"prompt": tokenizer.decode(expected)} and back["prompt"].endswith("the cat sat")


def test_a_conversation_with_an_image_tokenizes_as_the_chat_endpoint_reads_it(server, runtime):
    messages = image_messages("What is it?", "red circle")
    status, reply = post_json(server, {"messages": messages, "model": server.model_name}, path="/tokenize")
    assert status == 200, reply
    hf_messages = [{"role": "user", "content": [
        {"type": "image", "image": decode_data_url(messages[0]["content"][0]["image_url"]["url"])},
        {"type": "text", "text": "What is it?"}]}]
    expected = runtime.processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
    expected = expected[0] if isinstance(expected[0], list) else expected
    assert reply["tokens"] == list(expected)
    assert reply["tokens"].count(runtime.config.image_token_id) == runtime.config.mm_tokens_per_image
    status, answer = post_json(server, {"messages": messages, "max_tokens": 1})
    assert answer["usage"]["prompt_tokens"] == reply["count"]


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "no"}, 400, "add_special_tokens"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "a"}]}, 400, "messages[0].role"),
    ("/tokenize", {"messages": [{"role": "user", "content": "a"}], "add_generation_prompt": False}, 400,
     "add_generation_prompt"),
    ("/tokenize", {"prompt": "a", "model": "gpt-4o"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 999999]}, 400, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
    ("/detokenize", {}, 400, "tokens"),
])
def test_bad_requests_are_4xx_naming_the_field(server, path, body, status, param):
    got, reply = post_json(server, body, path=path)
    assert (got, reply["error"]["param"]) == (status, param), reply


def test_tokenize_takes_post_only(server):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{server.url}/tokenize", timeout=30)
    assert caught.value.code == 405


def test_assistant_refusals_and_empty_turns_are_read_as_openai_sends_them(server, runtime):
    """An earlier assistant message whose content is null (no calls), or that holds a ``refusal`` (the field, or
    a ``refusal`` content part), is taken as OpenAI takes it: an empty turn, or the refusal's text as what the
    assistant said (the prompt is the one with that text)."""
    def tokens(assistant):
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", **assistant},
                    {"role": "user", "content": "and?"}]
        status, reply = post_json(server, {"messages": messages}, path="/tokenize")
        assert status == 200, reply
        return reply["tokens"]

    assert tokens({"content": None}) == tokens({"content": ""})
    said = tokens({"content": "I can't help with that."})
    assert tokens({"content": None, "refusal": "I can't help with that."}) == said
    assert tokens({"content": [{"type": "refusal", "refusal": "I can't help with that."}]}) == said
    status, reply = post_json(server, {"messages": [{"role": "user", "content": None}]}, path="/tokenize")
    assert (status, reply["error"]["param"]) == (400, "messages[0].content")
