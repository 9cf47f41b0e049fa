"""A minimum answer length: vLLM's ``min_tokens`` on the server (chat, legacy and Responses endpoints, streamed or
not), transformers' ``min_new_tokens`` in ``generate --min-new-tokens``, ``--batch`` lines, the Python API and a
checkpoint's generation config. No stop token before the minimum, and a stop string counts only where it ends after
the minimum's text (as vLLM checks stop strings only past it).

The oracle is transformers itself (tiny random fp32 model): ``generate(min_new_tokens=...)`` on left-padded rows
with images is test_sampling_parity.py's, which also checks each step's scores bit for bit against transformers'
``MinNewTokensLengthLogitsProcessor``; here the server's answers equal our ``generate`` with the same settings."""

from __future__ import annotations

import io

import openai
import pytest

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.detokenize import IncrementalText
from gemma3vl.infer.generate import Sampling
from gemma3vl.infer.server import ChatCompletionServer, ServerSettings
from generation_helpers import run_batch_lines
from test_sampling_extensions import word_token  # noqa: F401  (a fixture)
from test_server import post_json, reference_answer

MAX_TOKENS = 6
PROMPT = [{"role": "user", "content": "Tell me"}]


@pytest.fixture(scope="module")
def server(runtime):
    settings = ServerSettings(port=0, max_batch_size=4, batch_wait_s=0.05, max_tokens=MAX_TOKENS, max_n=2)
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        yield live


@pytest.fixture(scope="module")
def eos(runtime) -> int:
    return runtime.config.stop_token_ids[0]


def chat(server, **fields) -> dict:
    status, reply = post_json(server, {"messages": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, **fields})
    assert status == 200, reply
    return reply


def test_no_stop_token_before_min_tokens_on_every_endpoint(server, runtime, eos):
    """+100 on an EOS token ends an answer at once; with ``min_tokens`` N it ends at token N + 1, and its text is
    the one ``generate`` gives with ``min_new_tokens`` N: on chat completions (plain, streamed with the openai
    client, two choices), legacy completions and the Responses API."""
    bias = {str(eos): 100}
    assert chat(server, logit_bias=bias)["usage"]["completion_tokens"] == 1
    stop = tuple(runtime.config.stop_token_ids)
    for minimum in (1, 3, MAX_TOKENS - 1):
        reply = chat(server, logit_bias=bias, min_tokens=minimum, n=2)
        expected = reference_answer(runtime, PROMPT, sampling=Sampling(
            max_new_tokens=MAX_TOKENS, stop_token_ids=stop, logit_bias=((eos, 100.0),), min_new_tokens=minimum))[0]
        assert reply["usage"]["completion_tokens"] == 2 * (minimum + 1)
        assert [c["message"]["content"] for c in reply["choices"]] == [expected, expected]
        assert {c["finish_reason"] for c in reply["choices"]} == {"stop"}
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        chunks = list(client.chat.completions.create(
            model=server.model_name, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True}, logit_bias=bias, extra_body={"min_tokens": 2}))
        assert chunks[-1].usage.completion_tokens == 3
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        legacy = client.completions.create(model=server.model_name, prompt="Tell me", max_tokens=MAX_TOKENS,
                                           temperature=0, logit_bias=bias, extra_body={"min_tokens": 2})
        assert (legacy.usage.completion_tokens, legacy.choices[0].finish_reason) == (3, "stop")
        response = client.responses.create(model=server.model_name, input="Tell me", max_output_tokens=MAX_TOKENS,
                                           temperature=0, extra_body={"min_tokens": 4, "logit_bias": bias})
        assert (response.usage.output_tokens, response.status) == (5, "completed")


def test_min_tokens_of_one_token_answers(server, eos):
    """With max_tokens 1 (an answer the server picks without its batch engine), min_tokens 1 still masks the EOS
    token: the answer is one other token, ending by length."""
    reply = chat(server, max_tokens=1, logit_bias={str(eos): 100}, min_tokens=1)
    assert (reply["usage"]["completion_tokens"], reply["choices"][0]["finish_reason"]) == (1, "length")
    reply = chat(server, max_tokens=1, logit_bias={str(eos): 100})
    assert (reply["usage"]["completion_tokens"], reply["choices"][0]["finish_reason"]) == (1, "stop")


def test_a_stop_string_counts_only_where_it_ends_past_the_minimum(server, runtime, word_token):  # noqa: F811
    """Every token the word (+100): with ``stop`` the word and ``min_tokens`` 2, the answer ends as the third word
    completes it, its text cut there (the first two words kept); without the minimum, at the first."""
    tokenizer = runtime.tokenizer
    word = tokenizer.decode([word_token]).strip()
    bias = {str(word_token): 100}
    three = tokenizer.decode([word_token] * 3)
    reply = chat(server, logit_bias=bias, stop=[word], min_tokens=2)
    choice = reply["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (three[:three.rfind(word)], "stop")
    assert reply["usage"]["completion_tokens"] == 3
    first = tokenizer.decode([word_token])
    reply = chat(server, logit_bias=bias, stop=[word])
    assert (reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]) == \
        (first[:first.find(word)], 1)


