"""Sampling settings beyond temperature / top-k / top-p where users give them: OpenAI's ``logit_bias`` ({token id:
bias from -100 to 100}, added to the logits before every other step), transformers' ``min_p`` and
``repetition_penalty``, and vLLM's ``ignore_eos`` and ``stop_token_ids``; on the server's chat and legacy
completions (and, as an extension, the Responses API), ``generate`` and ``--batch`` lines, and the Python API. Bad
values are a 400 / an error naming the field.

The oracle is transformers itself (tiny random fp32 model): the server's answers equal our ``generate`` with the
same settings, which equals transformers' ``generate`` with them (logit_bias as one-token ``sequence_bias``;
test_sampling_parity.py, which also checks each step's scores bit for bit against transformers' processors, min-p
and the repetition penalty included)."""

from __future__ import annotations

import io
import json
import math
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.generate import Sampling
from gemma3vl.infer.server import ChatCompletionServer, ServerSettings
from test_server import image_messages, post_json, reference_answer

MAX_TOKENS = 5


@pytest.fixture(scope="module")
def server(runtime):
    settings = ServerSettings(port=0, max_batch_size=4, batch_wait_s=0.2, max_tokens=MAX_TOKENS)
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        yield live


@pytest.fixture(scope="module")
def word_token(runtime) -> int:
    """A plain word's token (not special, not a stop token): +100 on it makes every answer token this one."""
    tokenizer = runtime.tokenizer
    for token in range(runtime.config.text.vocab_size):
        text = tokenizer.decode([token])
        if (token not in runtime.config.stop_token_ids and token not in tokenizer.all_special_ids
                and text.strip().isalpha() and len(text.strip()) > 2):
            return token
    raise AssertionError("no word token in the tiny vocabulary")


def biased_reference(runtime, messages, bias: dict[int, float]):
    stop = tuple(set(runtime.config.stop_token_ids))
    sampling = Sampling(max_new_tokens=MAX_TOKENS, stop_token_ids=stop, logit_bias=tuple(sorted(bias.items())))
    return reference_answer(runtime, messages, sampling=sampling)


