"""OpenAI's ``logprobs`` / ``top_logprobs``, ``presence_penalty`` / ``frequency_penalty`` and ``n`` on the live server.

The oracle for logprobs is transformers itself: ``generate(..., output_logits=True)`` gives the raw logits of each
step, and the server's logprobs must be their ``log_softmax``. Penalties are checked against the formula worked out
in float64 (transformers has no presence / frequency penalty), and end to end against ``generate`` on the same
prompt. ``n`` choices are checked against ``generate`` run once per choice with that choice's seed.
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.generate import RowSampling, Sampling, generate, process_logits, seen_tokens
from gemma3vl.infer.logprobs import TokenTexts
from gemma3vl.infer.sampling import derived_seed
from gemma3vl.infer.server import ChatCompletionServer, ServerSettings
from test_server import decode_data_url, image_messages, post_json, reference_answer

MAX_TOKENS = 12
MAX_N = 6  # over the server's 4 slots: a request's rows must queue for slots
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def server(runtime):
    settings = ServerSettings(port=0, max_batch_size=4, batch_wait_s=0.05, max_tokens=MAX_TOKENS, max_n=MAX_N)
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        yield live


def ask(server, messages, **fields) -> dict:
    status, reply = post_json(server, {"messages": messages, "max_tokens": MAX_TOKENS, **fields})
    assert status == 200, reply
    return reply


def transformers_greedy_logits(runtime, messages) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens for ``messages`` and the raw logits [steps, V] it chose them from."""
    from transformers import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(runtime.model_dir, dtype=torch.float32).eval()
    hf_messages = [{"role": m["role"], "content": [
        {"type": "image", "image": decode_data_url(part["image_url"]["url"])} if part["type"] == "image_url" else part
        for part in m["content"]]} for m in messages]
    encoded = runtime.processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**encoded, do_sample=False, max_new_tokens=MAX_TOKENS, output_logits=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[0, encoded["input_ids"].shape[1]:].tolist()
    return tokens, torch.cat(out.logits).float()


# ---------------------------------------------------------------------------------------------- logprobs
def test_logprobs_are_log_softmax_of_transformers_raw_logits(server, runtime):
    """Greedy, tiny fp32 model, an image: each chosen token's logprob and its 20 alternatives equal ``log_softmax``
    of the logits transformers' ``generate(output_logits=True)`` reports for that step (the oracle), to 1e-5; the
    alternatives are sorted, and the chosen token is the first of them (greedy = argmax)."""
    messages = image_messages("Describe it", "blue square and green star")
    reply = ask(server, messages, temperature=0, logprobs=True, top_logprobs=20)
    content = reply["choices"][0]["logprobs"]["content"]
    tokens, logits = transformers_greedy_logits(runtime, messages)
    stop_ids = set(runtime.config.stop_token_ids)
    answer = [t for t in tokens if t not in stop_ids]
    assert len(content) == len(answer) and reply["usage"]["completion_tokens"] == len(tokens)
    expected = logits.log_softmax(dim=-1)
    texts = server.token_texts
    for step, (entry, token) in enumerate(zip(content, answer)):
        assert (entry["token"], entry["bytes"]) == texts(token)
        assert entry["logprob"] == pytest.approx(expected[step, token].item(), abs=1e-5)
        values, ids = expected[step].topk(20)
        top = entry["top_logprobs"]
        assert [alt["logprob"] for alt in top] == pytest.approx(values.tolist(), abs=1e-5)
        assert [(alt["token"], alt["bytes"]) for alt in top] == [texts(i) for i in ids.tolist()]
        assert [alt["logprob"] for alt in top] == sorted((alt["logprob"] for alt in top), reverse=True)
        assert top[0]["logprob"] == entry["logprob"] and top[0]["token"] == entry["token"]


