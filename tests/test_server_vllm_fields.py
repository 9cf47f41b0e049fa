"""vLLM's request fields beyond sampling that clients send through the openai client's ``extra_body``:
``include_stop_str_in_output`` (the text ends after its stop string), ``allowed_token_ids`` (the answer holds
only these tokens), ``bad_words`` (nor these words), ``skip_special_tokens: false`` and the legacy endpoint's
``add_special_tokens`` are implemented (``spaces_between_special_tokens`` changes nothing for Gemma's tokenizer, in
vLLM too); the ones that would change the answer and are not (``truncate_prompt_tokens``, ``chat_template``, ...) are
a 400 naming them, never silently ignored.

The oracle is transformers itself (tiny random fp32 model): ``allowed_token_ids`` is transformers'
``PrefixConstrainedLogitsProcessor`` with the same ids each step, and ``bad_words`` its ``NoBadWordsLogitsProcessor``
over the answer, both bit for bit in test_sampling_parity.py; here the server's answers equal our ``generate`` with
the same settings, and ``skip_special_tokens: false`` text transformers' ``decode(skip_special_tokens=False)``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.detokenize import IncrementalText
from gemma3vl.infer.generate import Sampling, generate
from test_sampling_extensions import word_token  # noqa: F401  (a fixture)
from test_server import chat_reply, live_server, post_json, reference_answer

MAX_TOKENS = 5
PROMPT = [{"role": "user", "content": "Tell me"}]


@pytest.fixture(scope="module")
def server(runtime):
    with live_server(runtime, max_batch_size=4, batch_wait_s=0.05, max_tokens=MAX_TOKENS) as live:
        yield live


def chat(server, **fields) -> dict:
    return chat_reply(server, PROMPT, **{"max_tokens": MAX_TOKENS, **fields})


def test_include_stop_str_in_output_keeps_the_stop_string(server, runtime, word_token):  # noqa: F811
    """Every token the word (+100), ``stop`` the word: the text ends before it, or, with
    ``include_stop_str_in_output``, after it (streamed too, and on the legacy endpoint)."""
    tokenizer = runtime.tokenizer
    text = tokenizer.decode([word_token])
    word = text.strip()
    bias = {str(word_token): 100}
    cut = text.find(word)
    before = chat(server, logit_bias=bias, stop=[word])["choices"][0]
    after = chat(server, logit_bias=bias, stop=[word], include_stop_str_in_output=True)["choices"][0]
    assert (before["message"]["content"], before["finish_reason"]) == (text[:cut], "stop")
    assert (after["message"]["content"], after["finish_reason"]) == (text[:cut + len(word)], "stop")
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        chunks = client.chat.completions.create(model=server.model_name, messages=PROMPT, max_tokens=MAX_TOKENS,
                                                temperature=0, stop=[word], logit_bias=bias, stream=True,
                                                extra_body={"include_stop_str_in_output": True})
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text[:cut + len(word)]
        legacy = client.completions.create(model=server.model_name, prompt="Tell me", max_tokens=MAX_TOKENS,
                                           temperature=0, stop=[word], logit_bias=bias,
                                           extra_body={"include_stop_str_in_output": True})
        assert legacy.choices[0].text == text[:cut + len(word)]


def test_a_stop_string_kept_in_the_text_cuts_what_follows_it(tiny_decoding):
    """The tokens of "the cat sat. END here": stop ". E" ends the text at "the cat sat", or with the stop kept at
    "the cat sat. E"; the rest of the token that completes it ('E' is one) is never kept."""
    _, tokenizer = tiny_decoding
    script = tokenizer.encode("the cat sat. END here", add_special_tokens=False)
    for include, text in ((False, "the cat sat"), (True, "the cat sat. E")):
        answer = IncrementalText(tokenizer, (". E", "END"), include_stop=include)
        streamed = ""
        for token in script:
            stopped = answer.add(token)
            streamed += answer.delta(final=stopped)
            if stopped:
                break
        assert (answer.final_text(), streamed) == (text, text)


def prompt_ids(runtime):
    from gemma3vl.infer.messages import turns_of_messages

    return runtime.encode_conversation(turns_of_messages(PROMPT)).input_ids[None]


def test_allowed_token_ids_restrict_the_answer(server, runtime):
    """The answer holds only the allowed tokens (no stop token among them: it runs to max_tokens), and is the one
    ``generate`` gives with the same ``allowed_token_ids``; a request sent with it, without them, is answered as
    alone (its batch row is not restricted)."""
    allowed = (5, 17, 33, 40)
    stop = tuple(runtime.config.stop_token_ids)
    tokens = generate(runtime.model, prompt_ids(runtime),
                      sampling=Sampling(max_new_tokens=MAX_TOKENS, stop_token_ids=stop, allowed_token_ids=allowed))[0]
    assert set(tokens) <= set(allowed) and len(tokens) == MAX_TOKENS
    with ThreadPoolExecutor(2) as pool:
        restricted, plain = pool.map(lambda extra: chat(server, **extra), [{"allowed_token_ids": list(allowed)}, {}])
    assert restricted["choices"][0]["message"]["content"] == runtime.tokenizer.decode(tokens,
                                                                                      skip_special_tokens=True)
    assert restricted["usage"]["completion_tokens"] == MAX_TOKENS
    assert plain["choices"][0]["message"]["content"] == reference_answer(runtime, PROMPT, max_tokens=MAX_TOKENS)[0]


def test_bad_words_are_tokenized_as_vllm_tokenizes_them(runtime):
    """A word as it tokenizes at the start of a text, and with a space before it when that gives another first
    token and as many tokens; leading spaces stripped first; each sequence once."""
    def ids(text):
        return tuple(runtime.tokenizer.encode(text, add_special_tokens=False))

    assert ids("cat")[0] != ids(" cat")[0] and len(ids("cat")) == len(ids(" cat")) == 3
    assert runtime.bad_words_ids(["cat", "  cat"]) == (ids("cat"), ids(" cat"))
    assert len(ids("the")) != len(ids(" the"))  # (" the" is one token of the tiny vocabulary)
    assert runtime.bad_words_ids(["the"]) == (ids("the"),)


def test_bad_words_keep_a_word_out_of_the_answer(server, runtime):
    """+100 on "a" makes every token of the answer "a"; with ``bad_words: ["a"]`` neither "a" nor " a" is in it,
    and the answer is ``generate``'s with the same banned sequences."""
    (a,) = runtime.tokenizer.encode("a", add_special_tokens=False)
    bias = {str(a): 100}
    assert chat(server, logit_bias=bias)["choices"][0]["message"]["content"] == "a" * MAX_TOKENS
    banned = runtime.bad_words_ids(["a"])
    assert len(banned) == 2 and all(len(words) == 1 for words in banned)
    stop = tuple(runtime.config.stop_token_ids)
    tokens = generate(runtime.model, prompt_ids(runtime), sampling=Sampling(
        max_new_tokens=MAX_TOKENS, stop_token_ids=stop, logit_bias=((a, 100.0),), bad_words_ids=banned))[0]
    assert not {words[0] for words in banned} & set(tokens)
    reply = chat(server, logit_bias=bias, bad_words=["a"])
    expected = runtime.tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=True)
    assert reply["choices"][0]["message"]["content"] == expected
    assert reply["usage"]["completion_tokens"] == len(tokens)


