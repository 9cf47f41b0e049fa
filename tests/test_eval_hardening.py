"""Bugs found by a hunt through `gemma3vl eval`, each pinned by a test that failed before its fix.

Metric cases are worked by hand. Runs use a fake runtime (``InferenceRuntime.load`` replaced) that answers each
question from a table, so that the runner, its files and its errors are tested in milliseconds without a model.
"""

from __future__ import annotations

import errno
import io
import json
import os
import unicodedata
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gemma3vl.cli import main
from gemma3vl.data.records import BadRecord
from gemma3vl.errors import Gemma3VLError
from gemma3vl.evaluation.layouts import ExampleFile
from gemma3vl.evaluation.metrics import anls, exact_match, score, token_f1, vqa_accuracy
from gemma3vl.evaluation.tree_edit import field_counts, parse_json_answer, ted_accuracy

NFD_CAFE = unicodedata.normalize("NFD", "Café")  # "Cafe" + U+0301 COMBINING ACUTE ACCENT
NFC_CAFE = unicodedata.normalize("NFC", "Café")


# ------------------------------------------------------------------------------------------- metrics
def test_canonically_equivalent_unicode_is_the_same_answer():
    """'é' as one code point (NFC) and as e + combining accent (NFD) is the same text; before, an NFD answer to
    an NFC reference scored 0 in exact match / VQA accuracy / token F1 and lost a character in ANLS."""
    assert NFD_CAFE != NFC_CAFE
    assert exact_match(NFD_CAFE, [NFC_CAFE]) == 1.0
    assert token_f1(f"le {NFD_CAFE} noir", [f"le {NFC_CAFE} noir"]) == 1.0
    assert vqa_accuracy(NFD_CAFE, [NFC_CAFE] * 10) == 1.0
    assert anls(NFD_CAFE, [NFC_CAFE]) == 1.0
    # receipts: values and keys
    assert ted_accuracy({"nm": NFD_CAFE}, {"nm": NFC_CAFE}) == 1.0
    assert field_counts({NFD_CAFE: "1"}, {NFC_CAFE: "1"}) == (1, 1, 1)
    # compatibility forms are not folded (no published script does): full-width digits are other characters
    assert exact_match("１２", ["12"]) == 0.0
    # non-Latin scripts go through unchanged
    assert exact_match("東京", ["東京"]) == 1.0 and anls("Москва", ["москва"]) == 1.0


def test_anls_threshold_edge_follows_the_rrc_script():
    # NL = 2/4 = 0.5 exactly: the RRC / DocVQA script keeps 1 - NL >= 0.5 (pix2struct: NL <= 0.5) -> 0.5 (the
    # paper's eq. 1 writes NL < 0.5); NL = 1/3 gives 2/3
    assert anls("abcd", ["abxy"]) == 0.5
    assert anls("abc", ["abx"]) == pytest.approx(2 / 3)
    # several acceptable answers: the best one counts; no references at all scores 0
    assert anls("1.00", ["$1.00", "1.00"]) == 1.0 and anls("x", []) == 0.0


def test_deeply_nested_json_answer_is_scored_not_a_crash():
    """A degenerate answer '{"a":{"a":...' a few hundred levels deep parsed (json accepts ~1000) and then raised
    RecursionError in the normal form / tree code, ending the whole run after generation."""
    for depth in (400, 900):
        answer = '{"a":' * depth + '"1"' + "}" * depth
        assert parse_json_answer(answer) is None
        assert score("ted_accuracy", [answer], [['{"a":"1"}']]) == 0.0
        assert score("field_f1", [answer], [['{"a":"1"}']]) == 0.0
    # an ordinary receipt is parsed as before
    receipt = '{"menu":[{"nm":"Latte","sub":[{"nm":"milk"}]}],"total":{"total_price":"4"}}'
    assert parse_json_answer(receipt)["total"] == {"total_price": "4"}
    assert score("ted_accuracy", [receipt], [[receipt]]) == 1.0


