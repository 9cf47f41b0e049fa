"""``POST /v1/completions`` (OpenAI's legacy completions) on the live server: prompt logprobs for evaluation harnesses.

The oracle for every logprob is transformers itself: the tiny fp32 checkpoint loaded as
``Gemma3ForConditionalGeneration``, whose logits for the same token ids, through ``log_softmax``, must equal the
server's ``token_logprobs`` / ``top_logprobs`` to 1e-5. Generated text is checked against ``generate`` on the same raw
token ids (no chat template), greedy or with each choice's seed; lm-evaluation-harness's ``local-completions``
request shape and its parsing of the answer (``parse_logprobs``: the sum of ``token_logprobs[ctxlen:-1]``) are
reproduced here as the harness does them.
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from gemma3vl.infer.generate import Sampling, generate
from gemma3vl.infer.logprobs import score_prompt
from gemma3vl.infer.sampling import derived_seed
from gemma3vl.infer.server import ChatCompletionServer, ServerSettings
from test_server import post_json, post_raw

MAX_TOKENS = 12
PATH = "/v1/completions"
PROMPT = "The red circle is next to the"


@pytest.fixture(scope="module")
def server(runtime):
    settings = ServerSettings(port=0, max_batch_size=4, batch_wait_s=0.05, max_tokens=MAX_TOKENS, max_n=4,
                              max_sequence_length=64)
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        yield live


@pytest.fixture(scope="module")
def hf_model(runtime):
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(runtime.model_dir, dtype=torch.float32).eval()


def oracle(hf_model, ids: list[int]) -> torch.Tensor:
    """transformers' log_softmax [T, V] for ``ids``: row t is the distribution of token t + 1."""
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(dim=-1)


def complete(server, **fields) -> dict:
    status, reply = post_json(server, fields, path=PATH)
    assert status == 200, reply
    assert reply["object"] == "text_completion" and reply["id"].startswith("cmpl-")
    return reply


def tokenize(runtime, text: str) -> list[int]:
    return runtime.tokenizer(text, add_special_tokens=True)["input_ids"]


def check_prompt_logprobs(server, hf_model, choice: dict, ids: list[int], top: int) -> None:
    """``choice``'s logprobs over the prompt ``ids`` against transformers' log_softmax, and its text offsets."""
    lists = choice["logprobs"]
    texts = server.token_texts
    expected = oracle(hf_model, ids)
    assert lists["tokens"][:len(ids)] == [texts(token)[0] for token in ids]
    assert lists["token_logprobs"][0] is None and lists["top_logprobs"][0] is None
    for position in range(1, len(ids)):
        row = expected[position - 1]
        assert lists["token_logprobs"][position] == pytest.approx(row[ids[position]].item(), abs=1e-5)
        got = lists["top_logprobs"][position]
        values, best = row.topk(top)
        wanted = {}
        for token, value in zip(best.tolist(), values.tolist()):
            wanted.setdefault(texts(token)[0], value)
        wanted.setdefault(texts(ids[position])[0], row[ids[position]].item())
        assert got.keys() == wanted.keys()
        assert list(got.values()) == pytest.approx(list(wanted.values()), abs=1e-5)
    offsets, text = lists["text_offset"], choice["text"]
    assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)
    for position in range(len(ids) - 1):  # every ordinary prompt token's text sits at its offset
        piece = lists["tokens"][position]
        if offsets[position + 1] > offsets[position] and piece != "\ufffd":  # (a byte piece: part of a character)
            assert text[offsets[position]:offsets[position + 1]] == piece


