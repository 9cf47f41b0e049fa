"""``gemma3vl eval``: answer every example of a dataset with a checkpoint, and score the answers.

Prompts are built from the examples exactly as ``gemma3vl train`` builds them (``layouts``), encoded with the
checkpoint's chat template (the ``InferenceRuntime`` ``chat`` and ``serve`` use), and answered by greedy
generation on the server's continuous-batching engine (``infer.engine.ContinuousBatcher``, as ``generate
--batch`` runs it) with ``batch_size`` slots: the next example is read, its images decoded and its prompt encoded
as soon as a slot frees, so a short answer never waits for a long one and only the running examples' images are
in memory. An example that cannot be read or encoded is reported with its ``file:row`` and left out of the scores
(and counted).

At scale (thousands of examples, hours of generation):

* the data is read twice, a few rows at a time (``ExampleFile.iter_examples``): first to check every row and
  keep the text of each example (id, prompt, references: what scoring and ``predictions.jsonl`` need), then, per
  model, to generate; images are never held for more than the rows in flight;
* every answer is appended (and flushed) to ``OUT/answers.jsonl.partial`` (``compare_answers.jsonl.partial``
  for ``--compare``) the moment it is generated, with its row; a crash, a kill or Ctrl-C leaves that file;
* ``OUT/eval_run.json`` holds what the answers depend on (model, adapter, data, layout, split, limit,
  max_new_tokens, dtype: :func:`run_fingerprint`); ``resume=True`` (``--resume``) checks the new run against it,
  takes the answers of the partial files and generates only the rest. Greedy answers do not depend on what else
  is in the batch, so the result is an uninterrupted run's. Once the report is written the partial files go.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from gemma3vl.data.encode import control_strings, refuse_control_strings
from gemma3vl.data.images import ImageLoader
from gemma3vl.data.records import BadRecord, ImageRef, Turn
from gemma3vl.errors import Gemma3VLError
from gemma3vl.evaluation.layouts import Example, ExampleFile, Unlabelled
from gemma3vl.evaluation.metrics import METRICS, compute_stats

RUN_FILE = "eval_run.json"
SYNC_EVERY_S = 2.0  # answers files are fsynced at most this often (and at the end)
ANSWER_LOGS = ("answers.jsonl.partial", "compare_answers.jsonl.partial")  # model, --compare
LISTED_UNLABELLED = 3  # rows without answers named one by one on stderr (a test split has thousands)
COMPILED_ROW_LENGTH = 8192  # --compile: positions per engine row (prompt + answer), made once, unless told


@dataclass
class ExampleSet:
    """The examples read from a data file (in file order), and the rows that could not be read.

    ``examples`` hold their text only (an image is an ``ImageRef(None)``): what scoring and ``predictions.jsonl``
    need. ``rows[i]`` is the row of ``examples[i]``; ``source`` reads the rows again, images included."""

    path: Path
    layout: str
    examples: list[Example]
    skipped: list[str] = field(default_factory=list)  # one message per bad row
    unlabelled: int = 0  # of the bad rows, those without answers (a test split published without them)
    rows: list[int] = field(default_factory=list)
    source: ExampleFile | None = None
    limit: int | None = None

    def stream(self, rows: Iterable[int]) -> Iterator[tuple[int, Example | BadRecord]]:
        """The examples of ``rows`` (a subset of ``self.rows``), images included, read again in file order."""
        wanted = set(rows)
        if not wanted:
            return iter(())
        return self.source.iter_examples(max(wanted) + 1, wanted)


def read_examples(path: str | Path, *, layout: str = "auto", split: str | None = None, limit: int | None = None,
                  report: Callable[[str], None] | None = None) -> ExampleSet:
    """The first ``limit`` rows of ``path`` as examples (bad rows reported and skipped), read a few rows at a time
    and kept without their images (:class:`ExampleSet`)."""
    if limit is not None and limit < 1:
        raise Gemma3VLError(f"--limit {limit} must be >= 1")
    source = ExampleFile(path, layout, split)
    found = ExampleSet(source.path, source.layout, [], source=source, limit=limit)
    for index, example in source.iter_examples(limit):
        if isinstance(example, BadRecord):
            found.skipped.append(str(example))
            found.unlabelled += isinstance(example, Unlabelled)
            if report is not None and (not isinstance(example, Unlabelled) or found.unlabelled <= LISTED_UNLABELLED):
                report(f"skipping {example}")
            elif report is not None and found.unlabelled == LISTED_UNLABELLED + 1:
                report("skipping further rows without answers (each is in report.json's rows_skipped)")
            continue
        found.examples.append(text_only(example))
        found.rows.append(index)
    if not found.examples:
        if found.skipped and found.unlabelled == len(found.skipped):
            raise Gemma3VLError(
                f"{source.path}: none of the {len(found.skipped)} rows read has an answer to score against (e.g. "
                f"{found.skipped[0]}). The test splits of DocVQA, InfographicVQA, TextVQA and VQAv2 (test, testdev) "
                "are published without their answers (scored on the benchmark's own server): evaluate a split with "
                "answers, e.g. --split validation")
        raise Gemma3VLError(f"{source.path}: no usable example" +
                            (f" (e.g. {found.skipped[0]})" if found.skipped else ""))
    return found


def text_only(example: Example) -> Example:
    """``example`` without its images' bytes (each image an ``ImageRef(None)``, still marked in the prompt)."""
    turns = [turn if isinstance(turn.content, str) else
             Turn(turn.role, [ImageRef(None) if isinstance(part, ImageRef) else part for part in turn.content])
             for turn in example.turns]
    return Example(example.id, example.source, turns, example.target, example.references, example.base_dir)