def test_token_texts_give_the_raw_byte_of_a_byte_fallback_piece(runtime):
    texts = TokenTexts(runtime.tokenizer)
    tokenizer = runtime.tokenizer
    split = tokenizer.encode("\u2713", add_special_tokens=False)  # ✓ = E2 9C 93, three byte-fallback pieces
    assert [texts(t) for t in split] == [("\ufffd", [0xE2]), ("\ufffd", [0x9C]), ("\ufffd", [0x93])]
    word = tokenizer.convert_tokens_to_ids("\u2581red")
    assert texts(word) == (" red", list(b" red"))
    assert texts(6) == ("<end_of_turn>", list(b"<end_of_turn>"))


def test_logprobs_through_the_openai_client_streamed_and_not(server, client):
    """With an image (a data: URL): the client parses the logprobs, and the streamed chunks' logprobs, put end to
    end, are the non-streamed list."""
    messages = image_messages("What is in the picture?", "red circle")
    settings = dict(model=server.model_name, messages=messages, temperature=0, max_tokens=MAX_TOKENS, logprobs=True,
                    top_logprobs=3)
    whole = client.chat.completions.create(**settings)
    content = whole.choices[0].logprobs.content
    assert content and all(isinstance(item.token, str) and isinstance(item.logprob, float)
                           and isinstance(item.bytes, list) and len(item.top_logprobs) == 3 for item in content)
    assert content[0].top_logprobs[0].token == content[0].token
    chunks = [chunk for chunk in client.chat.completions.create(**settings, stream=True) if chunk.choices]
    streamed = [item for chunk in chunks if chunk.choices[0].logprobs for item in chunk.choices[0].logprobs.content]
    assert [item.model_dump() for item in streamed] == [item.model_dump() for item in content]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == whole.choices[0].message.content
    assert sum(bool(chunk.choices[0].logprobs) for chunk in chunks) > 1  # spread over the chunks, not all at the end
    without = client.chat.completions.create(**{**settings, "logprobs": False, "top_logprobs": None})
    assert without.choices[0].logprobs is None
    assert without.choices[0].message.content == whole.choices[0].message.content


# ---------------------------------------------------------------------------------------------- penalties
def test_penalties_are_openai_formula_per_row_and_leave_other_rows_bit_for_bit():
    """Row 0: repetition penalty (transformers', prompt + answer) then presence and frequency penalties (answer
    counts), as vLLM orders them; checked against the formula in float64. Rows 1 (greedy) and 2 (sampled) have no
    penalty: their scores are exactly what they are without the counts."""
    generator = torch.Generator().manual_seed(0)
    vocab = 50
    logits = torch.randn(3, vocab, generator=generator) * 3
    counts = torch.randint(0, 4, (3, vocab), generator=generator).float()
    prompt = torch.randint(0, vocab, (3, 6), generator=generator)
    seen = seen_tokens(prompt, torch.ones_like(prompt), vocab) | (counts > 0)
    settings = [Sampling(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=-0.7),
                Sampling(), Sampling(greedy=False, temperature=0.7, top_k=5)]
    rows = RowSampling.from_samplings(settings, vocab, CPU)
    assert rows.any_occurrence_penalty
    got = process_logits(logits.clone(), rows, seen, counts)

    x, c = logits[0].double(), counts[0].double()
    x = torch.where(seen[0], torch.where(x < 0, x * 1.3, x / 1.3), x)
    expected = x - 0.5 * (c > 0).double() - (-0.7) * c
    assert torch.allclose(got[0].double(), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(got[0], process_logits(logits.clone(), rows, seen)[0])  # the counts did something
    for row in (1, 2):
        alone = RowSampling.from_samplings([settings[row]], vocab, CPU)
        assert torch.equal(got[row], process_logits(logits[row:row + 1].clone(), alone)[0])


@pytest.mark.parametrize("field, value", [("presence_penalty", 3.0), ("frequency_penalty", -2.5),
                                          ("frequency_penalty", float("nan"))])
def test_sampling_refuses_a_penalty_out_of_range_naming_it(field, value):
    with pytest.raises(Gemma3VLError, match=f"{field}=nan|{field}={value}"):
        Sampling(**{field: value}).validate()


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_the_penalty_flags_are_checked_before_the_model_loads(runtime, capsys, command):
    from gemma3vl.cli import main

    prompt = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, str(runtime.model_dir), *prompt, "--frequency-penalty", "2.5"]) == 2
    assert "error: --frequency-penalty 2.5 must be a number from -2 to 2" in capsys.readouterr().err