# ---------------------------------------------------------------------------------------------- prompt logprobs
def test_echo_logprobs_of_a_text_prompt_are_transformers_log_softmax(server, runtime, hf_model):
    """max_tokens 0: no token generated; the prompt tokenized raw with <bos> (as the tokenizer's
    add_special_tokens=True), text = the prompt as sent, <bos> taking no text; prompt + " \u2713" puts a character
    split over three byte-fallback tokens at the end."""
    prompt = PROMPT + " \u2713"
    reply = complete(server, prompt=prompt, echo=True, logprobs=3, max_tokens=0, temperature=0)
    ids = tokenize(runtime, prompt)
    assert ids[0] == runtime.tokenizer.bos_token_id
    (choice,) = reply["choices"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length" and choice["index"] == 0
    offsets = choice["logprobs"]["text_offset"]
    assert len(choice["logprobs"]["tokens"]) == len(ids) and offsets[:2] == [0, 0]
    # the three bytes of \u2713: the first carries the character, the other two begin where the next text would
    assert offsets[-3:] == [len(prompt) - 1, len(prompt), len(prompt)]
    check_prompt_logprobs(server, hf_model, choice, ids, top=3)
    assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


@pytest.mark.parametrize("chunk", ["0", "5"])
def test_prompt_scores_whole_or_in_chunks_are_transformers_log_softmax(runtime, hf_model, monkeypatch, chunk):
    """``logprobs.score_prompt`` over a prompt three sliding windows long, prefilled whole ("0") or in chunks of 5
    tokens through a dynamic cache (``GEMMA3VL_PREFILL_CHUNK``, as ``decode.prefill`` chunks), against
    transformers' log_softmax: every position's value and its top 3, and the logits after the last token."""
    monkeypatch.setenv("GEMMA3VL_PREFILL_CHUNK", chunk)
    ids = tokenize(runtime, PROMPT + ", and the blue square sits above both of them")
    assert len(ids) > 3 * runtime.model.config.text.sliding_window
    scores = score_prompt(runtime.model, torch.tensor(ids), top=3)
    expected = oracle(hf_model, ids)
    assert len(scores.entries) == len(ids) and scores.entries[0] is None
    for position, entry in enumerate(scores.entries[1:], start=1):
        row = expected[position - 1]
        assert entry.token_id == ids[position]
        assert entry.logprob == pytest.approx(row[ids[position]].item(), abs=1e-5)
        values, best = row.topk(3)
        assert [token for token, _ in entry.top] == best.tolist()
        assert [value for _, value in entry.top] == pytest.approx(values.tolist(), abs=1e-5)
    assert scores.last_logits.log_softmax(-1).tolist() == pytest.approx(expected[-1].tolist(), abs=1e-5)


def test_text_offsets_in_a_run_of_byte_pieces_are_per_character(server, runtime):
    """Token ids whose byte-fallback run spells several characters, one and several bytes long: each character's
    text begins at the offset of its first byte's token; its other bytes' tokens take no text (their offset is the
    next character's), as for one character alone."""
    def byte(value):
        return runtime.tokenizer.convert_tokens_to_ids(f"<0x{value:02X}>")

    text = "Z[\u2713\u00e9!\u2713"
    ids = [runtime.tokenizer.bos_token_id] + [byte(value) for value in text.encode()]
    choice = complete(server, prompt=ids, echo=True, logprobs=0, max_tokens=0)["choices"][0]
    echoed, offsets = choice["text"], choice["logprobs"]["text_offset"]
    assert echoed == runtime.tokenizer.decode(ids) and echoed.endswith(text)
    position, expected = len(echoed) - len(text), [0]
    for character in text:
        expected += [position] + [position + 1] * (len(character.encode()) - 1)
        position += 1
    assert offsets == expected


def test_token_id_prompts_several_in_one_request_come_back_in_order(server, runtime, hf_model):
    prompts = [tokenize(runtime, "Hello world"), [2, 5, 303, 463, 332], tokenize(runtime, "What is in the picture?")]
    reply = complete(server, prompt=prompts, echo=True, logprobs=2, max_tokens=0)
    assert [choice["index"] for choice in reply["choices"]] == [0, 1, 2]
    for ids, choice in zip(prompts, reply["choices"]):
        assert choice["text"] == runtime.tokenizer.decode(ids)  # token ids echo as decoded, <bos> written out
        check_prompt_logprobs(server, hf_model, choice, ids, top=2)
    assert reply["usage"]["prompt_tokens"] == sum(map(len, prompts))
    single = complete(server, prompt=prompts[1], echo=True, logprobs=2, max_tokens=0)  # one list of ids
    assert single["choices"][0]["logprobs"] == reply["choices"][1]["logprobs"]
    texts = complete(server, prompt=["Hello world", "What is in the picture?"], echo=True, logprobs=2, max_tokens=0)
    assert [c["logprobs"]["token_logprobs"] for c in texts["choices"]] == \
        [reply["choices"][i]["logprobs"]["token_logprobs"] for i in (0, 2)]


def test_lm_evaluation_harness_loglikelihood_request(server, runtime, hf_model):
    """The request lm-evaluation-harness's ``local-completions`` sends for loglikelihood with
    ``tokenized_requests=True`` (prompt: lists of context + continuation ids; temperature 0, max_tokens 1,
    logprobs 1, echo, seed) and its ``parse_logprobs``: sum(token_logprobs[ctxlen:-1]) and is_greedy (each
    continuation token's logprob is the max of its top_logprobs), against transformers."""
    context = tokenize(runtime, "Question: what is next to the red circle? Answer:")
    expected = oracle(hf_model, context)
    greedy = [expected[-1].argmax().item()]  # a continuation the model would pick greedily (its first token)
    continuations = [greedy, runtime.tokenizer(" a blue square", add_special_tokens=False)["input_ids"]]
    payload = {"model": server.model_name, "prompt": [context + c for c in continuations], "temperature": 0,
               "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    reply = complete(server, **payload)
    choices = sorted(reply["choices"], key=lambda c: c["index"])
    ctxlen = len(context)
    greedy_flags = []
    for continuation, choice in zip(continuations, choices):
        ids = context + continuation
        assert len(choice["logprobs"]["token_logprobs"]) == len(ids) + 1  # the prompt, then the 1 generated token
        logprob = sum(choice["logprobs"]["token_logprobs"][ctxlen:-1])
        is_greedy = all(tok == max(top.values()) for tok, top in zip(choice["logprobs"]["token_logprobs"][ctxlen:-1],
                                                                      choice["logprobs"]["top_logprobs"][ctxlen:-1]))
        rows = oracle(hf_model, ids)
        wanted = sum(rows[t - 1, ids[t]].item() for t in range(ctxlen, len(ids)))
        assert logprob == pytest.approx(wanted, abs=1e-4)
        assert is_greedy == all(rows[t - 1].argmax().item() == ids[t] for t in range(ctxlen, len(ids)))
        greedy_flags.append(is_greedy)
        # the generated token is transformers' greedy next token, and its logprob is the last entry
        generated = rows[-1].argmax().item()
        assert choice["logprobs"]["token_logprobs"][-1] == pytest.approx(rows[-1, generated].item(), abs=1e-5)
        assert choice["logprobs"]["tokens"][-1] == server.token_texts(generated)[0]
    assert greedy_flags == [True, False]


def test_a_stop_token_ending_the_answer_is_in_the_logprobs(server, runtime, hf_model):
    """The generated token of a max_tokens 1 request counts in the logprobs even when it is a stop token (it has no
    text): the harness drops the last entry, which must be that token and not the prompt's last. The checkpoint's
    stop tokens are made to include the prompt's greedy next token for this request."""
    ids = tokenize(runtime, PROMPT)
    rows = oracle(hf_model, ids)
    greedy = rows[-1].argmax().item()
    defaults = runtime.generation_defaults
    saved = defaults.get("eos_token_id")
    defaults["eos_token_id"] = [*runtime.config.stop_token_ids, greedy]
    try:
        for max_tokens in (1, 3):  # the engine-free path and the engine
            choice = complete(server, prompt=ids, echo=True, logprobs=1, max_tokens=max_tokens,
                              temperature=0)["choices"][0]
            lists = choice["logprobs"]
            # (the text shows the made-up stop token's text: a real one is special, and skipped)
            assert choice["finish_reason"] == "stop" and len(lists["token_logprobs"]) == len(ids) + 1
            assert lists["token_logprobs"][-1] == pytest.approx(rows[-1, greedy].item(), abs=1e-5)
            assert lists["text_offset"][-1] == len(runtime.tokenizer.decode(ids))
    finally:
        defaults["eos_token_id"] = saved


def test_a_generating_request_scores_its_prompt_in_the_engines_prefill(server, runtime, hf_model, monkeypatch):
    """echo + logprobs with max_tokens 4 and n 2: the prompt's logprobs (transformers' log_softmax) come from the
    engine's prefill of the first choice, the second choice reuses it: one forward over the prompt in all, and the
    answers are those of a request without echo."""
    from gemma3vl.infer import decode, engine

    forwards = []
    real = decode.prompt_hidden_states

    def counted(*args, **kwargs):
        forwards.append(args[1].shape[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "prompt_hidden_states", counted)
    monkeypatch.setattr(engine, "prompt_hidden_states", counted)
    ids = tokenize(runtime, PROMPT)
    fields = dict(prompt=PROMPT, max_tokens=4, temperature=0.8, seed=7, n=2, logprobs=2)
    reply = complete(server, echo=True, **fields)
    assert forwards == [len(ids)]
    plain = complete(server, **fields)
    for choice, alone in zip(reply["choices"], plain["choices"]):
        check_prompt_logprobs(server, hf_model, choice, ids, top=2)
        assert choice["text"] == PROMPT + alone["text"]
        assert choice["logprobs"]["token_logprobs"][len(ids):] == alone["logprobs"]["token_logprobs"]


# ---------------------------------------------------------------------------------------------- generation
def reference(runtime, ids: list[int], max_tokens: int = MAX_TOKENS, sampling: Sampling | None = None):
    stop_ids = set(runtime.config.stop_token_ids)
    sampling = sampling or Sampling(max_new_tokens=max_tokens, stop_token_ids=tuple(stop_ids))
    tokens = generate(runtime.model, torch.tensor([ids]), sampling=sampling)[0]
    finish = "stop" if tokens[-1] in stop_ids else "length"
    return runtime.tokenizer.decode([t for t in tokens if t not in stop_ids], skip_special_tokens=True), finish, tokens


def test_greedy_generation_equals_generate_on_the_raw_prompt_streamed_and_not(server, runtime):
    ids = tokenize(runtime, PROMPT)
    text, finish, tokens = reference(runtime, ids)
    reply = complete(server, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=0)
    choice = reply["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (text, finish)
    assert reply["usage"]["completion_tokens"] == len(tokens)
    assert choice["logprobs"]["text_offset"][0] == 0 and len(choice["logprobs"]["tokens"]) == len(tokens)
    echoed = complete(server, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, echo=True)["choices"][0]
    assert echoed["text"] == PROMPT + text and echoed["logprobs"] is None
    status, _, raw = post_raw(server, json.dumps({"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                                                  "stream": True, "echo": True}).encode(), path=PATH)
    assert status == 200
    events = raw.decode().split("\n\n")
    assert events[-2] == "data: [DONE]"
    chunks = [json.loads(event[len("data: "):]) for event in events[:-2]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == PROMPT + text
    assert chunks[-1]["choices"][0]["finish_reason"] == finish
    one = complete(server, prompt=PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=1)["choices"][0]
    assert one["text"] == PROMPT + reference(runtime, ids, max_tokens=1)[0]  # the engine-free path


def test_n_seeded_choices_are_generate_with_each_choice_seed(server, runtime):
    ids = tokenize(runtime, PROMPT)
    defaults = runtime.generation_defaults

    def sampling(index: int, max_tokens: int) -> Sampling:
        return Sampling(max_new_tokens=max_tokens, greedy=False, temperature=1.0, top_k=defaults["top_k"],
                        top_p=defaults["top_p"], seed=derived_seed(5, index),
                        stop_token_ids=runtime.config.stop_token_ids)

    for max_tokens in (MAX_TOKENS, 1):  # the engine, and the engine-free path (echo + logprobs + max_tokens 1)
        extra = {"echo": True, "logprobs": 1} if max_tokens == 1 else {}
        reply = complete(server, prompt=[ids, ids], n=2, seed=5, temperature=1.0, max_tokens=max_tokens, **extra)
        assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
        echo = runtime.tokenizer.decode(ids) if extra else ""
        expected = [echo + reference(runtime, ids, sampling=sampling(i, max_tokens))[0] for i in range(2)]
        assert [c["text"] for c in reply["choices"]] == expected * 2
        if max_tokens == MAX_TOKENS:
            assert len(set(expected)) == 2


def test_stop_string_cuts_the_text(server, runtime):
    text = reference(runtime, tokenize(runtime, PROMPT))[0]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop and text.find(stop) > 0
    choice = complete(server, prompt=PROMPT, temperature=0, stop=[stop], logprobs=1,
                      max_tokens=MAX_TOKENS)["choices"][0]
    assert choice["text"] == text[:text.find(stop)] and choice["finish_reason"] == "stop"
    assert all(offset <= len(choice["text"]) for offset in choice["logprobs"]["text_offset"])


def test_through_the_openai_client(server, client, runtime, hf_model):
    whole = client.completions.create(model=server.model_name, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0,
                                      temperature=0)
    lists = whole.choices[0].logprobs
    ids = tokenize(runtime, PROMPT)
    assert lists.token_logprobs[0] is None and lists.top_logprobs[0] is None
    assert lists.token_logprobs[1:] == pytest.approx(
        [oracle(hf_model, ids)[t - 1, ids[t]].item() for t in range(1, len(ids))], abs=1e-5)
    assert whole.choices[0].text == PROMPT and whole.usage.prompt_tokens == len(ids)
    settings = dict(model=server.model_name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=1)
    answer = client.completions.create(**settings)
    chunks = list(client.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == answer.choices[0].text
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(answer.choices[0].logprobs.token_logprobs, abs=1e-6)
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("fields, status, param", [
    ({"suffix": "the end"}, 400, "suffix"),
    ({"logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"best_of": 3}, 400, "best_of"),
    ({"best_of": 2, "n": 3}, 400, "best_of"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[]]}, 400, "prompt"),
    ({"prompt": [2, 100000]}, 400, "prompt"),
    ({"prompt": [2, -1]}, 400, "prompt"),
    ({"prompt": [2, 9]}, 400, "prompt"),  # the image soft token: text only here
    ({"prompt": ["a", [2, 3]]}, 400, "prompt"),
    ({"logprobs": 21}, 400, "logprobs"),
    ({"logprobs": True}, 400, "logprobs"),
    ({"max_tokens": -1}, 400, "max_tokens"),
    ({"max_tokens": MAX_TOKENS + 1}, 400, "max_tokens"),
    ({"prompt": "word " * 60}, 400, "prompt"),  # past the 64-token context with max_tokens 16
    ({"n": 5}, 400, "n"),
    ({"echo": "yes"}, 400, "echo"),
    ({"model": "other"}, 404, "model"),
])
def test_refused_requests_are_4xx_in_openai_format_and_the_server_keeps_serving(server, fields, status, param):
    body = {"prompt": "Hello", "max_tokens": 4, **fields}
    got, reply = post_json(server, body, path=PATH)
    assert got == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["param"] == param
    assert complete(server, prompt="Hello", max_tokens=2)["choices"][0]["finish_reason"] in ("length", "stop")


def test_max_tokens_0_without_echo_answers_empty_text_and_a_prompt_filling_the_context_is_fine(server):
    """As OpenAI: no token asked, none given, finish_reason "length" (not an error)."""
    choice = complete(server, prompt="Hello", max_tokens=0)["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["logprobs"]) == ("", "length", None)
    full = complete(server, prompt=list(range(10, 74)), max_tokens=0, echo=True, logprobs=0)["choices"][0]
    assert len(full["logprobs"]["tokens"]) == 64
    status, reply = post_json(server, {"prompt": list(range(10, 74)), "max_tokens": 1}, path=PATH)
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    status, _, _ = post_raw(server, b"", path=PATH, method="GET")
    assert status == 405