def test_stop_strings_past_the_minimum_in_the_text(tiny_decoding):
    """The tokens of "the cat sat. END here" (one piece each, 'E' the 11th), stop string "t. E": it ends at 'E',
    so a minimum of 10 tokens still lets it stop the text there (it begins inside the minimum's text); a minimum
    of 11 takes 'E' into the minimum's text and the stop never counts."""
    _, tokenizer = tiny_decoding
    script = tokenizer.encode("the cat sat. END here", add_special_tokens=False)
    assert tokenizer.decode(script[10:11]) == "E"
    for minimum, stops_at, text in ((0, 10, "the cat sa"), (10, 10, "the cat sa"),
                                    (11, None, "the cat sat. END here")):
        answer = IncrementalText(tokenizer, ("t. E",), minimum)
        stopped = [answer.add(token) for token in script]
        assert (stopped.index(True) if any(stopped) else None) == stops_at, minimum
        assert answer.final_text() == text


@pytest.mark.parametrize("fields, says", [
    ({"min_tokens": 3, "max_tokens": 2}, "must be at most the answer's token limit (2)"),
    ({"min_tokens": MAX_TOKENS + 1}, "must be at most the answer's token limit"),
    ({"min_tokens": -1}, "must be an integer >= 0"),
    ({"min_tokens": "2"}, "must be an integer >= 0"),
    ({"min_tokens": 2.5}, "must be an integer >= 0"),
    ({"min_tokens": 1, "response_format": {"type": "json_object"}}, "does not go with a JSON response_format"),
])
def test_bad_min_tokens_is_a_400_naming_it(server, fields, says):
    status, reply = post_json(server, {"messages": PROMPT, "max_tokens": MAX_TOKENS, **fields})
    assert (status, reply["error"]["param"]) == (400, "min_tokens"), reply
    assert says in reply["error"]["message"]


def test_generate_batch_lines_and_the_python_api_take_min_new_tokens(runtime, tmp_path, eos):
    from gemma3vl.api import Model

    model = Model(runtime)
    answer = model.generate("Tell me", greedy=True, max_new_tokens=8, logit_bias={eos: 100}, min_new_tokens=3,
                            details=True)
    assert (len(answer.token_ids), answer.token_ids[-1], answer.finish_reason) == (4, eos, "stop")
    lines = [{"prompt": "Tell me", "greedy": True, "logit_bias": {str(eos): 100}, "min_new_tokens": 2},
             {"prompt": "Tell me", "greedy": True, "logit_bias": {str(eos): 100}},
             {"prompt": "Tell me", "min_new_tokens": -1},
             {"prompt": "Tell me", "min_new_tokens": 9},
             {"prompt": "Tell me", "min_new_tokens": 1, "json": True}]
    code, err, records = run_batch_lines(runtime, tmp_path, lines, "--max-new-tokens", "8")
    source = tmp_path / "in.jsonl"
    assert code == 1
    assert f"{source}:3: 'min_new_tokens' must be an integer >= 0" in err
    assert f"{source}:4: min_new_tokens=9 is over max_new_tokens=8" in err
    assert f"{source}:5: " in err and "min_new_tokens" in err.split(f"{source}:5: ")[1].splitlines()[0]
    assert [(r["tokens"], r["finish_reason"]) for r in records] == [(3, "stop"), (1, "stop")]
    for settings, says in (({"min_new_tokens": 9, "max_new_tokens": 8}, "at most max_new_tokens"),
                           ({"min_new_tokens": -2}, "min_new_tokens"),
                           ({"min_new_tokens": 2, "json_schema": True}, "does not go with a grammar")):
        with pytest.raises(Gemma3VLError, match=says):
            model.generate("Tell me", **settings)


def test_generate_flag_min_new_tokens(runtime, capsys):
    from gemma3vl.cli import main

    common = ["generate", str(runtime.model_dir), "--prompt", "Tell me", "--device", "cpu", "--greedy"]
    assert main([*common, "--max-new-tokens", "3", "--min-new-tokens", "3"]) == 0
    capsys.readouterr()
    for flags, says in ((["--max-new-tokens", "3", "--min-new-tokens", "4"],
                         "--min-new-tokens 4 must be at most --max-new-tokens 3"),
                        (["--min-new-tokens", "-1"], "--min-new-tokens -1 must be an integer >= 0"),
                        (["--min-new-tokens", "2", "--json"], "--min-new-tokens does not go with --json")):
        assert main([*common, *flags]) == 2
        assert says in capsys.readouterr().err


def test_the_generation_configs_min_new_tokens_applies_unless_given(runtime, server, eos, monkeypatch):
    """As transformers reads a checkpoint's generation config: its ``min_new_tokens`` applies (<= 0: none), a given
    one replaces it; a JSON answer ends with its object, so the server drops the checkpoint's minimum there."""
    from gemma3vl.infer.sampling_defaults import resolve_sampling

    config = runtime.config
    assert resolve_sampling({"min_new_tokens": 5}, config, max_new_tokens=8).min_new_tokens == 5
    assert resolve_sampling({"min_new_tokens": 5}, config, max_new_tokens=8, min_new_tokens=0).min_new_tokens == 0
    assert resolve_sampling({"min_new_tokens": -3}, config, max_new_tokens=8).min_new_tokens == 0
    assert resolve_sampling({}, config, max_new_tokens=8).min_new_tokens == 0
    with pytest.raises(Gemma3VLError, match="min_new_tokens"):
        resolve_sampling({"min_new_tokens": "five"}, config, max_new_tokens=8)
    monkeypatch.setattr(runtime, "generation_defaults", {**runtime.generation_defaults, "min_new_tokens": 3})
    assert chat(server, logit_bias={str(eos): 100})["usage"]["completion_tokens"] == 4
    assert chat(server, logit_bias={str(eos): 100}, min_tokens=0)["usage"]["completion_tokens"] == 1
    answer = chat(server, max_tokens=MAX_TOKENS, response_format={"type": "json_object"})["choices"][0]
    assert answer["finish_reason"] in ("stop", "length")