@dataclass
class Answered:
    """One model's answers: ``predictions[i]`` answers ``examples[i]``; None where it could not be asked."""

    model: str
    adapter: str | None
    predictions: list[str | None]
    failures: list[str]
    seconds: float


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during generation, carrying what was answered until then (``answered`` once the model is known)."""

    def __init__(self, predictions: list[str | None], failures: list[str]):
        super().__init__()
        self.predictions, self.failures = predictions, failures
        self.answered: Answered | None = None


# ------------------------------------------------------------------------------------------- generation
def generate_answers(runtime: Any, pending: Iterable[tuple[int, Example | BadRecord]], *, batch_size: int,
                     max_new_tokens: int, answered: Callable[[int, str], None], failed: Callable[[int, str], None],
                     count: int | None = None, image_loader: ImageLoader | None = None,
                     continuous: bool | None = None, compile: bool = False,
                     max_sequence_length: int = COMPILED_ROW_LENGTH,
                     report: Callable[[str], None] | None = None) -> None:
    """Greedy answers of ``runtime``'s model to the ``(key, example)`` of ``pending``, read from it only as a
    slot frees: ``answered(key, text)`` hears each answer the moment it is done, ``failed(key, message)`` each
    example that could not be asked (a bad row, an unreadable image, a prompt over the context).

    ``continuous`` (default: whenever ``runtime`` has a model): ``batch_size`` slots of the continuous-batching
    engine, each row computed as if alone. Else fixed batches of ``batch_size`` rows through ``runtime.complete``
    (left-padded, each row cut at its own stop; the path before the engine, kept for runtimes without a model
    of ours). ``count``: how many ``pending`` holds at most (no more slots are made).

    ``compile`` (CUDA; the engine's decode step compiled into one CUDA graph): the engine is made at once with rows
    of ``max_sequence_length`` positions (prompt + answer; capped by the context) and compiled before the first
    example, and never grows (a new size would compile again); an example longer than that fails, naming the
    flag. ``report`` hears a compile failure (decoding then goes on eagerly)."""
    if batch_size < 1:
        raise Gemma3VLError(f"--batch-size {batch_size} must be >= 1")
    if max_new_tokens >= runtime.context_length:
        raise Gemma3VLError(f"--max-new-tokens {max_new_tokens}: the model's context is {runtime.context_length} "
                            "tokens, prompt included")
    from gemma3vl.infer.completion import Row
    from gemma3vl.infer.conversation import Turn as PromptTurn

    loader = image_loader or ImageLoader()
    sampling = runtime.sampling(max_new_tokens=max_new_tokens, greedy=True)
    control = control_strings(getattr(runtime, "tokenizer", None))

    def encode(key: Any, example: Example | BadRecord) -> Any:
        """The example's prompt, or None once ``failed`` heard why it cannot be asked."""
        if isinstance(example, BadRecord):  # the row read well the first time (the file changed?)
            failed(key, str(example))
            return None
        try:
            refuse_control_strings(example.turns, example.source, control)  # (as training refuses the record)
            turns = []
            for turn in example.turns:
                parts = [turn.content] if isinstance(turn.content, str) else turn.content
                turns.append(PromptTurn(turn.role, [loader.load(p, example.base_dir, example.source)
                                                    if isinstance(p, ImageRef) else p for p in parts]))
            prompt = runtime.encode_conversation(turns)
            if prompt.length + max_new_tokens > runtime.context_length:
                raise Gemma3VLError(f"{example.source}: the prompt is {prompt.length} tokens; with max_new_tokens="
                                    f"{max_new_tokens} that is over the context of {runtime.context_length}")
        except Gemma3VLError as exc:  # BadRecord is one too
            failed(key, str(exc) if example.source in str(exc) else f"{example.source}: {exc}")
            return None
        return prompt

    if continuous is None:
        continuous = getattr(runtime, "model", None) is not None
    slots = batch_size if count is None else max(1, min(batch_size, count))
    if not continuous:
        batch: list[tuple[Any, Any]] = []

        def run_batch() -> None:
            completions = runtime.complete([row for _, row in batch], sampling)
            for (key, _), completion in zip(batch, completions):
                answered(key, completion.text.strip())
            batch.clear()

        for key, example in pending:
            prompt = encode(key, example)
            if prompt is not None:
                batch.append((key, Row(prompt=prompt, max_new_tokens=max_new_tokens)))
            if len(batch) == batch_size:
                run_batch()
        if batch:
            run_batch()
        return

    from gemma3vl.infer.completion import FINISH_ERROR
    from gemma3vl.infer.decode import compiles_on
    from gemma3vl.infer.engine import run_rows

    def finish(key: Any, source: str, completion: Any) -> None:
        if completion.finish_reason == FINISH_ERROR:
            failed(key, f"{source}: {completion.error}")
        else:
            answered(key, completion.text.strip())

    def rows() -> Iterator[tuple[Row, Any, Any] | None]:
        # read, decoded and encoded only when a slot frees
        for key, example in pending:
            prompt = encode(key, example)
            yield None if prompt is None else (
                Row(prompt=prompt, max_new_tokens=max_new_tokens,
                    on_finish=lambda completion, key=key, source=example.source: finish(key, source, completion)),
                sampling, (key, example.source))

    def too_long(row: Row, tag: tuple[Any, str], length: int) -> None:
        key, source = tag
        failed(key, f"{source}: the prompt is {row.prompt.length} tokens; with max_new_tokens={max_new_tokens} that "
                    f"is over --max-sequence-length {length} (the positions each compiled row holds)")

    fixed = compile and compiles_on(runtime.device)
    run_rows(runtime, rows(), slots=slots, compile=fixed, report=report,
             max_length=max_sequence_length if fixed else None, too_long=too_long)


def answer_examples(runtime: Any, examples: list[Example], *, batch_size: int, max_new_tokens: int,
                    progress: bool = True, report: Callable[[str], None] | None = None,
                    image_loader: ImageLoader | None = None,
                    continuous: bool | None = None) -> tuple[list[str | None], list[str]]:
    """Greedy answers of ``runtime``'s model to ``examples``, in order, and one message per failure (in order)."""
    from tqdm import tqdm

    say = report or (lambda message: tqdm.write(message, file=sys.stderr))
    predictions: list[str | None] = [None] * len(examples)
    failures: dict[int, str] = {}
    with tqdm(total=len(examples), desc="eval", unit="example", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        def answered(index: int, text: str) -> None:
            predictions[index] = text
            bar.update(1)

        def failed(index: int, message: str) -> None:
            failures[index] = message
            say(f"skipping {message}")
            bar.update(1)

        try:
            generate_answers(runtime, enumerate(examples), batch_size=batch_size, max_new_tokens=max_new_tokens,
                             answered=answered, failed=failed, count=len(examples), image_loader=image_loader,
                             continuous=continuous)
        except KeyboardInterrupt:
            raise Interrupted(predictions, [failures[i] for i in sorted(failures)]) from None
    return predictions, [failures[i] for i in sorted(failures)]


# ------------------------------------------------------------------------------------------- the answers file
class AnswerLog:
    """``OUT/answers.jsonl.partial``: one line per row as soon as it is answered (or found unanswerable), flushed
    (and fsynced every ``SYNC_EVERY_S`` seconds and at the end, so that a machine that goes down loses at most
    that much), in the order the answers come: ``{"row", "id", "source", "prediction" | "failure", "seconds"}``
    (``seconds``: the model's generation time so far, over every session of the run).

    The file is made at the first answer. With ``resume`` the lines already there are read back (a last line cut
    short by a kill is dropped, and answered again), each checked against the row it names."""

    def __init__(self, path: Path, found: ExampleSet, *, resume: bool = False):
        self.path = path
        self.predictions: dict[int, str] = {}
        self.failures: dict[int, str] = {}
        self.seconds_before = 0.0
        self.started: float | None = None
        self._stream: Any = None
        self._synced = time.monotonic()
        self._found = found
        self._sources = {row: example for row, example in zip(found.rows, found.examples)}
        if resume and path.exists():
            self._read()

    @property
    def done(self) -> set[int]:
        return set(self.predictions) | set(self.failures)

    def _read(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise Gemma3VLError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        complete = data[:data.rfind(b"\n") + 1]  # a line without its newline was cut short by a kill
        for number, raw in enumerate(complete.splitlines(), start=1):
            try:
                record = json.loads(raw)
                row = record["row"]
                answer = record.get("prediction", record.get("failure"))
                seconds = float(record.get("seconds") or 0.0)
                ok = isinstance(answer, str) and isinstance(row, int)
            except (ValueError, KeyError, TypeError, AttributeError):
                ok = False
            if not ok:
                raise Gemma3VLError(f"{self.path}:{number}: not an answer line of gemma3vl eval; remove the file to "
                                    "start the run again")
            example = self._sources.get(row)
            if example is None or not self._same_row(record.get("source"), example):
                raise Gemma3VLError(
                    f"{self.path}:{number}: answers row {row} ({record.get('source')}), which is "
                    f"{'not an example of the data' if example is None else example.source} now: the data changed "
                    "since the first run")
            if "prediction" in record:
                self.predictions[row] = answer
            else:
                self.failures[row] = answer
            self.seconds_before = max(self.seconds_before, seconds)
        if len(complete) < len(data):
            try:
                os.truncate(self.path, len(complete))
            except OSError as exc:
                raise Gemma3VLError(f"{self.path}: cannot write ({exc.strerror or exc})") from None

    def _same_row(self, logged: Any, example: Example) -> bool:
        """Whether a line's ``source`` names the row of ``example``: the same file of the data (its path under
        ``--data``, however ``--data`` is spelled: relative then, absolute now, or from another directory; eval_run.json
        has checked that it is the same data, file for file) and the same row."""
        if logged == example.source:
            return True
        if not isinstance(logged, str):
            return False
        logged_file, _, logged_at = logged.rpartition(":")
        file, _, at = example.source.rpartition(":")
        if not logged_file or logged_at != at:
            return False
        root = Path(self._found.path)
        try:
            tail = Path(file).relative_to(root).parts if root.is_dir() else (Path(file).name,)
        except ValueError:
            return False
        return bool(tail) and Path(logged_file).parts[-len(tail):] == tail

    @property
    def seconds(self) -> float:
        """The model's generation time over every session of the run."""
        return self.seconds_before + (0.0 if self.started is None else time.perf_counter() - self.started)

    def _write(self, row: int, key: str, value: str) -> None:
        example = self._sources[row]
        line = json.dumps({"row": row, "id": example.id, "source": example.source, key: value,
                           "seconds": round(self.seconds, 3)}, ensure_ascii=False, default=str) + "\n"
        try:
            if self._stream is None:
                self._stream = open(self.path, "a", encoding="utf-8")
            self._stream.write(line)
            self._stream.flush()  # a killed process loses nothing written
            if time.monotonic() - self._synced >= SYNC_EVERY_S:  # a crashed machine, at most this long's answers
                self._sync()
        except OSError as exc:
            raise Gemma3VLError(f"{self.path}: cannot write ({exc.strerror or exc})") from None

    def answer(self, row: int, text: str) -> None:
        self.predictions[row] = text
        self._write(row, "prediction", text)

    def fail(self, row: int, message: str) -> None:
        self.failures[row] = message
        self._write(row, "failure", message)

    def answered(self, label: str, adapter: str | None) -> Answered:
        rows = self._found.rows
        return Answered(label, adapter, [self.predictions.get(row) for row in rows],
                        [self.failures[row] for row in sorted(self.failures)], self.seconds)

    def _sync(self) -> None:
        os.fsync(self._stream.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        if self._stream is not None:
            try:
                self._sync()
            except OSError as exc:
                raise Gemma3VLError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
            finally:
                self._stream.close()
                self._stream = None


def evaluate_model(model_dir: str | Path, found: ExampleSet, log: AnswerLog, *, adapter: str | Path | None = None,
                   batch_size: int = 8, max_new_tokens: int = 64, device: str | None = None,
                   dtype: str | None = None, progress: bool = True,
                   report: Callable[[str], None] | None = None, compile: bool = False,
                   max_sequence_length: int = COMPILED_ROW_LENGTH) -> Answered:
    """Answer the examples of ``found`` that ``log`` has no answer for with ``model_dir`` (``adapter`` merged in),
    each into ``log`` as it comes, and let the model go. Nothing to answer: the model is not even loaded."""
    from tqdm import tqdm

    from gemma3vl.infer.runtime import InferenceRuntime

    say = report or (lambda message: tqdm.write(message, file=sys.stderr))
    label = None if adapter is None else str(adapter)
    done = log.done
    pending = [row for row in found.rows if row not in done]
    if done:
        say(f"resuming: {len(found.rows) - len(pending)} of {len(found.rows)} examples already done by {model_dir} "
            f"({len(log.predictions)} answered, {len(log.failures)} could not be asked; {log.path})")
    if not pending:
        return log.answered(str(model_dir), label)
    runtime = InferenceRuntime.load(model_dir, device=device, dtype=dtype, adapter=adapter)
    say(runtime.describe())
    if compile:
        say("--compile: the decode step compiles and captures a CUDA graph before the first example (about a minute "
            "for the 4B)" if runtime.device.type == "cuda" else
            f"--compile: ignored on {runtime.device} (compiled decoding needs CUDA); decoding eagerly")
    if not runtime.config.is_vision_language and all(_has_image(example) for example in found.examples):
        raise Gemma3VLError(f"{model_dir}: a text-only Gemma 3 checkpoint cannot answer these examples: "
                            "every one has an image")
    log.started = time.perf_counter()
    with tqdm(total=len(found.rows), initial=len(found.rows) - len(pending), desc="eval", unit="example",
              file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        if log.failures:
            bar.set_postfix(failed=len(log.failures), refresh=False)

        def answered(row: int, text: str) -> None:
            log.answer(row, text)
            bar.update(1)

        def failed(row: int, message: str) -> None:
            log.fail(row, message)
            say(f"skipping {message}")
            bar.update(1)
            bar.set_postfix(failed=len(log.failures), refresh=False)

        try:
            generate_answers(runtime, found.stream(pending), batch_size=batch_size, max_new_tokens=max_new_tokens,
                             answered=answered, failed=failed, count=len(pending), compile=compile,
                             max_sequence_length=max_sequence_length,
                             report=lambda why: say(f"--compile: compiling the decode step failed ({why[:300]}); "
                                                    "decoding eagerly"))
        except KeyboardInterrupt:
            stop = Interrupted([], [])
            stop.answered = log.answered(str(model_dir), label)
            raise stop from None
        finally:
            log.seconds_before, log.started = log.seconds, None
    return log.answered(str(model_dir), label)


# ------------------------------------------------------------------------------------------- resuming
# What answers depend on, as eval_run.json keeps it; and how an error names each.
FINGERPRINT_NAMES = {
    "model": "MODEL_DIR", "model_files": "MODEL_DIR", "adapter": "--adapter", "adapter_files": "--adapter",
    "compare": "--compare", "compare_files": "--compare", "data": "--data", "data_files": "--data",
    "split": "--split", "layout": "--layout", "limit": "--limit", "max_new_tokens": "--max-new-tokens",
    "dtype": "--dtype", "decoding": "decoding",
}


def _files_of(path: str | Path | None, skip: Path, files: list[Path] | None = None) -> list[list[Any]] | None:
    """``[name, size, mtime_ns]`` of the files under ``path`` (or of ``files``), but those under ``skip``."""
    if path is None:
        return None
    path = Path(path).resolve()
    if files is None:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())[:4096]
    root = path if path.is_dir() else path.parent
    found = []
    for file in files:
        file = Path(file).resolve()
        if file.is_relative_to(skip):
            continue
        try:
            stat = file.stat()
        except OSError:
            continue
        found.append([str(file.relative_to(root)) if file.is_relative_to(root) else str(file), stat.st_size,
                      stat.st_mtime_ns])
    return found


def run_fingerprint(model_dir: str | Path, found: ExampleSet, *, out: Path, adapter: str | Path | None,
                    compare: str | Path | None, split: str | None, max_new_tokens: int,
                    dtype: str | None) -> dict[str, Any]:
    """What a run's answers depend on (``OUT/eval_run.json``): the checkpoints and the data (paths, and each
    file's size and modification time), the rows read, the prompts' layout, the answer length, the dtype."""
    out = out.resolve()
    resolved = {name: None if value is None else str(Path(value).resolve())
                for name, value in (("model", model_dir), ("adapter", adapter), ("compare", compare))}
    rows = found.source.rows if found.source is not None else None
    return {
        **{name: value for name, value in resolved.items()},
        "model_files": _files_of(model_dir, out), "adapter_files": _files_of(adapter, out),
        "compare_files": _files_of(compare, out),
        "data": str(Path(found.path).resolve()),
        "data_files": _files_of(found.path, out, None if rows is None else rows.files),
        "split": split, "layout": found.layout, "limit": found.limit, "max_new_tokens": max_new_tokens,
        "dtype": dtype or "auto", "decoding": "greedy",
    }


def _differences(earlier: dict[str, Any], now: dict[str, Any]) -> list[str]:
    said = []
    for key, name in FINGERPRINT_NAMES.items():
        before, after = earlier.get(key), now.get(key)
        if before == after:
            continue
        if key.endswith("_files"):
            path = key[:-len("_files")]
            if earlier.get(path) != now.get(path):
                continue  # the path itself differs: said once
            if key == "data_files" and earlier.get("split") != now.get("split"):
                continue  # another split's files: the --split difference says it (the files did not change)
            first = {item[0]: list(item[1:]) for item in before or []}
            second = {item[0]: list(item[1:]) for item in after or []}
            changed = sorted(name for name in first.keys() | second.keys() if first.get(name) != second.get(name))
            said.append(f"the files of {name} {now.get(path)} changed since the first run ({', '.join(changed[:3])})")
        else:
            said.append(f"{name} {_shown(after)} (the first run: {_shown(before)})")
    return said


def _shown(value: Any) -> str:
    return "not given" if value is None else str(value)


def prepare_out(out: Path, fingerprint: dict[str, Any], *, resume: bool) -> None:
    """Start a run in ``out`` (write ``eval_run.json``), or with ``resume`` check the unfinished one there."""
    run_file = out / RUN_FILE
    logs = [out / name for name in ANSWER_LOGS]
    present = [log for log in logs if log.exists()]
    unfinished = bool(present)
    if not resume:
        if unfinished:
            raise Gemma3VLError(
                f"--out {out} holds the answers of an unfinished run ({' and '.join(map(str, present))}): add "
                f"--resume to continue it, or remove {' and '.join(log.name for log in present)} (or give another "
                "--out) to start again")
        from gemma3vl.evaluation.report import write_report

        write_report(run_file, fingerprint)
        return
    if not unfinished or not run_file.is_file():
        finished = (out / "report.json").is_file() and run_file.is_file()
        raise Gemma3VLError(
            f"--resume: {out} holds no unfinished eval run to resume"
            + (" (the run there is complete: report.json, no answers.jsonl.partial)" if finished else
               f" (no {ANSWER_LOGS[0]}" + ("" if run_file.is_file() else f" and no {RUN_FILE}") + ")")
            + "; run without --resume to start one")
    try:
        earlier = json.loads(run_file.read_text())
    except (OSError, ValueError) as exc:
        raise Gemma3VLError(f"--resume: {run_file}: cannot read ({exc})") from None
    differences = _differences(earlier, fingerprint)
    if differences:
        raise Gemma3VLError(
            f"--resume: this run is not the unfinished one in {out} ({RUN_FILE}): " + "; ".join(differences)
            + ". Resume it with the first run's settings, or start a new run in another --out")


def _remove_logs(out: Path) -> None:
    for name in ANSWER_LOGS:
        try:
            (out / name).unlink(missing_ok=True)
        except OSError:
            pass


@dataclass
class Scored:
    """Per metric: the per-sample statistics over the scored examples (those every model answered)."""

    stats: dict[str, np.ndarray]

    def value(self, name: str) -> float:
        return METRICS[name].score(self.stats[name])

    def sample_scores(self, name: str) -> list[float]:
        return METRICS[name].sample_scores(self.stats[name])


def score_answers(names: list[str], answers: list[str], examples: list[Example]) -> Scored:
    return Scored(compute_stats(names, answers, [example.references for example in examples]))


def run_eval(model_dir: str | Path, data: str | Path, *, out: str | Path, layout: str = "auto",
             metrics: list[str] | None = None, adapter: str | Path | None = None, compare: str | Path | None = None,
             limit: int | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
             split: str | None = None, device: str | None = None, dtype: str | None = None,
             progress: bool = True, report: Callable[[str], None] | None = None,
             resume: bool = False, compile: bool = False,
             max_sequence_length: int | None = None) -> dict[str, Any]:
    """Score ``model_dir`` (and ``compare``) on ``data``; write ``OUT/predictions.jsonl`` (and
    ``OUT/compare_predictions.jsonl``) and ``OUT/report.json``; return the report. ``resume``: continue the
    unfinished run in ``out`` (see the module docstring)."""
    from gemma3vl.evaluation.layouts import DEFAULT_MAX_NEW_TOKENS, DEFAULT_METRICS
    from gemma3vl.evaluation.metrics import bleu_signature, check_metrics, metric_available
    from gemma3vl.evaluation.report import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, paired_bootstrap,
                                            write_predictions, write_report)

    say = report or (lambda message: print(message, file=sys.stderr, flush=True))
    for label, directory in (("MODEL_DIR", model_dir), ("--compare", compare), ("--adapter", adapter)):
        if directory is not None and not Path(directory).is_dir():
            raise Gemma3VLError(f"{label} {directory}: no such directory")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Gemma3VLError(f"--out {out}: exists and is not a directory")
    if resume and not out.is_dir():
        raise Gemma3VLError(f"--resume: {out} holds no unfinished eval run to resume (no such directory); run "
                            "without --resume to start one")
    if metrics:  # before the data's first pass, which may read thousands of rows
        names = check_metrics(metrics)
    if adapter is not None:
        from gemma3vl.evaluation.loading import check_adapter

        check_adapter(model_dir, adapter)
    found = read_examples(data, layout=layout, split=split, limit=limit, report=say)
    notes: list[str] = []
    if found.unlabelled:
        notes.append(f"{found.unlabelled} of the {len(found.examples) + len(found.skipped)} rows read have no answers "
                     "(a test split published without them?) and are not scored"
                     + ("" if split or not Path(found.path).is_dir() else "; --split picks one split's files"))
        say(f"note: {notes[-1]}")
    if not metrics:
        names = [name for name in DEFAULT_METRICS[found.layout] if metric_available(name)]
        left_out = [name for name in DEFAULT_METRICS[found.layout] if name not in names]
        if left_out:
            notes.append(f"{', '.join(left_out)} left out: {METRICS[left_out[0]].needs} is not installed "
                         "(pip install 'gemma3vl[eval]')")
            say(f"note: {notes[-1]}")
    max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[found.layout]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Gemma3VLError(f"--out {out}: cannot create the directory ({exc.strerror or exc})") from None
    _check_writable(out, ("predictions.jsonl", "compare_predictions.jsonl", "report.json", RUN_FILE, *ANSWER_LOGS))
    fingerprint = run_fingerprint(model_dir, found, out=out, adapter=adapter, compare=compare, split=split,
                                  max_new_tokens=max_new_tokens, dtype=dtype)
    prepare_out(out, fingerprint, resume=resume)
    say(f"{found.path}: {len(found.examples)} {found.layout} examples"
        + (f" ({len(found.skipped)} bad rows skipped)" if found.skipped else "") + f"; metrics: {', '.join(names)}")

    models = [(model_dir, adapter)] + ([(compare, None)] if compare is not None else [])
    logs = [AnswerLog(out / name, found, resume=resume) for name, _ in zip(ANSWER_LOGS, models)]
    runs: list[Answered] = []
    interrupted = False
    try:
        for (directory, adapter_dir), log in zip(models, logs):
            runs.append(evaluate_model(directory, found, log, adapter=adapter_dir, batch_size=batch_size,
                                       max_new_tokens=max_new_tokens, device=device, dtype=dtype,
                                       progress=progress, report=report, compile=compile,
                                       max_sequence_length=max_sequence_length or COMPILED_ROW_LENGTH))
    except Interrupted as stop:
        # Ctrl-C during generation: what was answered is scored and written (marked interrupted), not thrown
        # away with hours of generation. Interrupted during the first model, there is no comparison.
        runs.append(stop.answered)
        interrupted = True
        notes.append(f"interrupted: {sum(p is not None for p in stop.answered.predictions)} of "
                     f"{len(found.examples)} examples answered by {stop.answered.model}; only those are scored")
    finally:
        for log in logs:
            log.close()
    # Only examples every model answered are scored, so that the comparison is paired.
    kept = [i for i in range(len(found.examples)) if all(run.predictions[i] is not None for run in runs)]
    examples = [found.examples[i] for i in kept]
    scored = [score_answers(names, [run.predictions[i] for i in kept], examples) for run in runs]

    files = ["predictions.jsonl", "compare_predictions.jsonl"]
    results: dict[str, Any] = {
        "data": str(found.path), "layout": found.layout, "examples": len(found.examples) + len(found.skipped),
        "examples_scored": len(examples), "rows_skipped": found.skipped, "metrics": names,
        "max_new_tokens": max_new_tokens, "decoding": "greedy", "notes": notes, "interrupted": interrupted,
    }
    if "bleu4" in names:
        results["bleu4_signature"] = bleu_signature([example.references for example in examples])
    for key, run, scores, file in zip(("model", "compare"), runs, scored, files):
        label = _label(run.model) + (f" + {_label(run.adapter)}" if run.adapter else "")
        values = {name: (scores.value(name) if examples else None) for name in names}
        results[key] = {"path": run.model, "adapter": run.adapter, "label": label, "scores": values,
                        "failures": run.failures, "seconds": round(run.seconds, 3), "predictions": file}
        per_sample = {name: scores.sample_scores(name) for name in names}
        write_predictions(out / file, found.examples, run.predictions, kept, per_sample)
    if len(runs) > 1:
        results["difference"] = {}
        for name in names:
            first, second = scored[0].stats[name], scored[1].stats[name]
            low, high = paired_bootstrap(name, first, second) if examples else (None, None)
            value = (results["model"]["scores"][name] - results["compare"]["scores"][name]) if examples else None
            results["difference"][name] = {"value": value, "ci95": [low, high]}
        results["bootstrap"] = {"method": "paired percentile bootstrap over examples (same resample indices for "
                                          "both models)", "resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED,
                                "interval": 0.95}
    elif (out / files[1]).exists():
        (out / files[1]).unlink()  # an earlier run's comparison would pass for this run's
    write_report(out / "report.json", results)
    if interrupted:
        say(f"interrupted: the {len(examples)} examples answered so far are scored in {out / 'report.json'}; "
            f"the same command with --resume answers the rest")
        raise KeyboardInterrupt
    _remove_logs(out)  # every answer is in the predictions files now
    if not examples:
        # Every example failed (unreadable images, prompts over the context, ...): no score is not a result.
        failures = [failure for run in runs for failure in run.failures]
        raise Gemma3VLError(f"none of the {len(found.examples)} examples could be answered, so nothing was scored "
                            f"(e.g. {failures[0] if failures else 'no answer'}); every failure is in "
                            f"{out / 'report.json'}")
    return results


def _check_writable(out: Path, names: tuple[str, ...]) -> None:
    """Fail now, not after hours of generation, when the results could not be written to ``out``."""
    for name in names:
        if (out / name).is_dir():
            raise Gemma3VLError(f"--out {out}: {out / name} is a directory; it must be free for a file")
    probe = out / f".gemma3vl-eval-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise Gemma3VLError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


def _has_image(example: Example) -> bool:
    return any(isinstance(part, ImageRef) for turn in example.turns if not isinstance(turn.content, str)
               for part in turn.content)


def _label(directory: str) -> str:
    """A checkpoint's short name for the table: its last two path components (``run/hf``, ``out/base``)."""
    parts = Path(directory).resolve().parts
    return "/".join(parts[-2:]) if len(parts) > 1 else str(directory)