# ------------------------------------------------------------------------------------------- layouts
def png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40 % 256, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_rows_of_a_parquet_directory_are_named_by_their_own_file(tmp_path):
    """A directory of shards labelled rows '<directory>:row <index over all shards>': the file at fault was
    not named."""
    data = tmp_path / "data"
    data.mkdir()
    good = {"image": png(), "question": "q?", "answers": ["a"]}
    pq.write_table(pa.Table.from_pylist([good, good]), data / "test-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist([good, {**good, "image": None}]), data / "test-00001-of-00002.parquet")
    examples = ExampleFile(data, split="test")
    assert examples.example(1).source == f"{data / 'test-00000-of-00002.parquet'}:row 1"
    assert examples.example(2).source == f"{data / 'test-00001-of-00002.parquet'}:row 0"
    with pytest.raises(BadRecord, match=r"test-00001-of-00002\.parquet:row 1: 'image'"):
        examples.example(3)


def test_split_on_a_single_file_of_another_split_is_refused(tmp_path):
    """--split was silently ignored for a file: --data train-....parquet --split test scored the train set."""
    (tmp_path / "data").mkdir()
    train = tmp_path / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist([{"image": png(), "question": "q?", "answers": ["a"]}]), train)
    with pytest.raises(Gemma3VLError, match=r"--split test: .*train-00000-of-00001\.parquet is one file"):
        ExampleFile(train, split="test")
    assert len(ExampleFile(train, split="train")) == 1 and len(ExampleFile(train)) == 1


def test_missing_numeric_and_blank_answers(tmp_path):
    """pandas writes a numeric answer column with a gap as floats: 3.0 was scored as the text "3.0" (the model's
    "3" then scored 0), NaN as the reference "nan"; blank answers scored an empty prediction as correct; a NaN
    id was written as the invalid JSON token NaN."""
    rows = [{"question_id": 7.0, "image": png(), "question": "How many?", "answer": 3.0},
            {"question_id": float("nan"), "image": png(), "question": "How many?", "answer": float("nan")},
            {"question_id": float("nan"), "image": png(), "question": "How much?", "answer": 2.5}]
    path = tmp_path / "vqa.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    examples = ExampleFile(path)
    assert examples.example(0).references == ["3"] and examples.example(0).target == "3"
    with pytest.raises(BadRecord, match=r"vqa\.parquet:row 1: 'answer' must be a string"):
        examples.example(1)
    last = examples.example(2)
    assert last.references == ["2.5"] and last.id == 2  # no id: the row number
    from gemma3vl.evaluation.layouts import to_example

    for key, blank in (("answer", "  "), ("answers", ["", " "])):
        with pytest.raises(BadRecord, match=f"f:row 0: '{key}' holds no answer"):
            to_example({"image": png(), "question": "q?", key: blank}, "vqa", "f:row 0", 0, tmp_path)


def test_jsonl_whose_first_lines_are_all_unreadable_names_the_line(tmp_path):
    """Before: 'cannot tell the dataset layout from its columns []', naming no line."""
    path = tmp_path / "data.jsonl"
    path.write_text('not json\n[1, 2\n')
    with pytest.raises(Gemma3VLError, match=r"data\.jsonl:1: not valid JSON"):
        ExampleFile(path)


# ------------------------------------------------------------------------------------------- runs
ANSWERS = {"What colour is the sky?": "Blue.", "How many legs has a cat?": "four", "Is fire hot?": "yes"}


class FakeRuntime:
    """What run_eval asks of an InferenceRuntime, answering each question from ANSWERS."""

    context_length = 4096
    config = SimpleNamespace(is_vision_language=True)

    def __init__(self, batches: list[int]):
        self.batches = batches

    def describe(self) -> str:
        return "fake runtime"

    def sampling(self, *, max_new_tokens, greedy):
        return None

    def encode_conversation(self, turns):
        text = "".join(turn.text for turn in turns)
        return SimpleNamespace(length=8, text=text)

    def complete(self, rows, sampling):
        self.batches.append(len(rows))
        return [SimpleNamespace(text=" " + ANSWERS.get(row.prompt.text.split("\n")[0], "no idea") + " ")
                for row in rows]


@pytest.fixture
def fake_runtime(monkeypatch):
    from gemma3vl.infer.runtime import InferenceRuntime

    batches: list[int] = []
    monkeypatch.setattr(InferenceRuntime, "load", classmethod(lambda cls, *a, **k: FakeRuntime(batches)))
    return batches


