"""Structured output (``infer/structured.py``): answers that are JSON objects, or follow a JSON Schema, decoded under
an xgrammar grammar in both loops (``generate`` and the continuous-batching engine), through ``gemma3vl generate``
(``--json``, ``--json-schema``, batch lines) and the server's ``response_format``.

Oracles: ``json.loads`` and a by-hand check of each field against its schema (``conforms``: the keywords the schemas
here use); for batches, each row generated alone (a row without a grammar must not change by a bit when rows with
one share its batch). The model is the tiny random one, so the schemas bound their strings with ``pattern``s: its
answers would otherwise run to any token limit inside a free string (its JSON would still be valid, only long).
"""

from __future__ import annotations

import io
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import openai
import pytest
import torch

import gemma3vl.infer.loading
from gemma3vl.cli import main
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer import structured
from gemma3vl.infer.completion import FINISH_ERROR, Row, collate_left_padded
from gemma3vl.infer.engine import ContinuousBatcher
from gemma3vl.infer.generate import generate_result
from gemma3vl.infer.runtime import InferenceRuntime
from gemma3vl.infer.sampling import Sampling, derived_seed
from gemma3vl.infer.server import ChatCompletionServer, ServerSettings
from gemma3vl.infer.structured import ANY_OBJECT, GrammarRows, JsonGrammars
from gemma3vl.tiny import write_tiny_checkpoint
from test_server import post_json, post_raw

xgrammar = pytest.importorskip("xgrammar")