def test_a_batch_line_takes_its_own_penalties(runtime, tmp_path):
    from gemma3vl.infer.batch import BatchDefaults, parse_line

    defaults = BatchDefaults(greedy=True, presence_penalty=0.5)
    item = parse_line('{"prompt": "hi", "frequency_penalty": -1}', 1, tmp_path, defaults, runtime)
    assert (item.sampling.greedy, item.sampling.presence_penalty, item.sampling.frequency_penalty) == (True, 0.5, -1)
    with pytest.raises(Gemma3VLError, match="presence_penalty=5 must be a number from -2 to 2"):
        parse_line('{"prompt": "hi", "presence_penalty": 5}', 1, tmp_path, defaults, runtime)


def test_a_large_frequency_penalty_stops_greedy_repeating_a_token(server, runtime):
    """Greedy decoding of this prompt repeats tokens; with frequency_penalty 2 it does not, and the server's answer
    is ``generate``'s with the same penalty."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell me a story"}]}]
    stop_ids = tuple(runtime.config.stop_token_ids)
    encoded = runtime.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt")

    def greedy(**penalties) -> list[int]:
        sampling = Sampling(max_new_tokens=MAX_TOKENS, stop_token_ids=stop_ids, **penalties)
        return generate(runtime.model, encoded["input_ids"], sampling=sampling)[0]

    plain, penalised = greedy(), greedy(frequency_penalty=2.0)
    assert len(set(plain)) < len(plain)
    assert len(set(penalised)) == len(penalised)
    reply = ask(server, messages, temperature=0, frequency_penalty=2.0)
    sampling = Sampling(max_new_tokens=MAX_TOKENS, stop_token_ids=stop_ids, frequency_penalty=2.0)
    assert reply["choices"][0]["message"]["content"] == reference_answer(runtime, messages, sampling=sampling)[0]
    plain_reply = ask(server, messages, temperature=0)
    assert reply["choices"][0]["message"]["content"] != plain_reply["choices"][0]["message"]["content"]


def test_a_penalised_logprob_row_and_a_plain_row_share_the_engine_each_as_alone(runtime):
    """Continuous batching: a row with a frequency penalty and logprobs, and a plain greedy row, decoded together;
    each gives ``generate``'s tokens for its own settings alone, and only the first reports logprobs."""
    from gemma3vl.infer.completion import Row
    from gemma3vl.infer.engine import ContinuousBatcher

    prompt = runtime.encode_prompt("Tell me a story", [])
    stop_ids = tuple(runtime.config.stop_token_ids)
    penalised = Sampling(max_new_tokens=MAX_TOKENS, stop_token_ids=stop_ids, frequency_penalty=2.0)
    plain = Sampling(max_new_tokens=MAX_TOKENS, stop_token_ids=stop_ids)
    engine = ContinuousBatcher(runtime.model, runtime.tokenizer, slots=2, max_length=64)
    done = {}
    for name, sampling, logprobs in (("penalised", penalised, 2), ("plain", plain, None)):
        row = Row(prompt=prompt, max_new_tokens=MAX_TOKENS, logprobs=logprobs,
                  on_finish=lambda completion, name=name: done.__setitem__(name, completion))
        engine.add(row, sampling)
    while engine.active:
        engine.step()
    for name, sampling in (("penalised", penalised), ("plain", plain)):
        assert done[name].token_ids == generate(runtime.model, prompt.input_ids[None], sampling=sampling)[0]
    answer = [t for t in done["penalised"].token_ids if t not in stop_ids]
    assert [entry.token_id for entry in done["penalised"].logprobs] == answer
    assert done["plain"].logprobs is None


