"""`gemma3vl eval` at scale: answers from the continuous-batching engine equal the fixed-batch path's and each row's
solo `generate`; every answer is in OUT/answers.jsonl.partial the moment it exists; a run killed part-way resumes
(`--resume`) to the report an uninterrupted run writes, generating only what was missing; a resume against other
settings is refused, naming them; the rows are read and their images decoded a few at a time.

Tiny random fp32 models (as tests/test_eval_run.py), or the table-answering fake runtime of
tests/test_eval_hardening.py where no model is needed."""

from __future__ import annotations

import io
import json
import os
import random
import re
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gemma3vl.cli import main
from gemma3vl.data.images import ImageLoader
from gemma3vl.evaluation import runner
from gemma3vl.evaluation.layouts import ExampleFile
from gemma3vl.infer.engine import ContinuousBatcher
from gemma3vl.infer.generate import generate
from gemma3vl.infer.runtime import InferenceRuntime
from gemma3vl.tiny import write_tiny_checkpoint
from test_eval_hardening import ANSWERS, FakeRuntime
from test_eval_hardening import write_vqa as write_fake_vqa
from test_eval_run import png

QUESTIONS = ["Hi?", "What colour is the sky today over the sea?", "Count?", "Is fire hot, and is ice cold? Say more."]