@pytest.mark.parametrize("fields, param", [
    ({"bad_words": "a"}, "bad_words"),
    ({"bad_words": [" "]}, "bad_words"),
    ({"bad_words": [5]}, "bad_words"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
    ({"allowed_token_ids": [10**9]}, "allowed_token_ids"),
    ({"allowed_token_ids": 5}, "allowed_token_ids"),
    ({"allowed_token_ids": [5], "response_format": {"type": "json_object"}}, "allowed_token_ids"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
])
def test_bad_values_are_a_400_naming_the_field(server, fields, param):
    status, reply = post_json(server, {"messages": PROMPT, "max_tokens": 2, **fields})
    assert (status, reply["error"]["param"]) == (400, param), reply


@pytest.mark.parametrize("field, value", [
    ("truncate_prompt_tokens", 5),
    ("logits_processors", ["x"]), ("return_tokens_as_token_ids", True),
    ("echo", True), ("add_generation_prompt", False),
    ("add_special_tokens", True), ("chat_template", "{{ messages }}"), ("documents", [{"text": "d"}]),
    ("stream_options", {"continuous_usage_stats": True}),
])
def test_vllm_fields_not_implemented_are_refused_not_ignored(server, field, value):
    """Each would change the answer: a 400 ``unsupported_parameter`` naming it, on chat completions and the
    Responses API; with its harmless value (vLLM's default) the request is answered."""
    stream = {"stream": True} if field == "stream_options" else {}
    status, reply = post_json(server, {"messages": PROMPT, "max_tokens": 2, field: value, **stream})
    assert (status, reply["error"]["param"], reply["error"]["code"]) == (400, field, "unsupported_parameter")
    if stream:  # (the Responses API's stream_options are its own)
        return
    status, reply = post_json(server, {"input": "hi", "max_output_tokens": 2, field: value}, path="/v1/responses")
    assert (status, reply["error"]["param"]) == (400, field), reply


def test_the_harmless_values_are_answered(server):
    harmless = {"skip_special_tokens": True, "spaces_between_special_tokens": True, "echo": False,
                "add_generation_prompt": True, "continue_final_message": False, "add_special_tokens": False,
                "bad_words": [], "chat_template_kwargs": {}, "include_stop_str_in_output": False}
    assert chat(server, max_tokens=2, **harmless)["usage"]["completion_tokens"] >= 1


def test_generate_takes_allowed_token_ids(runtime):
    ids = prompt_ids(runtime)
    restricted = generate(runtime.model, ids, sampling=Sampling(max_new_tokens=4, allowed_token_ids=(7, 8)))[0]
    assert set(restricted) <= {7, 8} and len(restricted) == 4
    with pytest.raises(Gemma3VLError, match="allowed_token_ids"):
        generate(runtime.model, ids, sampling=Sampling(max_new_tokens=2, allowed_token_ids=(10**9,)))


def test_legacy_completions_take_add_special_tokens(server, runtime):
    """vLLM's ``add_special_tokens: false`` on ``/v1/completions``: the text prompt goes without the ``<bos>``
    otherwise added, answering as the same tokens sent as ids; ``true`` (the default) adds it."""
    ids = runtime.tokenizer("Tell me", add_special_tokens=False)["input_ids"]
    answers = {}
    for name, body in (("default", {"prompt": "Tell me"}), ("bare", {"prompt": "Tell me", "add_special_tokens": False}),
                       ("ids", {"prompt": ids}), ("true", {"prompt": "Tell me", "add_special_tokens": True})):
        status, reply = post_json(server, {**body, "max_tokens": MAX_TOKENS, "temperature": 0},
                                  path="/v1/completions")
        assert status == 200, reply
        answers[name] = (reply["choices"][0]["text"], reply["usage"]["prompt_tokens"])
    assert answers["bare"] == answers["ids"] and answers["bare"][1] == len(ids)
    assert answers["default"] == answers["true"] and answers["default"][1] == len(ids) + 1
    status, reply = post_json(server, {"prompt": "hi", "add_special_tokens": "no"}, path="/v1/completions")
    assert (status, reply["error"]["param"]) == (400, "add_special_tokens")


def test_batch_lines_and_the_python_api_take_bad_words(runtime, tmp_path, capsys):
    """The same words banned on a ``--batch`` line and through ``Model.generate``: the answer the server gives."""
    import json

    from gemma3vl.api import Model
    from gemma3vl.cli import main

    (a,) = runtime.tokenizer.encode("a", add_special_tokens=False)
    model = Model(runtime)
    free = model.generate("Tell me", greedy=True, max_new_tokens=4, logit_bias={a: 100})
    banned = model.generate("Tell me", greedy=True, max_new_tokens=4, logit_bias={a: 100}, bad_words=["a"])
    assert free == "a" * 4 and "a" not in banned
    lines = [{"prompt": "Tell me", "greedy": True, "logit_bias": {str(a): 100}, "bad_words": ["a"]},
             {"prompt": "Tell me", "bad_words": "a"}]
    source, answers = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["generate", str(runtime.model_dir), "--batch", str(source), "--output", str(answers),
                 "--max-new-tokens", "4", "--device", "cpu"]) == 1
    assert f"{source}:2: 'bad_words' must be a list of words (non-blank strings)" in capsys.readouterr().err
    assert [json.loads(line)["answer"] for line in answers.read_text().splitlines()] == [banned]
    with pytest.raises(Gemma3VLError, match="bad_words must be a list of words"):
        model.generate("Tell me", bad_words="a")


def test_skip_special_tokens_false_keeps_special_tokens_in_the_text(server, runtime):
    """+100 on ``<start_of_image>`` (special, not a stop token): its text is left out by default, as transformers'
    ``decode(skip_special_tokens=True)`` leaves it out, and kept with ``skip_special_tokens: false``, streamed too."""
    tokenizer = runtime.tokenizer
    boi = tokenizer.convert_tokens_to_ids("<start_of_image>")
    assert boi in tokenizer.all_special_ids and boi not in runtime.config.stop_token_ids
    bias = {str(boi): 100}
    assert chat(server, logit_bias=bias)["choices"][0]["message"]["content"] == ""
    kept = tokenizer.decode([boi] * MAX_TOKENS, skip_special_tokens=False)
    assert kept == "<start_of_image>" * MAX_TOKENS
    reply = chat(server, logit_bias=bias, skip_special_tokens=False)
    assert reply["choices"][0]["message"]["content"] == kept
    # vLLM's spaces_between_special_tokens: Gemma's (fast) tokenizer writes no space between them either way, as
    # transformers' decode does with the setting (vLLM's detokenizer ignores it for fast tokenizers)
    assert tokenizer.decode([boi] * MAX_TOKENS, skip_special_tokens=False, spaces_between_special_tokens=True) == kept
    for spaces in (False, True):
        reply = chat(server, logit_bias=bias, skip_special_tokens=False, spaces_between_special_tokens=spaces)
        assert reply["choices"][0]["message"]["content"] == kept
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        chunks = client.chat.completions.create(model=server.model_name, messages=PROMPT, max_tokens=MAX_TOKENS,
                                                temperature=0, logit_bias=bias, stream=True,
                                                extra_body={"skip_special_tokens": False})
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == kept
    for field in ("skip_special_tokens", "spaces_between_special_tokens"):
        status, bad = post_json(server, {"messages": PROMPT, field: "no"})
        assert (status, bad["error"]["param"]) == (400, field)
