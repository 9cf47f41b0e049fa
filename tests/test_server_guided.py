"""vLLM's structured-output fields on the chat and legacy completions endpoints, on xgrammar as JSON output is:
``guided_choice`` (one of a list of strings), ``guided_regex`` (a regular expression the whole answer matches),
``guided_grammar`` (EBNF, rule ``root``), ``guided_json`` (as ``response_format``'s ``json_schema``), and the
newer ``structured_outputs`` object holding one of them (or ``json_object``). Greedy answers under a constraint
equal our ``generate`` under the same compiled grammar; bad constraints are a 400 naming their field.

(The tiny random model's free answers match none of these constraints: what it writes here is the grammar's
doing. The oracle for the unconstrained decoding is transformers, in test_server.py.)"""

from __future__ import annotations

import json
import re

import pytest

from gemma3vl.infer.generate import Sampling, generate
from gemma3vl.infer.messages import turns_of_messages
from gemma3vl.infer.structured import Constraint
from test_server import chat_reply, live_server, post_json

pytest.importorskip("xgrammar")

MAX_TOKENS = 12
PROMPT = [{"role": "user", "content": "Answer me"}]
CHOICES = ["yes", "no", "maybe so"]


@pytest.fixture(scope="module")
def server(runtime):
    with live_server(runtime, max_batch_size=4, batch_wait_s=0.05, max_tokens=MAX_TOKENS) as live:
        yield live


def chat(server, **fields) -> dict:
    return chat_reply(server, PROMPT, **{"max_tokens": MAX_TOKENS, **fields})["choices"][0]


def generated(runtime, constraint: Constraint) -> str:
    """Our ``generate`` under the same grammar, greedy, on the same conversation."""
    ids = runtime.encode_conversation(turns_of_messages(PROMPT)).input_ids[None]
    stop = tuple(runtime.json_grammar_stop_ids)
    tokens = generate(runtime.model, ids, sampling=Sampling(max_new_tokens=MAX_TOKENS, stop_token_ids=stop,
                                                            grammar=runtime.grammar(constraint)))[0]
    return runtime.tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=True)


def test_guided_choice_regex_and_grammar(server, runtime):
    choice = chat(server, guided_choice=CHOICES)
    assert (choice["message"]["content"] in CHOICES, choice["finish_reason"]) == (True, "stop")
    assert choice["message"]["content"] == generated(runtime, Constraint("choice", CHOICES))
    assert chat(server, structured_outputs={"choice": CHOICES})["message"]["content"] == choice["message"]["content"]
    pattern = r"[0-9]{3}-[a-z]{2}"
    matched = chat(server, guided_regex=pattern)
    assert re.fullmatch(pattern, matched["message"]["content"]) and matched["finish_reason"] == "stop"
    assert matched["message"]["content"] == generated(runtime, Constraint("regex", pattern))
    grammar = 'root ::= "a" ("b" | "c")+'
    parsed = chat(server, structured_outputs={"grammar": grammar}, max_tokens=6)
    assert re.fullmatch(r"a[bc]+", parsed["message"]["content"])