def write_vqa(path, count: int):
    """``count`` VQA rows whose prompts differ in length (so the engine's rows do too)."""
    rows = [{"question_id": f"q{i}", "image": {"bytes": png(i), "path": None},
             "question": QUESTIONS[i % 4] + " x" * (i % 5), "answers": ["a"] * 10} for i in range(count)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-scale")
    return write_tiny_checkpoint(root / "a", seed=0), write_tiny_checkpoint(root / "b", seed=1)


@pytest.fixture(scope="module")
def stop_id(models):
    """A token the tiny model writes a few tokens into some answers: made a stop token, answers end at different
    steps (a random model otherwise always runs to max_new_tokens), so slots free and refill mid-run."""
    runtime = InferenceRuntime.load(models[0], device="cpu", dtype="float32")
    found = runner.read_examples(write_vqa(models[0].parent / "probe.parquet", 1))
    source = found.source.example(0)
    from gemma3vl.infer.completion import Row
    from gemma3vl.infer.conversation import Turn

    image = ImageLoader().load(source.turns[0].content[0], source.base_dir, source.source)
    prompt = runtime.encode_conversation([Turn("user", [image, source.turns[0].content[1]])])
    (completion,) = runtime.complete([Row(prompt=prompt, max_new_tokens=12)],
                                     runtime.sampling(max_new_tokens=12, greedy=True))
    return completion.token_ids[4]


@pytest.fixture
def early_stops(monkeypatch, stop_id):
    real = InferenceRuntime.sampling

    def sampling(self, **settings):
        chosen = real(self, **settings)
        return replace(chosen, stop_token_ids=tuple(chosen.stop_token_ids) + (stop_id,))

    monkeypatch.setattr(InferenceRuntime, "sampling", sampling)


def test_continuous_answers_equal_the_fixed_batch_path_and_each_row_alone(models, early_stops, tmp_path):
    data = write_vqa(tmp_path / "vqa.parquet", 10)
    examples = [ExampleFile(data).example(i) for i in range(10)]
    runtime = InferenceRuntime.load(models[0], device="cpu", dtype="float32")
    settings = dict(max_new_tokens=16, progress=False)
    fixed, _ = runner.answer_examples(runtime, examples, batch_size=4, continuous=False, **settings)  # before
    continuous, _ = runner.answer_examples(runtime, examples, batch_size=3, continuous=True, **settings)
    assert continuous == fixed
    assert len({len(answer) for answer in continuous}) > 2  # answers did end at different steps

    # the oracle: generate on each prompt alone
    from gemma3vl.infer.conversation import Turn

    sampling = runtime.sampling(max_new_tokens=16, greedy=True)
    for example, answer in zip(examples, continuous):
        image = ImageLoader().load(example.turns[0].content[0], example.base_dir, example.source)
        prompt = runtime.encode_conversation([Turn("user", [image, example.turns[0].content[1]])])
        tokens = generate(runtime.model, prompt.input_ids[None], pixel_values=prompt.pixel_values, sampling=sampling)[0]
        # (the answer's text is its tokens decoded without the stop token, as `gemma3vl generate` prints it)
        stop = set(sampling.stop_token_ids)
        alone = runtime.tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=True).strip()
        assert answer == alone

    # and `gemma3vl eval` writes those answers
    out = tmp_path / "out"
    assert main(["eval", str(models[0]), "--data", str(data), "--out", str(out), "--max-new-tokens", "16",
                 "--batch-size", "3", "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["prediction"] for line in lines] == fixed
    assert not (out / "answers.jsonl.partial").exists() and (out / "eval_run.json").is_file()


class Killed(BaseException):
    """The process dies here (as under SIGKILL: nothing after it runs but ``finally`` blocks)."""


def count_calls(monkeypatch, owner, name):
    calls = []
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def without_times(report):
    for key in ("model", "compare"):
        if key in report:
            report[key].pop("seconds")
            # PIL names the unreadable BytesIO by its address, which differs from run to run
            report[key]["failures"] = [re.sub(r" at 0x[0-9a-f]+", "", failure) for failure in report[key]["failures"]]
    return report


def test_a_killed_run_resumes_to_the_uninterrupted_report(models, early_stops, tmp_path, monkeypatch):
    data = write_vqa(tmp_path / "vqa.parquet", 7)
    command = ["eval", str(models[0]), "--compare", str(models[1]), "--data", str(data), "--max-new-tokens", "12",
               "--batch-size", "3", "--device", "cpu"]
    whole = tmp_path / "whole"
    assert main(command + ["--out", str(whole)]) == 0

    # killed after the first model's third answer ...
    out = tmp_path / "out"
    real_answer = runner.AnswerLog.answer

    def dies_after(limit):
        def answer(self, row, text):
            real_answer(self, row, text)
            if len(self.predictions) == limit and self.path.name == "answers.jsonl.partial":
                raise Killed
        return answer

    monkeypatch.setattr(runner.AnswerLog, "answer", dies_after(3))
    with pytest.raises(Killed):
        main(command + ["--out", str(out)])
    partial = [json.loads(line) for line in (out / "answers.jsonl.partial").read_text().splitlines()]
    assert len(partial) == 3 and not (out / "report.json").exists()
    whole_lines = [json.loads(line) for line in (whole / "predictions.jsonl").read_text().splitlines()]
    for line in partial:  # each answer with its row: the uninterrupted run's answer to that row
        assert line["source"] == f"{data}:row {line['row']}" and line["id"] == f"q{line['row']}"
        assert line["prediction"] == whole_lines[line["row"]]["prediction"]
    with open(out / "answers.jsonl.partial", "a") as stream:  # a line cut short by the kill
        stream.write('{"row": 6, "id": "q6", "pred')

    # ... then resumed: the 4 missing answers of the first model, the 7 of the second, nothing twice
    monkeypatch.setattr(runner.AnswerLog, "answer", real_answer)
    added = count_calls(monkeypatch, ContinuousBatcher, "add")
    assert main(command + ["--out", str(out), "--resume"]) == 0
    assert len(added) == 4 + 7
    for name in ("predictions.jsonl", "compare_predictions.jsonl", "eval_run.json"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    assert without_times(json.loads((out / "report.json").read_text())) == \
        without_times(json.loads((whole / "report.json").read_text()))
    assert not (out / "answers.jsonl.partial").exists() and not (out / "compare_answers.jsonl.partial").exists()

    # killed in the second model's generation: the resume does not even load the first model
    again = tmp_path / "again"
    real_compare = runner.AnswerLog.answer

    def dies_in_compare(self, row, text):
        real_compare(self, row, text)
        if self.path.name == "compare_answers.jsonl.partial" and len(self.predictions) == 2:
            raise Killed

    monkeypatch.setattr(runner.AnswerLog, "answer", dies_in_compare)
    with pytest.raises(Killed):
        main(command + ["--out", str(again)])
    monkeypatch.setattr(runner.AnswerLog, "answer", real_compare)
    loads = count_calls(monkeypatch, InferenceRuntime, "load")
    added.clear()
    assert main(command + ["--out", str(again), "--resume"]) == 0
    assert [str(call[0]) for call in loads] == [str(models[1])] and len(added) == 5
    assert (again / "compare_predictions.jsonl").read_bytes() == (whole / "compare_predictions.jsonl").read_bytes()
    assert without_times(json.loads((again / "report.json").read_text())) == \
        without_times(json.loads((whole / "report.json").read_text()))


# ------------------------------------------------------------------------------------------- without a model
@pytest.fixture
def fake(monkeypatch, tmp_path):
    batches: list[int] = []
    monkeypatch.setattr(InferenceRuntime, "load", classmethod(lambda cls, *a, **k: FakeRuntime(batches)))
    (tmp_path / "model").mkdir()
    return tmp_path / "model", batches


def interrupted_run(fake, data, out, monkeypatch, after_batches=2):
    """Ctrl-C at the third batch of 2: 4 rows answered."""
    model_dir, batches = fake
    batches.clear()
    real = FakeRuntime.complete

    def stopped(self, rows, sampling):
        if len(self.batches) == after_batches:
            raise KeyboardInterrupt
        return real(self, rows, sampling)

    monkeypatch.setattr(FakeRuntime, "complete", stopped)
    assert main(["eval", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "2"]) == 130
    monkeypatch.setattr(FakeRuntime, "complete", real)


def test_resume_is_refused_for_another_run_and_without_one(fake, tmp_path, monkeypatch, capsys):
    model_dir, batches = fake
    data = write_fake_vqa(tmp_path / "vqa.parquet", [list(ANSWERS)[i % 3] for i in range(7)])
    out = tmp_path / "out"
    base = ["eval", str(model_dir), "--data", str(data), "--out", str(out)]

    assert main(base + ["--resume"]) == 2  # nothing there yet
    assert f"--resume: {out} holds no unfinished eval run" in capsys.readouterr().err
    interrupted_run(fake, data, out, monkeypatch)
    assert len((out / "answers.jsonl.partial").read_text().splitlines()) == 4
    err = capsys.readouterr().err
    assert "--resume answers the rest" in err

    other_model = tmp_path / "other-model"
    other_model.mkdir()
    other_data = write_fake_vqa(tmp_path / "other.parquet", [list(ANSWERS)[i % 3] for i in range(7)])
    for command, named in [
        (["eval", str(other_model), "--data", str(data), "--out", str(out)], f"MODEL_DIR {other_model.resolve()} (the "
                                                                             f"first run: {model_dir.resolve()})"),
        (base + ["--max-new-tokens", "5"], "--max-new-tokens 5 (the first run: 32)"),
        (["eval", str(model_dir), "--data", str(other_data), "--out", str(out)], f"--data {other_data.resolve()}"),
        (base + ["--limit", "3"], "--limit 3 (the first run: not given)"),
        (base + ["--dtype", "bfloat16"], "--dtype bfloat16 (the first run: auto)"),
    ]:
        batches.clear()
        assert main(command + ["--resume"]) == 2
        err = capsys.readouterr().err
        assert "this run is not the unfinished one" in err and named in err, err
        assert batches == []
    # the data file rewritten since: its size / time changed
    write_fake_vqa(data, [list(ANSWERS)[i % 3] for i in range(7)] + ["Unknown?"])
    assert main(base + ["--resume"]) == 2
    assert f"the files of --data {data.resolve()} changed since the first run (vqa.parquet)" in capsys.readouterr().err
    write_fake_vqa(data, [list(ANSWERS)[i % 3] for i in range(7)])
    settings = json.loads((out / "eval_run.json").read_text())
    settings["data_files"] = runner._files_of(data, out.resolve())
    (out / "eval_run.json").write_text(json.dumps(settings))

    # a new run without --resume does not silently throw the unfinished one away
    assert main(base) == 2
    assert "add --resume to continue it" in capsys.readouterr().err
    batches.clear()
    assert main(base + ["--resume", "--batch-size", "3"]) == 0  # the batch size may change
    assert sum(batches) == 3  # the 3 rows not answered before
    assert "resuming: 4 of 7 examples already done" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] is False and report["examples_scored"] == 7
    assert report["model"]["scores"]["exact_match"] == 1.0
    # a complete run: nothing to resume; run again without --resume, it is overwritten (as before)
    assert main(base + ["--resume"]) == 2
    assert "the run there is complete" in capsys.readouterr().err
    assert main(base) == 0


def test_failures_are_kept_across_a_resume(fake, tmp_path, monkeypatch):
    model_dir, batches = fake
    data = write_fake_vqa(tmp_path / "vqa.parquet", [list(ANSWERS)[i % 3] for i in range(7)], bad_image_at=(1, 5))
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert main(["eval", str(model_dir), "--data", str(data), "--out", str(whole), "--batch-size", "2"]) == 0
    interrupted_run(fake, data, out, monkeypatch)
    logged = [json.loads(line) for line in (out / "answers.jsonl.partial").read_text().splitlines()]
    assert [line["row"] for line in logged if "failure" in line] == [1, 5] and len(logged) == 6
    assert main(["eval", str(model_dir), "--data", str(data), "--out", str(out), "--resume"]) == 0
    assert (out / "predictions.jsonl").read_bytes() == (whole / "predictions.jsonl").read_bytes()
    assert without_times(json.loads((out / "report.json").read_text())) == \
        without_times(json.loads((whole / "report.json").read_text()))


@pytest.mark.parametrize("every_s", [0.0, 3600.0])
def test_the_answers_file_is_fsynced_at_its_pace_and_when_the_run_ends(fake, tmp_path, monkeypatch, every_s):
    """Flushed at every answer (a killed process loses nothing); fsynced every ``SYNC_EVERY_S`` seconds (0: at every
    answer) and once more at the end, so a machine that goes down loses at most that much; the 7 rows' answers and
    failures are in the file by the last fsync."""
    model_dir, _ = fake
    data = write_fake_vqa(tmp_path / "vqa.parquet", [list(ANSWERS)[i % 3] for i in range(7)], bad_image_at=(1,))
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd):
        synced.append(len(Path(os.readlink(f"/proc/self/fd/{fd}")).read_text().splitlines()))
        real_fsync(fd)

    monkeypatch.setattr(runner, "SYNC_EVERY_S", every_s)
    monkeypatch.setattr(runner.os, "fsync", counting_fsync)
    interrupted_run(fake, data, tmp_path / "out", monkeypatch)  # Ctrl-C at the third batch
    lines = len((tmp_path / "out" / "answers.jsonl.partial").read_text().splitlines())
    assert lines == 5  # 4 answers, 1 failure
    assert synced == ([*range(1, lines + 1), lines] if every_s == 0 else [lines])


def noise_png(seed: int, size: int = 96) -> bytes:
    """An incompressible picture: its PNG is about size * size * 3 bytes."""
    rng = random.Random(seed)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_noise_vqa(path, count: int):
    rows = [{"question_id": f"q{i}", "image": {"bytes": noise_png(i), "path": None}, "question": "Is fire hot?",
             "answers": ["yes"]} for i in range(count)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=32)
    return path


def test_rows_are_read_and_images_decoded_a_few_at_a_time(models, tmp_path, monkeypatch):
    """With the real engine: when the first answer is written, only the first slots' images have been decoded."""
    data = write_vqa(tmp_path / "vqa.parquet", 24)
    decoded = count_calls(monkeypatch, ImageLoader, "load")
    seen_at_first_answer = []
    real_answer = runner.AnswerLog.answer

    def answer(self, row, text):
        if not seen_at_first_answer:
            seen_at_first_answer.append(len(decoded))
        real_answer(self, row, text)

    monkeypatch.setattr(runner.AnswerLog, "answer", answer)
    assert main(["eval", str(models[0]), "--data", str(data), "--out", str(tmp_path / "out"), "--max-new-tokens",
                 "3", "--batch-size", "4", "--device", "cpu"]) == 0
    assert seen_at_first_answer == [4] and len(decoded) == 24


def test_memory_does_not_grow_with_the_rows(fake, tmp_path):
    """Peak Python memory of a whole run (fake model): 4x the rows of 27 kB pictures, about the same peak. Before,
    every row's image bytes were held from the start to the end."""
    model_dir, _ = fake
    peaks = []
    for count in (48, 192):
        data = write_noise_vqa(tmp_path / f"vqa{count}.parquet", count)
        tracemalloc.start()
        try:
            assert main(["eval", str(model_dir), "--data", str(data), "--out", str(tmp_path / f"out{count}"),
                         "--batch-size", "4"]) == 0
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    images = 144 * len(noise_png(0))  # what the 144 more rows' pictures weigh
    assert peaks[1] - peaks[0] < images / 4, (peaks, images)


def test_limit_reads_only_the_rows_it_needs(fake, tmp_path, monkeypatch):
    model_dir, batches = fake
    lines = [json.dumps({"id": i, "image": f"p{i}.png", "question": "Is fire hot?", "answer": "yes"})
             for i in range(50)]
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"p{i}.png")
    (tmp_path / "vqa.jsonl").write_text("\n".join(lines) + "\n")
    from gemma3vl.data.sources import JsonlSource

    read = count_calls(monkeypatch, JsonlSource, "record")
    assert main(["eval", str(model_dir), "--data", str(tmp_path / "vqa.jsonl"), "--out", str(tmp_path / "out"),
                 "--limit", "3"]) == 0
    rows = sorted({call[1] for call in read})
    assert rows == [0, 1, 2] and len(read) == 1 + 3 + 3  # the columns (line 1), the check, the answers
    assert batches == [3]