# ---------------------------------------------------------------------------------------------- n
def test_n_seeded_choices_are_reproducible_and_each_is_generate_with_its_seed(server, runtime):
    messages = [{"role": "user", "content": "Tell me a story"}]
    fields = dict(n=3, seed=7, temperature=1.0)
    first, second = ask(server, messages, **fields), ask(server, messages, **fields)
    answers = [choice["message"]["content"] for choice in first["choices"]]
    assert [choice["index"] for choice in first["choices"]] == [0, 1, 2]
    assert [choice["message"]["content"] for choice in second["choices"]] == answers
    assert len(set(answers)) > 1
    top_k = runtime.generation_defaults["top_k"]
    expected = [reference_answer(runtime, messages, sampling=Sampling(
        max_new_tokens=MAX_TOKENS, greedy=False, temperature=1.0, top_k=top_k, top_p=0.95,
        seed=derived_seed(7, index), stop_token_ids=runtime.config.stop_token_ids)) for index in range(3)]
    assert answers == [text for text, _, _, _ in expected]
    assert [choice["finish_reason"] for choice in first["choices"]] == [finish for _, finish, _, _ in expected]
    assert first["usage"]["prompt_tokens"] == expected[0][2]
    assert first["usage"]["completion_tokens"] == sum(tokens for _, _, _, tokens in expected)


def test_n_greedy_gives_equal_answers_even_with_more_choices_than_slots(server, runtime):
    messages = [{"role": "user", "content": "hi"}]
    reply = ask(server, messages, n=MAX_N, temperature=0)  # 6 rows, 4 slots: two wait for a slot
    text, _, _, tokens = reference_answer(runtime, messages)
    assert [choice["message"]["content"] for choice in reply["choices"]] == [text] * MAX_N
    assert reply["usage"]["completion_tokens"] == MAX_N * tokens


def test_n_streamed_through_the_openai_client(server, client):
    settings = dict(model=server.model_name, messages=[{"role": "user", "content": "Question number 1"}], n=2,
                    seed=3, temperature=0.9, max_tokens=MAX_TOKENS)
    whole = client.chat.completions.create(**settings)
    chunks = list(client.chat.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    texts, finishes = ["", ""], [None, None]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [choice.message.content for choice in whole.choices]
    assert finishes == [choice.finish_reason for choice in whole.choices]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


# ---------------------------------------------------------------------------------------------- refusals
HI = [{"role": "user", "content": "hi"}]
BAD_FIELDS = {
    "top_logprobs over 20": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "top_logprobs without logprobs": ({"top_logprobs": 3}, "top_logprobs"),
    "top_logprobs not an integer": ({"logprobs": True, "top_logprobs": "3"}, "top_logprobs"),
    "logprobs not a boolean": ({"logprobs": "yes"}, "logprobs"),
    "presence_penalty 3": ({"presence_penalty": 3}, "presence_penalty"),
    "frequency_penalty -2.5": ({"frequency_penalty": -2.5}, "frequency_penalty"),
    "frequency_penalty not a number": ({"frequency_penalty": "high"}, "frequency_penalty"),
    "n=0": ({"n": 0}, "n"),
    "n not an integer": ({"n": 1.5}, "n"),
    "n a string": ({"n": "2"}, "n"),
    "n over the server's max_n": ({"n": MAX_N + 1}, "n"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_bad_new_fields_get_an_openai_400_naming_the_field(server, case):
    fields, param = BAD_FIELDS[case]
    status, reply = post_json(server, {"messages": HI, "max_tokens": 2, **fields})
    assert status == 400 and set(reply["error"]) == {"message", "type", "param", "code"}, reply
    assert (reply["error"]["param"], reply["error"]["type"]) == (param, "invalid_request_error")
    assert param in reply["error"]["message"]


def test_the_server_still_refuses_what_it_does_not_implement(server):
    for fields in ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, {"functions": [{"name": "f"}]}):
        status, reply = post_json(server, {"messages": HI, **fields})
        assert (status, reply["error"]["code"]) == (400, "unsupported_parameter")
    status, reply = post_json(server, {"messages": HI, "max_tokens": 2, "top_logprobs": 0, "logprobs": False})
    assert status == 200 and reply["choices"][0]["logprobs"] is None, json.dumps(reply)
