"""``gemma3vl generate --batch``: JSONL prompts in, JSONL answers out, each answer equal to ``generate`` on
its prompt alone; bad lines reported as FILE:LINE and skipped. The lines run on the continuous-batching engine
(``infer/engine.py``): they join as slots free, whatever their sampling settings.

The oracle is our ``generate`` on one unpadded prompt (itself checked against transformers' ``generate`` in
``test_generate_engine.py``), on the tiny fp32 model."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from gemma3vl.cli import main
from gemma3vl.infer import batch as batch_module
from gemma3vl.infer import engine as engine_module
from gemma3vl.infer.completion import Row
from gemma3vl.infer.engine import ContinuousBatcher
from gemma3vl.infer.generate import Sampling, generate
from gemma3vl.infer.prompt import build_inputs, load_image
from gemma3vl.infer.runtime import InferenceRuntime
from gemma3vl.pictures import draw_picture
from gemma3vl.tiny import write_tiny_checkpoint

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("batch") / "tiny")


@pytest.fixture(scope="module")
def runtime(model_dir):
    return InferenceRuntime.load(model_dir, device="cpu", dtype="float32")


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "pics").mkdir()
    draw_picture("red circle").save(tmp_path / "pics" / "circle.png")
    draw_picture("blue square").save(tmp_path / "pics" / "square.png")
    (tmp_path / "pics" / "broken.png").write_bytes(b"not a png")
    return tmp_path


def single(runtime, prompt, images=(), max_new_tokens=MAX_NEW_TOKENS, sampling=None):
    """(answer, tokens, finish_reason) of ``generate`` on one prompt, as `gemma3vl generate` builds it."""
    inputs = build_inputs(runtime.processor, runtime.config, prompt, [load_image(p) for p in images])
    stop = set(runtime.config.stop_token_ids)
    sampling = sampling or Sampling(max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop))
    tokens = generate(runtime.model, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                      pixel_values=inputs.get("pixel_values"), sampling=sampling)[0]
    text = runtime.tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=True)
    return text, len(tokens), "stop" if tokens[-1] in stop else "length"


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")


def test_batch_answers_equal_generate_and_bad_lines_are_skipped(model_dir, runtime, workdir, capsys):
    pics = workdir / "pics"
    stop_answer = single(runtime, "Question number 0", max_new_tokens=12)[0]
    stop = next(stop_answer[i:i + 2] for i in range(1, len(stop_answer) - 1) if "\ufffd" not in stop_answer[i:i + 2])
    lines = [
        {"id": "a", "prompt": "What is it?", "images": ["pics/circle.png"]},
        {"prompt": "Describe the picture in detail please", "images": ["pics/square.png"], "max_new_tokens": 3},
        '{"prompt": ',
        "",
        {"prompt": "hi"},
        {"prompt": "x", "images": ["pics/missing.png"]},
        {"prompt": "x", "max_tokens": 5},
        {"id": 7, "prompt": "Two pictures", "images": ["pics/circle.png", "pics/square.png"]},
        {"prompt": 5},
        {"prompt": "Question number 0", "stop": stop, "max_new_tokens": 12},
        {"prompt": "Tell me a story", "temperature": 0.9, "seed": 3},
        {"prompt": "x", "images": ["pics/broken.png"]},
        {"prompt": "x", "top_p": 2},
        {"id": "unseeded", "prompt": "Any story", "temperature": 0.7},
    ]
    prompts, answers = workdir / "prompts.jsonl", workdir / "out" / "answers.jsonl"
    write_jsonl(prompts, lines)
    code = main(["generate", str(model_dir), "--batch", str(prompts), "--output", str(answers), "--batch-size", "2",
                 "--greedy", "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1  # some lines were skipped
    for number, reason in [(3, "not valid JSON"), (6, "missing.png: no such image file"),
                           (7, "unknown key(s) 'max_tokens'"), (9, "'prompt' (a string) is required"),
                           (12, "broken.png: not a readable image"), (13, "'top_p' must be a number in (0, 1]")]:
        reported = [line for line in err.splitlines() if line.startswith(f"{prompts}:{number}: ")]
        assert len(reported) == 1 and reason in reported[0], (number, err)
    assert "answered 7 prompt(s), skipped 6 bad line(s)" in err
    assert "generate" in err and "prompt" in err and "100%" in err  # the progress bar

    sampled = Sampling(max_new_tokens=MAX_NEW_TOKENS, greedy=False, temperature=0.9,
                       top_k=runtime.generation_defaults["top_k"], top_p=runtime.generation_defaults["top_p"], seed=3,
                       stop_token_ids=runtime.config.stop_token_ids)
    expected = [
        ({"id": "a"}, "What is it?", single(runtime, "What is it?", [pics / "circle.png"])),
        ({"index": 1}, "Describe the picture in detail please",
         single(runtime, "Describe the picture in detail please", [pics / "square.png"], max_new_tokens=3)),
        ({"index": 4}, "hi", single(runtime, "hi")),
        ({"id": 7}, "Two pictures", single(runtime, "Two pictures", [pics / "circle.png", pics / "square.png"])),
        ({"index": 9}, "Question number 0", (stop_answer[: stop_answer.find(stop)], None, "stop")),
        ({"index": 10}, "Tell me a story", single(runtime, "Tell me a story", sampling=sampled)),
    ]
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    unseeded = records.pop()  # sampled from torch's global generator: no solo answer to compare with
    assert unseeded["id"] == "unseeded" and 1 <= unseeded["tokens"] <= MAX_NEW_TOKENS
    assert len(records) == len(expected)
    for record, (key, prompt, (answer, tokens, finish)) in zip(records, expected):
        assert set(record) == {*key, "prompt", "answer", "tokens", "finish_reason"}
        assert {k: record[k] for k in key} == key
        assert (record["prompt"], record["answer"], record["finish_reason"]) == (prompt, answer, finish)
        if tokens is not None:
            assert record["tokens"] == tokens
    assert records[4]["tokens"] < 12  # stopped by the stop string, not the limit
    assert sorted(p.name for p in answers.parent.iterdir()) == ["answers.jsonl"]  # no partial file left


def test_an_interrupted_run_keeps_the_answers_so_far(runtime, workdir, monkeypatch):
    from gemma3vl.infer.batch import BatchDefaults, run_batch_file

    prompts, answers = workdir / "prompts.jsonl", workdir / "answers.jsonl"
    write_jsonl(prompts, [{"prompt": f"Question number {i}"} for i in range(3)])
    step = ContinuousBatcher.step

    def interrupt_once_line_3_runs(engine):
        if any(item.line == 3 for item in engine.tags()):  # lines 1 and 2 have left their slots
            raise KeyboardInterrupt
        return step(engine)

    monkeypatch.setattr(ContinuousBatcher, "step", interrupt_once_line_3_runs)
    messages: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_batch_file(runtime, prompts, answers, defaults=BatchDefaults(max_new_tokens=3, greedy=True), batch_size=2,
                       progress=False, report=messages.append)
    assert not answers.exists()
    kept = [json.loads(line) for line in (workdir / "answers.jsonl.partial").read_text().splitlines()]
    assert [record["index"] for record in kept] == [0, 1]
    assert kept[0]["answer"] == single(runtime, "Question number 0", max_new_tokens=3)[0]
    assert messages == [f"stopped early: the answers so far are in {workdir / 'answers.jsonl.partial'}"]


def test_lines_join_as_slots_free_and_mixed_settings_share_the_engine(model_dir, runtime, workdir, monkeypatch):
    """``--batch-size 2`` over lines of different lengths, with images, greedy / seeded / unseeded sampling: lines
    join the running engine (and grow its rows: ROW_LENGTH_STEP is 1 here) next to rows with other settings, and
    each greedy or seeded answer is still its solo ``generate``."""
    pics = workdir / "pics"
    monkeypatch.setattr(engine_module, "ROW_LENGTH_STEP", 1)
    seen: dict[str, list] = {"joined": [], "grew": []}
    add, grow = ContinuousBatcher.add, ContinuousBatcher.grow

    def spy_add(engine, row, sampling, tag=None):
        seen["joined"].append((tag.line, [other.line for other in engine.tags()], sampling.greedy))
        return add(engine, row, sampling, tag)

    def spy_grow(engine, max_length):
        seen["grew"].append((engine.max_length, max_length, engine.active))
        return grow(engine, max_length)

    monkeypatch.setattr(ContinuousBatcher, "add", spy_add)
    monkeypatch.setattr(ContinuousBatcher, "grow", spy_grow)
    lines = [
        {"prompt": "hi", "max_new_tokens": 2},
        {"prompt": "Tell me a long story about a blue square", "temperature": 1.2, "top_k": 20, "seed": 5,
         "max_new_tokens": 14},
        {"prompt": "What is in this picture?", "images": ["pics/circle.png"], "max_new_tokens": 9},
        {"prompt": "Describe both pictures in detail", "images": ["pics/circle.png", "pics/square.png"],
         "greedy": True, "max_new_tokens": 12},
        {"prompt": "Any story", "temperature": 0.8, "max_new_tokens": 4},
        {"prompt": "Question number 3", "seed": 9, "top_p": 0.9, "max_new_tokens": 7},
    ]
    prompts, answers = workdir / "prompts.jsonl", workdir / "answers.jsonl"
    write_jsonl(prompts, lines)
    assert main(["generate", str(model_dir), "--batch", str(prompts), "--output", str(answers), "--batch-size", "2",
                 "--greedy", "--device", "cpu"]) == 0
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [record["index"] for record in records] == list(range(len(lines)))

    for number, (line, record) in enumerate(zip(lines, records)):
        if "temperature" in line and "seed" not in line:  # unseeded: its draws depend on the run; only sanity
            assert 1 <= record["tokens"] <= line["max_new_tokens"] and record["finish_reason"] in ("stop", "length")
            continue
        sampled = "seed" in line
        sampling = runtime.sampling(max_new_tokens=line["max_new_tokens"], greedy=not sampled,
                                    temperature=line.get("temperature"), top_k=line.get("top_k"),
                                    top_p=line.get("top_p"), seed=line.get("seed"))
        assert sampling.greedy != sampled
        expected = single(runtime, line["prompt"], [pics / p.split("/")[1] for p in line.get("images", [])],
                          sampling=sampling)
        assert (record["answer"], record["tokens"], record["finish_reason"]) == expected, number

    joined_running = [(line, others) for line, others, _ in seen["joined"] if others]
    assert len(joined_running) >= 3, seen  # lines took slots others had left, while those others ran
    greedy_of = {line: greedy for line, _, greedy in seen["joined"]}
    assert any(greedy_of[other] != greedy for _, others, greedy in seen["joined"] for other in others), seen
    assert any(active for _, _, active in seen["grew"]), seen  # grew with rows in progress


def test_growing_the_engine_keeps_rows_in_progress(runtime):
    """``ContinuousBatcher.grow`` from rows shorter than the sliding window (8 on the tiny model: the ring was
    ``max_length`` long) to rows longer than it: the row in progress ends with its solo answer, and a longer row
    that joins after the growth gets its own."""
    greedy = runtime.sampling(max_new_tokens=1, greedy=True)
    short = runtime.encode_prompt("a b", [], raw=True)  # its answer depends on every earlier token
    long = runtime.encode_prompt("What is in this picture, please tell me", [draw_picture("red circle")])
    assert short.length + 4 < 8 and long.length > 8
    engine = ContinuousBatcher(runtime.model, runtime.tokenizer, slots=2, max_length=short.length + 4)
    done = {}
    engine.add(Row(prompt=short, max_new_tokens=4, on_finish=lambda c: done.__setitem__("short", c)), greedy)
    engine.step()
    engine.step()
    engine.grow(long.length + 10)
    assert engine.max_length == long.length + 10 and engine.active == 1
    engine.add(Row(prompt=long, max_new_tokens=10, on_finish=lambda c: done.__setitem__("long", c)), greedy)
    while engine.active:
        engine.step()
    for name, prompt, limit in (("short", short, 4), ("long", long, 10)):
        tokens = generate(runtime.model, prompt.input_ids[None], pixel_values=prompt.pixel_values,
                          sampling=replace(greedy, max_new_tokens=limit))[0]
        assert done[name].token_ids == tokens, name


def test_a_clean_file_exits_0_and_batch_size_does_not_change_answers(model_dir, workdir, capsys):
    lines = [{"prompt": p, "images": ["pics/circle.png"] if i % 2 else []}
             for i, p in enumerate(["a", "What is in this picture, please?", "hello there", "Which colour?", "x y z"])]
    prompts = workdir / "prompts.jsonl"
    write_jsonl(prompts, lines)
    outputs = []
    for batch_size in ("1", "4"):
        out = workdir / f"answers-{batch_size}.jsonl"
        assert main(["generate", str(model_dir), "--batch", str(prompts), "--output", str(out), "--greedy",
                     "--max-new-tokens", "5", "--batch-size", batch_size, "--device", "cpu"]) == 0
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 5
    assert "skipped 0 bad line(s)" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    ([], "--batch needs --output FILE.jsonl"),
    (["--output", "o.jsonl", "--prompt", "hi"], "drop --prompt / --image"),
    (["--output", "o.jsonl", "--stream"], "--stream does not go with --batch"),
])
def test_batch_flag_misuse_is_a_clear_error(model_dir, workdir, capsys, extra, message):
    prompts = workdir / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": "hi"}])
    assert main(["generate", str(model_dir), "--batch", str(prompts), *extra]) == 2
    assert message in capsys.readouterr().err


def test_generate_needs_a_prompt_or_a_batch(model_dir, workdir, capsys):
    assert main(["generate", str(model_dir)]) == 2
    assert "give --prompt TEXT (or --batch FILE.jsonl --output FILE.jsonl)" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "--batch", str(workdir / "none.jsonl"), "--output", "o.jsonl"]) == 2
    assert "none.jsonl: no such prompts file" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "--prompt", "hi", "--output", "o.jsonl"]) == 2
    assert "--output and --batch-size go with --batch" in capsys.readouterr().err


def test_batch_compile_reaches_the_engine(model_dir, workdir, capsys, monkeypatch):
    seen = []
    real = engine_module.ContinuousBatcher

    def recording(*args, **kwargs):
        seen.append(kwargs.get("compile"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "ContinuousBatcher", recording)
    prompts = workdir / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": "hello"}, {"prompt": "What is in this picture?", "images": ["pics/circle.png"]}])
    outputs = []
    for extra in ([], ["--compile"]):
        out = workdir / f"answers{len(extra)}.jsonl"
        assert main(["generate", str(model_dir), "--batch", str(prompts), "--output", str(out), "--greedy",
                     "--max-new-tokens", "4", "--device", "cpu", *extra]) == 0
        outputs.append(out.read_text())
    assert seen == [False, True]
    assert outputs[0] == outputs[1]  # on the CPU --compile changes nothing but the note
    assert "--compile: ignored on cpu" in capsys.readouterr().err


def test_batch_compile_failure_decodes_eagerly(model_dir, workdir, capsys, request):
    prompts = workdir / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": "hello"}, {"prompt": "Which colour?"}])
    outputs = []
    for extra in ([], ["--compile"]):
        if extra:
            attempts = request.getfixturevalue("failing_compiler")
        out = workdir / f"answers{len(extra)}.jsonl"
        assert main(["generate", str(model_dir), "--batch", str(prompts), "--output", str(out), "--greedy",
                     "--max-new-tokens", "4", "--device", "cpu", *extra]) == 0
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]
    assert attempts == [2]  # the engine's warm-up (a slot per line) tried once, then eager for good
    assert capsys.readouterr().err.count("compiling the decode step failed (RuntimeError: no triton); decoding "
                                         "eagerly") == 1


def test_a_byte_order_mark_and_unicode_line_separators_keep_every_line(runtime, workdir):
    # Windows editors write a BOM; a JSON string may hold U+2028 / U+0085 as is (json.dumps(ensure_ascii=False)),
    # and only "\n" ends a JSONL line (str.splitlines would split there and shift every later line number).
    prompts = workdir / "prompts.jsonl"
    lines = [json.dumps({"prompt": "first"}), json.dumps({"prompt": "a\u2028b\x85c", "id": "sep"}, ensure_ascii=False),
             "{bad", json.dumps({"prompt": "last"})]
    prompts.write_text("\ufeff" + "\r\n".join(lines) + "\r\n", encoding="utf-8")
    errors = []
    items, bad = batch_module.read_batch_file(prompts, batch_module.BatchDefaults(), runtime, errors.append)
    assert [(item.line, item.prompt) for item in items] == [(1, "first"), (2, "a\u2028b\x85c"), (4, "last")]
    assert bad == 1 and len(errors) == 1 and errors[0].startswith(f"{prompts}:3: not valid JSON")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_sampling_values_are_bad_lines(runtime, workdir, value):
    prompts = workdir / "prompts.jsonl"
    prompts.write_text(f'{{"prompt": "hi", "temperature": {value}}}\n{{"prompt": "hi", "top_p": {value}}}\n')
    errors = []
    items, bad = batch_module.read_batch_file(prompts, batch_module.BatchDefaults(), runtime, errors.append)
    assert items == [] and bad == 2, errors


def test_lines_that_would_fail_past_parsing_are_bad_lines(runtime, workdir):
    """What used to end the whole run with a traceback is a bad line: a lone surrogate (a JSON ``\\ud800`` escape:
    the tokenizer and the UTF-8 answers file refuse it) in the prompt, the id or a stop string, JSON nested deeper
    than Python's parser goes, an integer of more digits than Python converts or too large for a float, a seed no
    ``torch.Generator`` takes. A surrogate pair is a character, and fine."""
    prompts = workdir / "prompts.jsonl"
    lines = ['{"prompt": "a \\ud800 b"}', '{"prompt": "hi", "id": "\\udfff"}', '{"prompt": "hi", "stop": ["x", "\\udc80"]}',
             '{"prompt": "hi", "id": ' + "[" * 100_000 + "]" * 100_000 + "}",
             '{"prompt": "hi", "id": ' + "1" * 5000 + "}", '{"prompt": "hi", "temperature": 1' + "0" * 400 + "}",
             json.dumps({"prompt": "hi", "temperature": 1.0, "seed": 2**64}), json.dumps({"prompt": "hi", "seed": -1}),
             '{"prompt": "a \\ud83d\\ude00 b"}']
    prompts.write_text("\n".join(lines) + "\n")
    errors = []
    items, bad = batch_module.read_batch_file(prompts, batch_module.BatchDefaults(), runtime, errors.append)
    assert [(item.line, item.prompt) for item in items] == [(8, "hi"), (9, "a \U0001f600 b")]
    assert bad == 7 and [error.split(": ", 1)[0] for error in errors] == [f"{prompts}:{n}" for n in range(1, 8)]
    assert all("lone surrogate" in error for error in errors[:3]), errors
    assert "nested too deeply" in errors[3] and "4300 digits" in errors[4]
    assert "'temperature' must be a finite number" in errors[5] and f"seed={2**64} must be an integer" in errors[6]


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    (["--temperature", "-1"], "--temperature -1.0 must be > 0"),
    (["--temperature", "nan"], "--temperature nan must be a finite number"),
    (["--top-p", "2"], "--top-p 2.0 must be in (0, 1]"),
    (["--top-k", "0"], "--top-k 0 must be >= 1"),
    (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
    (["--seed", str(2**64)], f"--seed {2**64} must be an integer from -{2**63} to {2**64 - 1}"),
    (["--output", "{workdir}"], "is a directory (--output names the answers file"),
    (["--output", "{workdir}/prompts.jsonl/answers.jsonl"], "prompts.jsonl is a file, not a directory"),
])
def test_bad_flags_and_outputs_are_one_error_before_loading(model_dir, workdir, capsys, monkeypatch, flags, message):
    # Not every line skipped as bad (exit 1) or a traceback once every line is answered: one error, exit 2,
    # before the model is loaded.
    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(InferenceRuntime, "load", no_loading)
    prompts = workdir / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": "hi"}, {"prompt": "there"}])
    flags = [flag.format(workdir=workdir) for flag in flags]
    output = [] if "--output" in flags else ["--output", str(workdir / "answers.jsonl")]
    assert main(["generate", str(model_dir), "--batch", str(prompts), *output, *flags, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(workdir.glob("answers.jsonl*"))