def test_sigkill_leaves_every_answer_written_so_far(fake, tmp_path):
    """A real SIGKILL (no ``finally``, no exit handlers): the answers before it are in the partial file, whole;
    the resume finishes the run."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    model_dir, batches = fake
    data = write_fake_vqa(tmp_path / "vqa.parquet", [list(ANSWERS)[i % 3] for i in range(7)])
    out = tmp_path / "out"
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from gemma3vl.evaluation import runner
from gemma3vl.infer.runtime import InferenceRuntime
from test_eval_hardening import FakeRuntime
InferenceRuntime.load = classmethod(lambda cls, *a, **k: FakeRuntime([]))
real = runner.AnswerLog.answer
def answer(self, row, text):
    real(self, row, text)
    if len(self.predictions) == 5:
        os.kill(os.getpid(), signal.SIGKILL)
runner.AnswerLog.answer = answer
from gemma3vl.cli import main
main(["eval", {str(model_dir)!r}, "--data", {str(data)!r}, "--out", {str(out)!r}, "--batch-size", "2"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == -signal.SIGKILL, done.stderr
    lines = [json.loads(line) for line in (out / "answers.jsonl.partial").read_text().splitlines()]
    assert [line["row"] for line in lines] == [0, 1, 2, 3, 4]
    assert main(["eval", str(model_dir), "--data", str(data), "--out", str(out), "--resume"]) == 0
    assert sum(batches) == 2
    assert json.loads((out / "report.json").read_text())["examples_scored"] == 7


def test_compile_makes_one_fixed_engine_and_a_failed_compile_answers_eagerly(models, failing_compiler, tmp_path,
                                                                                 monkeypatch, capsys):
    """``eval --compile`` (the device pretends to compile, and every compiled step fails as a broken inductor
    would): one engine of ``--max-sequence-length`` rows, compiled (warm-up) before the first example and never
    grown; the failure is reported once and the answers are the eager ones; an example longer than the rows is
    reported and skipped; ``--max-sequence-length`` without ``--compile`` is refused."""
    data = write_vqa(tmp_path / "vqa.parquet", 4)
    eager_out, out = tmp_path / "eager", tmp_path / "compiled"
    common = ["--data", str(data), "--max-new-tokens", "8", "--batch-size", "2", "--device", "cpu"]
    assert main(["eval", str(models[0]), *common, "--out", str(eager_out)]) == 0
    engines = count_calls(monkeypatch, ContinuousBatcher, "__init__")
    assert main(["eval", str(models[0]), *common, "--out", str(out), "--compile"]) == 0
    err = capsys.readouterr().err
    assert len(engines) == 1 and failing_compiler  # one engine, whose warm-up tried the compiled step
    assert err.count("compiling the decode step failed (RuntimeError: no triton)") == 1
    predictions = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    eager = [json.loads(line)["prediction"] for line in (eager_out / "predictions.jsonl").read_text().splitlines()]
    assert predictions == eager
    short = tmp_path / "short"
    assert main(["eval", str(models[0]), *common, "--out", str(short), "--compile", "--max-sequence-length",
                 "64"]) == 0  # prompts of 48, 64, 54 and 77 tokens, each with 8 to answer
    report = json.loads((short / "report.json").read_text())
    assert len(report["model"]["failures"]) == 2 and "over --max-sequence-length 64" in report["model"]["failures"][0]
    assert main(["eval", str(models[0]), *common, "--out", str(tmp_path / "x"), "--max-sequence-length", "40"]) == 2
    assert "give --compile too" in capsys.readouterr().err