def write_vqa(path, questions, bad_image_at=()):
    rows = [{"question_id": f"q{i}", "image": {"bytes": b"not an image" if i in bad_image_at else png(i), "path": None},
             "question": question, "answers": [ANSWERS.get(question, "x").rstrip(".").lower()] * 10}
            for i, question in enumerate(questions)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_answers_stay_in_input_order_whatever_the_batching(tmp_path, fake_runtime, model_dir):
    questions = [list(ANSWERS)[i % 3] if i % 4 else "Unknown?" for i in range(11)]
    data = write_vqa(tmp_path / "vqa.parquet", questions, bad_image_at=(5,))
    results = []
    for batch_size in (1, 3, 4, 16):
        out = tmp_path / f"out{batch_size}"
        assert main(["eval", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", str(batch_size)]) == 0
        lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        results.append([(line["id"], line["prediction"], line.get("scores")) for line in lines])
        report = json.loads((out / "report.json").read_text())
        assert report["examples"] == 11 and report["examples_scored"] == 10
        assert "row 5" in report["model"]["failures"][0]
    assert all(result == results[0] for result in results)
    ids, predictions, scores = zip(*results[0])
    assert list(ids) == [f"q{i}" for i in range(11)]
    assert predictions[5] is None and scores[5] is None
    assert predictions[1] == "four" and predictions[2] == "yes" and predictions[4] == "no idea"
    assert scores[3] == {"vqa_accuracy": 1.0, "anls": 0.8, "exact_match": 1.0}  # "Blue." vs "blue": NL = 1/5


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "model").mkdir()
    return tmp_path / "model"


def test_an_output_path_that_cannot_be_written_fails_before_generation(tmp_path, fake_runtime, model_dir, capsys):
    """Before, the run generated every answer and only then died with an IsADirectoryError / PermissionError
    traceback, the answers lost."""
    data = write_vqa(tmp_path / "vqa.parquet", list(ANSWERS))
    out = tmp_path / "out"
    (out / "predictions.jsonl").mkdir(parents=True)
    assert main(["eval", str(model_dir), "--data", str(data), "--out", str(out)]) == 2
    assert f"{out / 'predictions.jsonl'} is a directory" in capsys.readouterr().err
    assert fake_runtime == []  # nothing was generated


def test_a_failed_write_is_one_line_naming_the_file(tmp_path, fake_runtime, model_dir, capsys, monkeypatch):
    data = write_vqa(tmp_path / "vqa.parquet", list(ANSWERS))
    out = tmp_path / "out"
    import gemma3vl.evaluation.report as report_module

    real_replace = os.replace

    def disk_full(source, target):
        if str(target).endswith("report.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(report_module.os, "replace", disk_full)
    assert main(["eval", str(model_dir), "--data", str(data), "--out", str(out)]) == 2
    assert f"{out / 'report.json'}: cannot write (No space left on device)" in capsys.readouterr().err
    assert not (out / "report.json.partial").exists()


def test_a_run_where_no_example_could_be_answered_fails(tmp_path, fake_runtime, model_dir, capsys):
    """Before: exit 0 and a table of n/a."""
    data = write_vqa(tmp_path / "vqa.parquet", list(ANSWERS), bad_image_at=(0, 1, 2))
    out = tmp_path / "out"
    assert main(["eval", str(model_dir), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "none of the 3 examples could be answered" in err and "vqa.parquet:row 0" in err
    report = json.loads((out / "report.json").read_text())  # the failures are still written down
    assert report["examples_scored"] == 0 and len(report["model"]["failures"]) == 3


def test_an_interrupted_run_keeps_and_scores_what_was_answered(tmp_path, fake_runtime, model_dir, capsys,
                                                               monkeypatch):
    """Ctrl-C in the middle of generation threw every answer away (no file written); now the answers so far are
    written and scored, the report says it was interrupted, and the exit status is still 130."""
    data = write_vqa(tmp_path / "vqa.parquet", [list(ANSWERS)[i % 3] for i in range(7)])
    out = tmp_path / "out"
    real = FakeRuntime.complete

    def stopped_on_third_batch(self, rows, sampling):
        if len(self.batches) == 2:
            raise KeyboardInterrupt
        return real(self, rows, sampling)

    monkeypatch.setattr(FakeRuntime, "complete", stopped_on_third_batch)
    assert main(["eval", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "2"]) == 130
    assert "4 examples answered so far" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] is True and report["examples"] == 7 and report["examples_scored"] == 4
    assert report["model"]["scores"]["exact_match"] == 1.0 and "interrupted: 4 of 7" in report["notes"][0]
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["prediction"] is not None for line in lines] == [True] * 4 + [False] * 3
    assert all("scores" in line for line in lines[:4]) and not any("scores" in line for line in lines[4:])


def test_a_row_whose_text_holds_a_control_token_is_left_out_as_training_leaves_it(tmp_path, fake_runtime, model_dir):
    """``<start_of_turn>`` typed in a question: ``gemma3vl train`` skips such a record (``special_token_in_text``);
    eval answered and scored it. Now it is a failure naming the row, left out of the scores."""
    questions = [list(ANSWERS)[0], "<start_of_turn>What?", list(ANSWERS)[1]]
    data = write_vqa(tmp_path / "vqa.parquet", questions)
    out = tmp_path / "out"
    assert main(["eval", str(model_dir), "--data", str(data), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report["examples"], report["examples_scored"]) == (3, 2)
    (failure,) = report["model"]["failures"]
    assert "row 1" in failure and "contains <start_of_turn> as text" in failure