CPU = torch.device("cpu")
LIMIT = 160  # tokens: every schema below ends well within it on the tiny model
WORD = {"type": "string", "pattern": "^[a-z ]{1,10}$"}
RECEIPT = {
    "type": "object",
    "properties": {
        "store": WORD,
        "total": {"type": "number", "minimum": 0, "maximum": 1000},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "paid": {"type": "boolean"},
        "method": {"enum": ["cash", "card"]},
        "items": {"type": "array", "items": WORD, "maxItems": 2},
    },
    "required": ["store", "total", "count", "paid", "method", "items"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "vendor": {"type": "object", "properties": {"name": WORD, "open": {"type": "boolean"}},
                   "required": ["name", "open"], "additionalProperties": False},
        "lines": {"type": "array", "minItems": 1, "maxItems": 2,
                  "items": {"type": "object", "properties": {"qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                            "required": ["qty"], "additionalProperties": False}},
    },
    "required": ["vendor", "lines"],
    "additionalProperties": False,
}
SCHEMAS = {"receipt": RECEIPT, "nested": NESTED}
PROMPTS = ["Read this receipt", "What is it?", "hi"]


def conforms(value, schema) -> bool:
    """``value`` against ``schema``, for the keywords used here (jsonschema is not a dependency)."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema["type"]
    if kind == "object":
        properties = schema.get("properties", {})
        return (isinstance(value, dict) and set(schema.get("required", ())) <= set(value)
                and (schema.get("additionalProperties", True) or set(value) <= set(properties))
                and all(conforms(value[key], properties[key]) for key in value if key in properties))
    if kind == "array":
        return (isinstance(value, list) and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1e9)
                and all(conforms(item, schema["items"]) for item in value))
    if kind == "string":
        return isinstance(value, str) and re.fullmatch(schema["pattern"].strip("^$"), value) is not None
    if kind == "boolean":
        return isinstance(value, bool)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "integer":
        number = isinstance(value, int) and not isinstance(value, bool)
    return number and schema.get("minimum", -1e308) <= value <= schema.get("maximum", 1e308)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("structured") / "tiny-gemma3")


@pytest.fixture(scope="module")
def runtime(model_dir):
    return InferenceRuntime.load(model_dir, device="cpu", dtype="float32")


def sampling(runtime, schema=None, greedy=True, seed=None, max_new_tokens=LIMIT, **settings):
    plain = runtime.sampling(max_new_tokens=max_new_tokens, greedy=greedy, seed=seed, **settings)
    return plain if schema is None else replace(plain, grammar=runtime.json_grammar(schema))


def engine_answers(runtime, rows):
    """[(prompt text, Sampling)] through one engine together: each row's Completion."""
    engine = ContinuousBatcher(runtime.model, runtime.tokenizer, slots=len(rows), max_length=256)
    done = {}
    for index, (text, settings) in enumerate(rows):
        row = Row(prompt=runtime.encode_prompt(text, []), max_new_tokens=settings.max_new_tokens,
                  on_finish=lambda completion, index=index: done.__setitem__(index, completion))
        engine.add(row, settings, tag=index)
    while engine.active:
        engine.step()
    return [done[index] for index in range(len(rows))]


def loop_answers(runtime, rows):
    """[(prompt text, Sampling)] as one left-padded ``generate`` batch: (tokens, finish reason, text) per row."""
    prompts = [runtime.encode_prompt(text, []) for text, _ in rows]
    batch = collate_left_padded(prompts, runtime.config.text.pad_token_id)
    result = generate_result(runtime.model, batch["input_ids"], attention_mask=batch["attention_mask"],
                             sampling=[settings for _, settings in rows], tokenizer=runtime.tokenizer)
    return list(zip(result.tokens, result.finish_reasons, result.texts))


# ---------------------------------------------------------------------------------------------- the answers
@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("greedy, seed", [(True, None), (False, 0), (False, 7)])
def test_answers_parse_and_follow_the_schema(runtime, name, greedy, seed):
    """Greedy and seeded sampling, engine and generate loop: every answer parses and satisfies its schema, ending
    with "stop" right after the JSON (the grammar allows the stop token only then); both loops give the same."""
    schema = SCHEMAS[name]
    rows = [(prompt, sampling(runtime, schema, greedy, seed)) for prompt in PROMPTS]
    looped = loop_answers(runtime, rows)
    for completion, (tokens, reason, text) in zip(engine_answers(runtime, rows), looped):
        assert completion.finish_reason == reason == "stop", completion.text
        assert completion.token_ids[-1] in runtime.config.stop_token_ids
        assert conforms(json.loads(completion.text), schema), completion.text
        assert (completion.token_ids, completion.text) == (tokens, text)


def test_json_object_and_a_tiny_token_limit(runtime):
    """json mode gives a JSON object; a limit hit before the JSON is complete ends with "length" (the JSON is then
    incomplete, as OpenAI's is)."""
    answer = engine_answers(runtime, [("hi", sampling(runtime, ANY_OBJECT, greedy=False, seed=1))])[0]
    assert answer.finish_reason == "stop" and isinstance(json.loads(answer.text), dict)
    short = engine_answers(runtime, [("hi", sampling(runtime, RECEIPT, max_new_tokens=5))])[0]
    assert short.finish_reason == "length" and short.completion_tokens == 5
    assert '{"store": "'.startswith(short.text)  # the schema's first key, cut short
    with pytest.raises(json.JSONDecodeError):
        json.loads(short.text)


def test_a_mixed_batch_changes_no_row(runtime):
    """One row with a schema, one in json mode, one plain, in the engine and in one generate batch: the plain row's
    tokens are those it gets alone without any grammar, bit for bit, and each constrained row's are its own alone."""
    rows = [("Read this receipt", sampling(runtime, RECEIPT, greedy=False, seed=3)),
            ("hi", sampling(runtime, ANY_OBJECT, greedy=False, seed=1)),
            ("What is it?", sampling(runtime, greedy=False, seed=5, max_new_tokens=40))]
    alone = [engine_answers(runtime, [row])[0] for row in rows]
    together = engine_answers(runtime, rows)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.finish_reason for c in together[:2]] == ["stop", "stop"]
    looped = loop_answers(runtime, rows)
    assert [tokens for tokens, _, _ in looped] == [c.token_ids for c in alone]
    assert loop_answers(runtime, [rows[2]])[0][0] == alone[2].token_ids


# ------------------------------------------------------------------------------------ the grammar's vocabulary
def test_the_mask_allows_no_special_or_padding_id_and_touches_only_grammar_rows(runtime):
    """A model vocabulary past the tokenizer's (Gemma 3: 262,208 against 262,144): those ids are never allowed, nor
    special tokens the text leaves out; a complete JSON allows exactly the stop ids. The row without a grammar keeps
    its logits bit for bit, and the logits given stay as they were (the logprobs read them)."""
    tokenizer = runtime.tokenizer
    vocab = len(tokenizer) + 32
    stops = runtime.config.stop_token_ids
    rows = GrammarRows(2, vocab, CPU)
    rows.add(0, JsonGrammars(tokenizer, vocab, stops).compile(ANY_OBJECT), stops)
    logits = torch.randn(2, vocab)
    kept = logits.clone()

    def allowed(row=0):
        return set((rows.mask(logits)[row] > float("-inf")).nonzero().flatten().tolist())

    assert {tokenizer.decode([token]) for token in allowed()} == {"{"}
    rows.advance(0, tokenizer.convert_tokens_to_ids("<0x7B>"), ended=False)
    rows.advance(0, tokenizer.convert_tokens_to_ids("<0x22>"), ended=False)  # inside the first key
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    inside = allowed()
    assert len(inside) > 300 and max(inside) < len(tokenizer) and not inside & special
    assert torch.equal(rows.mask(logits)[1], kept[1]) and torch.equal(logits, kept)
    for piece in ("<0x22>", ":", "▁", "<0x22>", "<0x22>", "}"):  # "": ""}
        rows.advance(0, tokenizer.convert_tokens_to_ids(piece), ended=False)
    assert allowed() == set(stops)
    rows.advance(0, stops[0], ended=True)
    assert rows.rows == [] and rows.mask(logits) is logits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xgrammar's CUDA mask kernel needs a CUDA device")
def test_the_cuda_mask_equals_the_cpu_mask(runtime):
    """On CUDA the bitmask goes to the device by an asynchronous copy from pinned memory and xgrammar's triton kernel
    applies it (compiled at the server's warm-up): the same -inf entries as the CPU mask, step after step, the
    row without a grammar untouched."""
    tokenizer, stops = runtime.tokenizer, runtime.config.stop_token_ids
    vocab = len(tokenizer) + 32
    grammar = JsonGrammars(tokenizer, vocab, stops).compile(ANY_OBJECT)
    assert structured.warm_up(runtime, torch.device("cuda")) == "ready"
    on_cpu, on_cuda = GrammarRows(2, vocab, CPU), GrammarRows(2, vocab, torch.device("cuda"))
    for rows in (on_cpu, on_cuda):
        rows.add(1, grammar, stops)
    logits = torch.randn(2, vocab)
    for piece in ("<0x7B>", "<0x22>", "a", "<0x22>", ":", "▁", "1"):
        assert torch.equal(on_cuda.mask(logits.cuda()).cpu(), on_cpu.mask(logits))
        for rows in (on_cpu, on_cuda):
            rows.advance(1, tokenizer.convert_tokens_to_ids(piece), ended=False)


def test_a_schema_compiles_once(runtime):
    grammars = JsonGrammars(runtime.tokenizer, runtime.config.text.vocab_size, runtime.config.stop_token_ids)
    first = grammars.compile(json.loads(json.dumps(RECEIPT, indent=4)))
    assert grammars.compile(dict(RECEIPT)) is first and grammars.compilations == 1
    reordered = {"required": RECEIPT["required"], **RECEIPT}  # key order is part of a schema
    assert grammars.compile(reordered) is not first and grammars.compilations == 2
    with ThreadPoolExecutor(4) as pool:  # requests bringing one new schema at once: compiled by the first
        together = list(pool.map(grammars.compile, [dict(NESTED) for _ in range(4)]))
    assert all(grammar is together[0] for grammar in together) and grammars.compilations == 3
    with pytest.raises(Gemma3VLError, match="xgrammar cannot use this JSON schema: Unsupported type"):
        grammars.compile({"type": "foo"})
    with pytest.raises(Gemma3VLError, match="needs stop_token_ids"):  # it could never end
        Sampling(grammar=first).validate()


class DeadEndAfter:
    """An xgrammar matcher whose grammar allows nothing after ``tokens`` tokens (xgrammar itself never does this)."""

    def __init__(self, matcher, tokens):
        self.matcher, self.left = matcher, tokens

    def accept_token(self, token):
        self.left -= 1
        return self.matcher.accept_token(token)

    def fill_next_token_bitmask(self, bitmask, row):
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.left <= 0:
            bitmask[row] = 0


@pytest.fixture
def dead_ends(monkeypatch):
    real = xgrammar.GrammarMatcher
    monkeypatch.setattr(xgrammar, "GrammarMatcher", lambda grammar, **kw: DeadEndAfter(real(grammar, **kw), 3))


def test_a_grammar_dead_end_ends_its_row_with_an_error(runtime, dead_ends):
    plain = ("What is it?", sampling(runtime, max_new_tokens=20))
    alone = engine_answers(runtime, [plain])[0]
    failed, other = engine_answers(runtime, [("hi", sampling(runtime, RECEIPT)), plain])
    assert failed.finish_reason == FINISH_ERROR and "dead end" in failed.error and failed.completion_tokens == 3
    assert other.token_ids == alone.token_ids
    with pytest.raises(structured.GrammarError, match="dead end"):  # the generate loop: the call fails, clearly
        loop_answers(runtime, [("hi", sampling(runtime, RECEIPT))])


# ---------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(runtime):
    settings = ServerSettings(port=0, max_batch_size=4, batch_wait_s=0.05, max_tokens=LIMIT, max_n=2)
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        yield live


def health_after_warm_up(server) -> dict:
    """/health once the engine thread has warmed up (``ready`` false and ``structured_output`` "starting" until
    then)."""
    deadline = time.monotonic() + 60
    while True:
        status, _, raw = post_raw(server, b"", path="/health", method="GET")
        health = json.loads(raw)
        assert status == 200
        if health["ready"] or time.monotonic() > deadline:
            assert health["structured_output"] != "starting"
            return health
        time.sleep(0.05)


def test_json_output_is_warmed_up_when_the_server_starts(server, runtime):
    """At start the engine thread builds the grammar compiler, compiles the json_object grammar and masks one row on
    the model's device (where CUDA compiles xgrammar's kernel), so the first JSON request pays none of it; /health
    says so."""
    assert health_after_warm_up(server)["structured_output"] == "ready"
    assert runtime._grammars is not None and runtime._grammars.compile(structured.ANY_OBJECT) is not None


def test_the_warm_up_reports_what_is_missing_and_the_server_serves(runtime, monkeypatch):
    """Without xgrammar /health says which extra to install; a grammar that fails to build is "failed: why"; plain
    text is served either way."""
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    assert structured.warm_up(runtime, torch.device("cpu")) == "unavailable: pip install 'gemma3vl[structured]'"
    monkeypatch.undo()

    def broken(schema):
        raise RuntimeError("[12:00:00] /project/cpp/compiler.cc:1: no grammar today")

    monkeypatch.setattr(runtime, "json_grammar", broken)
    assert structured.warm_up(runtime, torch.device("cpu")) == "failed: no grammar today"
    settings = ServerSettings(port=0, max_batch_size=2, batch_wait_s=0.01, max_tokens=2)
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        status, reply = post_json(live, {"messages": MESSAGES, "max_tokens": 2})
        assert status == 200
        assert health_after_warm_up(live)["structured_output"] == "failed: no grammar today"


def schema_format(schema, name="receipt"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


MESSAGES = [{"role": "user", "content": "Read this receipt"}]


def test_response_format_json_schema_streamed_and_not(server, client, runtime):
    """Through the openai client: the answer follows the schema, the stream put together is the whole answer
    (greedy), and with logprobs each token of the JSON has its entry."""
    settings = dict(model=server.model_name, messages=MESSAGES, temperature=0, max_tokens=LIMIT,
                    response_format=schema_format(RECEIPT))
    whole = client.chat.completions.create(**settings, logprobs=True, top_logprobs=2)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop" and conforms(json.loads(choice.message.content), RECEIPT)
    assert len(choice.logprobs.content) == whole.usage.completion_tokens - 1  # all but the stop token
    assert "".join(item.token for item in choice.logprobs.content) == choice.message.content
    chunks = list(client.chat.completions.create(**settings, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    expected = engine_answers(runtime, [("Read this receipt", sampling(runtime, RECEIPT))])[0]
    assert choice.message.content == expected.text


def test_response_format_json_object_and_n_seeded(server, client, runtime):
    settings = dict(model=server.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=LIMIT,
                    temperature=1, seed=1)
    reply = client.chat.completions.create(**settings, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    two = client.chat.completions.create(**settings, n=2, response_format=schema_format(NESTED, "nested"))
    texts = [choice.message.content for choice in two.choices]
    for index, text in enumerate(texts):
        assert conforms(json.loads(text), NESTED) and two.choices[index].finish_reason == "stop"
        seeded = sampling(runtime, NESTED, greedy=False, seed=derived_seed(1, index), temperature=1)
        assert text == engine_answers(runtime, [("hi", seeded)])[0].text
    plain = client.chat.completions.create(**{**settings, "max_tokens": 8}, response_format={"type": "text"})
    assert plain.choices[0].message.content is not None


@pytest.mark.parametrize("response_format, message", [
    (schema_format({"type": "foo"}), "xgrammar cannot use this JSON schema: Unsupported type"),
    (schema_format({"type": "string", "minLength": 5, "maxLength": 2}), "minLength 5 is greater than maxLength 2"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"schema": RECEIPT}}, "response_format.json_schema.name"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "xml"}, "'type' is 'text', 'json_object' or 'json_schema'"),
    ("json", "'type' is 'text', 'json_object' or 'json_schema'"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": RECEIPT, "strict": "yes"}}, "strict"),
])
def test_a_bad_response_format_is_a_400_and_the_server_keeps_serving(server, response_format, message):
    status, reply = post_json(server, {"messages": MESSAGES, "response_format": response_format})
    assert status == 400 and reply["error"]["param"] == "response_format", reply
    assert message in reply["error"]["message"]
    status, reply = post_json(server, {"messages": MESSAGES, "max_tokens": 2})
    assert status == 200 and reply["choices"][0]["finish_reason"] == "length"


def test_the_openai_clients_parse_helper(server, client):
    """``chat.completions.parse`` with a pydantic model (a strict schema with ``$defs`` / ``$ref``) gets it back
    filled in; a schema xgrammar cannot use is the client's BadRequestError."""
    from pydantic import BaseModel, Field

    class Item(BaseModel):
        name: str = Field(pattern=WORD["pattern"])
        qty: int = Field(ge=1, le=9)

    class Bill(BaseModel):
        store: str = Field(pattern=WORD["pattern"])
        paid: bool
        items: list[Item] = Field(max_length=2)

    reply = client.chat.completions.parse(model=server.model_name, messages=MESSAGES, temperature=0,
                                          max_tokens=LIMIT, response_format=Bill)
    assert isinstance(reply.choices[0].message.parsed, Bill)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=server.model_name, messages=MESSAGES,
                                       response_format=schema_format({"type": "foo"}))
    assert bad.value.body["param"] == "response_format"


def test_a_dead_end_is_a_500_for_its_request_only(server, dead_ends):
    request = {"messages": MESSAGES, "response_format": schema_format(RECEIPT)}
    status, reply = post_json(server, request)
    assert status == 500 and "dead end" in reply["error"]["message"]
    status, _, body = post_raw(server, json.dumps({**request, "stream": True}).encode())
    events = [line.removeprefix("data: ") for line in body.decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and "dead end" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
    status, reply = post_json(server, {"messages": MESSAGES, "max_tokens": 2})
    assert status == 200


# ---------------------------------------------------------------------------------------------- without xgrammar
@pytest.fixture
def no_xgrammar(monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` raises ImportError


def test_without_xgrammar_the_server_names_the_extra(server, runtime, no_xgrammar, monkeypatch):
    monkeypatch.setattr(runtime, "_grammars", None)  # as a server that has compiled nothing yet
    status, reply = post_json(server, {"messages": MESSAGES, "response_format": {"type": "json_object"}})
    assert status == 400 and reply["error"]["param"] == "response_format"
    assert "pip install 'gemma3vl[structured]'" in reply["error"]["message"]
    status, reply = post_json(server, {"messages": MESSAGES, "max_tokens": 2})  # plain text needs no xgrammar
    assert status == 200


def test_without_xgrammar_the_cli_names_the_extra_before_loading(model_dir, no_xgrammar, no_loading, capsys):
    assert main(["generate", str(model_dir), "--prompt", "hi", "--json"]) == 2
    assert "pip install 'gemma3vl[structured]'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the command line
@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(gemma3vl.infer.loading, "load_model", refuse)
    monkeypatch.setattr(InferenceRuntime, "load", refuse)


@pytest.mark.parametrize("content, message", [
    (None, "cannot read the JSON schema"),
    ("{not json", "not valid JSON"),
    ('["a", "list"]', "a JSON schema must be a JSON object, got list"),
    ('{"type": "foo"}', "xgrammar cannot use this JSON schema: Unsupported type \"foo\""),
])
@pytest.mark.parametrize("batch", [False, True])
def test_a_bad_schema_file_is_one_error_before_loading(model_dir, tmp_path, capsys, no_loading, content, message,
                                                       batch):
    schema = tmp_path / "schema.json"
    if content is not None:
        schema.write_text(content)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    source = ["--batch", str(prompts), "--output", str(tmp_path / "out.jsonl")] if batch else ["--prompt", "hi"]
    assert main(["generate", str(model_dir), *source, "--json-schema", str(schema)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {schema}: ") and message in err and "Traceback" not in err


def test_generate_json_schema_prints_the_json(model_dir, tmp_path, capsys):
    schema = tmp_path / "receipt.json"
    schema.write_text(json.dumps(RECEIPT, indent=2))
    argv = ["generate", str(model_dir), "--prompt", "Read this receipt", "--greedy", "--device", "cpu",
            "--json-schema", str(schema)]
    assert main([*argv, "--max-new-tokens", str(LIMIT), "--stream"]) == 0
    out = capsys.readouterr().out
    assert conforms(json.loads(out), RECEIPT)
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    assert "reached --max-new-tokens 4 before its JSON was complete" in capsys.readouterr().err


def test_batch_lines_ask_for_json(model_dir, tmp_path, capsys):
    prompts, answers = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    lines = [
        {"id": "schema", "prompt": "Read this receipt", "json_schema": RECEIPT, "max_new_tokens": LIMIT},
        {"id": "bad type", "prompt": "hi", "json_schema": "receipt.json"},
        {"id": "object", "prompt": "hi", "json": True, "temperature": 1, "seed": 1},
        {"id": "bad json flag", "prompt": "hi", "json": "yes"},
        {"id": "both", "prompt": "hi", "json": True, "json_schema": RECEIPT},
        {"id": "bad schema", "prompt": "hi", "json_schema": {"type": "foo"}},
        {"id": "plain", "prompt": "hi", "json": False, "max_new_tokens": 3},
    ]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["generate", str(model_dir), "--batch", str(prompts), "--output", str(answers), "--greedy",
                 "--device", "cpu", "--json"]) == 1
    err = capsys.readouterr().err
    assert f"{prompts}:2: 'json_schema' must be a JSON Schema (an object), got 'receipt.json'" in err
    assert f"{prompts}:4: 'json' must be true or false, got 'yes'" in err
    assert f"{prompts}:5: give one of 'json', 'json_schema', 'regex', 'choice', 'grammar', not 'json' and " \
           "'json_schema'" in err
    assert f"{prompts}:6: xgrammar cannot use this JSON schema: Unsupported type" in err
    records = {record["id"]: record for record in map(json.loads, answers.read_text().splitlines())}
    assert list(records) == ["schema", "object", "plain"]
    assert conforms(json.loads(records["schema"]["answer"]), RECEIPT) and records["schema"]["finish_reason"] == "stop"
    assert isinstance(json.loads(records["object"]["answer"]), dict)
    assert records["plain"]["finish_reason"] == "length"