def test_guided_json_equals_response_format(server):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    as_response_format = chat(server, max_tokens=MAX_TOKENS,
                              response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    for fields in ({"guided_json": schema}, {"guided_json": json.dumps(schema)},
                   {"structured_outputs": {"json": schema}}):
        assert chat(server, **fields)["message"]["content"] == as_response_format["message"]["content"]
    json_object = chat(server, response_format={"type": "json_object"})["message"]["content"]
    assert chat(server, structured_outputs={"json_object": True})["message"]["content"] == json_object


def test_legacy_completions_take_guided_choice(server):
    status, reply = post_json(server, {"prompt": "Answer:", "max_tokens": MAX_TOKENS, "temperature": 0,
                                       "guided_choice": CHOICES}, path="/v1/completions")
    assert status == 200, reply
    assert reply["choices"][0]["text"] in CHOICES and reply["choices"][0]["finish_reason"] == "stop"


def test_legacy_completions_take_response_format(server):
    """As vLLM's completions endpoint does (it was silently ignored): the same answer as ``guided_json``; a bad
    format or two constraints are a 400 naming the field."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    base = {"prompt": "Answer:", "max_tokens": MAX_TOKENS, "temperature": 0}

    def text(**fields):
        status, reply = post_json(server, {**base, **fields}, path="/v1/completions")
        assert status == 200, reply
        return reply["choices"][0]["text"]

    formatted = text(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    assert formatted == text(guided_json=schema) and formatted.startswith("{\"n\": ")
    assert text(response_format={"type": "json_object"}) == text(structured_outputs={"json_object": True})
    for fields, param in (({"response_format": {"type": "bogus"}}, "response_format"),
                          ({"response_format": {"type": "json_object"}, "guided_choice": CHOICES}, "guided_choice")):
        status, reply = post_json(server, {**base, **fields}, path="/v1/completions")
        assert (status, reply["error"]["param"]) == (400, param), reply


@pytest.mark.parametrize("fields, param", [
    ({"guided_choice": CHOICES, "guided_regex": "a"}, "guided_choice"),  # (the second in guided_json, _regex, ...)
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", 3]}, "guided_choice"),
    ({"guided_regex": "("}, "guided_regex"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
    ({"structured_outputs": "a"}, "structured_outputs"),
    ({"guided_choice": CHOICES, "response_format": {"type": "json_object"}}, "guided_choice"),
    ({"guided_choice": CHOICES, "min_tokens": 2}, "min_tokens"),
])
def test_bad_constraints_are_a_400_naming_the_field(server, fields, param):
    status, reply = post_json(server, {"messages": PROMPT, "max_tokens": 2, **fields})
    assert (status, reply["error"]["param"]) == (400, param), reply


def test_batch_lines_and_the_python_api_take_regex_choice_and_grammar(runtime, tmp_path, capsys):
    """The same constraints on ``generate --batch`` lines and in ``Model.generate``: the answers the server's
    engine gives them (greedy)."""
    from gemma3vl.api import Model
    from gemma3vl.cli import main
    from gemma3vl.errors import Gemma3VLError

    model = Model(runtime)
    chosen = model.generate("Answer me", greedy=True, max_new_tokens=MAX_TOKENS, choice=CHOICES)
    matched = model.generate("Answer me", greedy=True, max_new_tokens=MAX_TOKENS, regex=r"[0-9]{3}-[a-z]{2}")
    parsed = model.generate("Answer me", greedy=True, max_new_tokens=6, grammar='root ::= "a" ("b" | "c")+')
    assert chosen in CHOICES and re.fullmatch(r"[0-9]{3}-[a-z]{2}", matched) and re.fullmatch("a[bc]+", parsed)
    lines = [{"prompt": "Answer me", "greedy": True, "choice": CHOICES},
             {"prompt": "Answer me", "greedy": True, "regex": r"[0-9]{3}-[a-z]{2}"},
             {"prompt": "Answer me", "choice": CHOICES, "regex": "a"},
             {"prompt": "Answer me", "choice": []}]
    source, answers = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["generate", str(runtime.model_dir), "--batch", str(source), "--output", str(answers),
                 "--max-new-tokens", str(MAX_TOKENS), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"{source}:3: give one of" in err and "not 'regex' and 'choice'" in err
    assert f"{source}:4: 'choice' must be a non-empty list of non-empty strings" in err
    assert [json.loads(line)["answer"] for line in answers.read_text().splitlines()] == [chosen, matched]
    with pytest.raises(Gemma3VLError, match="give one of json_schema, regex, choice and grammar"):
        model.generate("Answer me", regex="a", choice=["b"])
    with pytest.raises(Gemma3VLError, match="xgrammar cannot use this regular expression"):
        model.generate("Answer me", regex="(")


def test_generate_flags_regex_and_choice(runtime, tmp_path, capsys):
    """``generate --choice`` (repeated) and ``--regex``: the Python API's answers; ``--batch`` lines take the flag as
    their default; a regular expression xgrammar cannot use is one error before the model loads."""
    from gemma3vl.api import Model
    from gemma3vl.cli import main

    model = Model(runtime)
    common = ["generate", str(runtime.model_dir), "--prompt", "Answer me", "--greedy", "--device", "cpu",
              "--max-new-tokens", str(MAX_TOKENS)]
    assert main([*common, *[flag for choice in CHOICES for flag in ("--choice", choice)]]) == 0
    chosen = capsys.readouterr().out.strip()
    assert chosen == model.generate("Answer me", greedy=True, max_new_tokens=MAX_TOKENS, choice=CHOICES)
    assert main([*common, "--regex", r"[0-9]{3}-[a-z]{2}"]) == 0
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", capsys.readouterr().out.strip())
    assert main([*common, "--regex", "("]) == 2
    assert "--regex '(': xgrammar cannot use this regular expression" in capsys.readouterr().err
    source, answers = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"prompt": "Answer me", "greedy": True}) + "\n")
    assert main(["generate", str(runtime.model_dir), "--batch", str(source), "--output", str(answers),
                 "--max-new-tokens", str(MAX_TOKENS), "--device", "cpu",
                 *[flag for choice in CHOICES for flag in ("--choice", choice)]]) == 0
    assert json.loads(answers.read_text())["answer"] == chosen