def test_chat_completions_apply_logit_bias_per_request(server, runtime, word_token):
    """+100 on a word: every token of the answer is that word, streamed or not; -100 on the unbiased answer's
    first token: another answer, the one ``generate`` gives with that bias. The three requests are sent at once (the
    server batches what arrives within 0.2 s), and the unbiased one answers as ``generate`` does alone."""
    from gemma3vl.api import Model

    messages = image_messages("Describe it", "blue square")
    plain = reference_answer(runtime, messages, max_tokens=MAX_TOKENS)
    first = Model(runtime).chat(messages, greedy=True, max_new_tokens=1, details=True).token_ids[0]
    bodies = [{"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
              for extra in ({}, {"logit_bias": {str(word_token): 100}}, {"logit_bias": {str(first): -100}})]
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda body: post_json(server, body), bodies))
    assert all(status == 200 for status, _ in replies), replies
    texts = [reply["choices"][0]["message"]["content"] for _, reply in replies]
    assert texts[0] == plain[0]
    assert texts[1] == runtime.tokenizer.decode([word_token] * MAX_TOKENS)
    assert texts[2] == biased_reference(runtime, messages, {first: -100.0})[0]
    # (the ban did change the answer: its tokens, which bytes-only pieces may render alike as text)
    banned = Model(runtime).chat(messages, greedy=True, max_new_tokens=1, logit_bias={first: -100}, details=True)
    assert banned.token_ids[0] != first
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        chunks = client.chat.completions.create(model=server.model_name, messages=messages, temperature=0,
                                                max_tokens=MAX_TOKENS, logit_bias={str(word_token): 100},
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == texts[1]


def test_legacy_completions_and_responses_take_logit_bias(server, runtime, word_token):
    status, reply = post_json(server, {"prompt": "Once", "max_tokens": 3, "temperature": 0,
                                       "logit_bias": {str(word_token): 100}}, path="/v1/completions")
    assert status == 200 and reply["choices"][0]["text"] == runtime.tokenizer.decode([word_token] * 3), reply
    status, reply = post_json(server, {"input": "hi", "max_output_tokens": 3, "temperature": 0,
                                       "logit_bias": {str(word_token): 100}}, path="/v1/responses")
    assert status == 200 and reply["output"][0]["content"][0]["text"] == runtime.tokenizer.decode([word_token] * 3)


@pytest.mark.parametrize("bias, says", [
    ({"5": 101}, "not a number from -100 to 100"),
    ({"5": "high"}, "not a number from -100 to 100"),
    ({"5": math.nan}, "not a number from -100 to 100"),
    ({"-1": 5}, "not a token id"),
    ({"five": 5}, "not a token id"),
    ({"999999": 5}, "outside the vocabulary"),
    ({"9" * 5000: 5}, "outside the vocabulary"),
    ({"5": 1, "05": 2}, "a second time"),
    ([5, 10], "must be an object"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_bad_logit_bias_is_a_400_naming_it(server, bias, says, path):
    body = {"max_tokens": 2, "logit_bias": bias}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    status, reply = post_json(server, body, path=path)
    assert status == 400 and reply["error"]["param"] == "logit_bias", reply
    assert says in reply["error"]["message"] and reply["error"]["type"] == "invalid_request_error"


def test_batch_lines_take_logit_bias(runtime, tmp_path, capsys, word_token):
    from gemma3vl.cli import main

    lines = [{"prompt": "Say something", "greedy": True, "logit_bias": {str(word_token): 100}},
             {"prompt": "Say something", "greedy": True, "logit_bias": {"999999": 1}},
             {"prompt": "Say something", "greedy": True}]
    source, answers = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code = main(["generate", str(runtime.model_dir), "--batch", str(source), "--output", str(answers),
                 "--max-new-tokens", "3", "--device", "cpu"])
    assert code == 1
    assert f"{source}:2: logit_bias=" in capsys.readouterr().err
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 2]
    assert records[0]["answer"] == runtime.tokenizer.decode([word_token] * 3) != records[1]["answer"]


def test_python_api_takes_logit_bias(runtime, word_token):
    from gemma3vl.api import Model

    model = Model(runtime)
    assert model.generate("hi", greedy=True, max_new_tokens=3, logit_bias={word_token: 100}) == \
        runtime.tokenizer.decode([word_token] * 3)
    with pytest.raises(Gemma3VLError, match="logit_bias=.*outside the vocabulary"):
        model.generate("hi", greedy=True, max_new_tokens=3, logit_bias={10**6: 1})


# ---------------------------------------------------------------------------------------------- vLLM's extensions
def chat(server, **fields) -> dict:
    status, reply = post_json(server, {"messages": [{"role": "user", "content": "Tell me"}], "max_tokens": MAX_TOKENS,
                                       **fields})
    assert status == 200, reply
    return reply


def test_min_p_one_leaves_only_the_likeliest_token_and_repetition_penalty_reaches_the_answer(server, runtime):
    """min_p=1 drops every token less likely than the likeliest: a sampled request (temperature 1.5, any seed)
    answers as greedy decoding does. repetition_penalty overrides the checkpoint's, as ``generate`` with it
    answers."""
    greedy = chat(server, temperature=0)["choices"][0]["message"]["content"]
    for seed in (1, 2):
        sampled = chat(server, temperature=1.5, seed=seed, min_p=1.0)["choices"][0]["message"]["content"]
        assert sampled == greedy
    messages = [{"role": "user", "content": "Tell me"}]
    stop = tuple(set(runtime.config.stop_token_ids))
    penalised = []
    for penalty in (0.5, 3.0):
        expected = reference_answer(runtime, messages, sampling=Sampling(
            max_new_tokens=MAX_TOKENS, stop_token_ids=stop, repetition_penalty=penalty))[0]
        assert chat(server, temperature=0, repetition_penalty=penalty)["choices"][0]["message"]["content"] == expected
        penalised.append(expected)
    assert any(answer != greedy for answer in penalised)  # (the penalty changes this prompt's answer)


def test_ignore_eos_and_stop_token_ids(server, runtime, word_token):
    """+100 on an EOS token ends the answer at once; with ``ignore_eos`` it runs to max_tokens. A token in
    ``stop_token_ids`` ends the answer there (finish_reason stop), its text left out as vLLM leaves it out."""
    eos = runtime.config.stop_token_ids[0]
    ended = chat(server, temperature=0, logit_bias={str(eos): 100})
    assert (ended["choices"][0]["finish_reason"], ended["usage"]["completion_tokens"]) == ("stop", 1)
    running = chat(server, temperature=0, logit_bias={str(eos): 100}, ignore_eos=True)
    assert (running["choices"][0]["finish_reason"], running["usage"]["completion_tokens"]) == ("length", MAX_TOKENS)
    stopped = chat(server, temperature=0, logit_bias={str(word_token): 100}, stop_token_ids=[word_token])
    choice = stopped["choices"][0]
    assert (choice["finish_reason"], choice["message"]["content"], stopped["usage"]["completion_tokens"]) == \
        ("stop", "", 1)


@pytest.mark.parametrize("fields, param", [
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": "high"}, "min_p"),
    ({"repetition_penalty": -1}, "repetition_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [999999]}, "stop_token_ids"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"ignore_eos": True, "response_format": {"type": "json_object"}}, "ignore_eos"),
])
def test_bad_extension_values_are_a_400_naming_the_field(server, fields, param):
    status, reply = post_json(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields})
    assert status == 400 and reply["error"]["param"] == param, reply


def test_generate_flags_min_p_and_repetition_penalty(runtime, capsys):
    from gemma3vl.cli import main

    common = ["generate", str(runtime.model_dir), "--prompt", "Tell me", "--max-new-tokens", "4", "--device", "cpu"]
    assert main([*common, "--greedy"]) == 0
    greedy = capsys.readouterr().out
    assert main([*common, "--temperature", "1.5", "--seed", "3", "--min-p", "1"]) == 0
    assert capsys.readouterr().out == greedy
    assert main([*common, "--greedy", "--repetition-penalty", "0.5"]) == 0
    assert capsys.readouterr().out != greedy
    for flag, value, says in (("--min-p", "2", "--min-p 2.0 must be in [0, 1]"),
                              ("--repetition-penalty", "0", "--repetition-penalty 0.0 must be a finite number > 0"),
                              ("--min-p", "nan", "--min-p nan must be a finite number")):
        assert main([*common, flag, value]) == 2
        assert says in capsys.readouterr().err


def test_batch_lines_and_the_python_api_take_min_p_and_repetition_penalty(runtime, tmp_path, capsys):
    from gemma3vl.api import Model
    from gemma3vl.cli import main

    model = Model(runtime)
    greedy = model.generate("Tell me", greedy=True, max_new_tokens=4)
    assert model.generate("Tell me", temperature=1.5, seed=4, min_p=1.0, max_new_tokens=4) == greedy
    penalised = model.generate("Tell me", greedy=True, repetition_penalty=0.5, max_new_tokens=4)
    assert penalised != greedy
    lines = [{"prompt": "Tell me", "temperature": 1.5, "seed": 4, "min_p": 1.0},
             {"prompt": "Tell me", "greedy": True, "repetition_penalty": 0.5},
             {"prompt": "Tell me", "min_p": 7}]
    source, answers = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["generate", str(runtime.model_dir), "--batch", str(source), "--output", str(answers),
                 "--max-new-tokens", "4", "--device", "cpu"]) == 1
    assert f"{source}:3: 'min_p' must be a number in [0, 1]" in capsys.readouterr().err
    assert [json.loads(line)["answer"] for line in answers.read_text().splitlines()] == [greedy, penalised]
    with pytest.raises(Gemma3VLError, match="repetition_penalty"):
        model.generate("Tell me", repetition_penalty=-2)


def test_the_generation_configs_min_p_and_repetition_penalty_apply_unless_given(runtime):
    """As transformers' ``generate`` reads a checkpoint's generation config: its ``min_p`` filters sampled answers
    (a given ``min_p`` replaces it, and sets sampling on as top-p does), its ``repetition_penalty`` applies
    unless one is given."""
    from gemma3vl.infer.sampling_defaults import resolve_sampling

    defaults = {"do_sample": True, "min_p": 0.3, "repetition_penalty": 1.2}
    config = runtime.config
    taken = resolve_sampling(defaults, config, max_new_tokens=4)
    assert (taken.greedy, taken.min_p, taken.repetition_penalty) == (False, 0.3, 1.2)
    given = resolve_sampling(defaults, config, max_new_tokens=4, min_p=0.05, repetition_penalty=1.0)
    assert (given.min_p, given.repetition_penalty) == (0.05, 1.0)
    assert not resolve_sampling({}, config, max_new_tokens=4).min_p
    assert resolve_sampling({"do_sample": False}, config, max_new_tokens=4, min_p=0.1).greedy is False
