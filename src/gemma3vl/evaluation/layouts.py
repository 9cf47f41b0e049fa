"""The dataset layouts the field publishes, read from local parquet or JSONL files, as examples.

An example is a prompt (user turns with images), the answer to train on, and the references to score
against. Every layout becomes the same conversation records ``gemma3vl train`` reads (``data.layout``), and
the same prompts ``gemma3vl eval`` asks, so a model is scored on exactly the question it was trained on.

Layouts (detected from the columns, or named):

* ``cord``: receipts as CORD-v2 publishes them: ``image`` and ``ground_truth``, a JSON string whose
  ``gt_parse`` is the target. The prompt asks for the fields as JSON; the answer is ``gt_parse`` as compact
  JSON with sorted keys (one stable spelling, so training does not chase key order).
* ``vqa``: VQAv2 / DocVQA / ChartQA / TextVQA: ``image``, ``question``, and ``answers`` (a list of strings,
  or of ``{"answer": ...}`` objects as VQAv2 stores them) or ``answer``; or ``query`` and ``label`` (the
  HuggingFaceM4/ChartQA copy). The references are all the answers; the answer trained on is the most frequent
  one (the first of the most frequent). A row without answers (a test split published without them) is an
  :class:`Unlabelled` bad row. Multiple-choice data (an ``options`` / ``choices`` column) is refused: its
  question would be asked without the options and its answer is an option's index.
* ``caption``: ``image`` and ``caption`` or ``captions``; the first caption is trained on.
* ``conversation``: the repository's own records (``messages``, LLaVA ``conversations``, or the
  HuggingFaceM4/the_cauldron and FineVision ``images`` + ``texts`` rows); the last assistant turn is the answer
  and the only reference, everything before it the prompt.

Images are what Hugging Face datasets store: ``{"bytes": ..., "path": ...}`` objects, raw bytes, or paths
(relative to the data file). In JSONL, bytes are base64 text, or a ``data:image/...;base64,`` URL.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Container, Iterator

from gemma3vl.data.records import INVALID_SCHEMA, BadRecord, Conversation, ImageRef, Turn, parse_record
from gemma3vl.data.sources import in_split
from gemma3vl.errors import Gemma3VLError

LAYOUTS = ("auto", "conversation", "cord", "vqa", "caption")
CORD_PROMPT = "Read this receipt and give its fields as JSON."
VQA_SUFFIX = "Answer the question using a single word or phrase."
CAPTION_PROMPT = "Describe this image in one sentence."
ID_COLUMNS = ("id", "question_id", "questionId", "image_id")
QUESTION_COLUMNS = ("question", "query")  # query: HuggingFaceM4/ChartQA
ANSWER_COLUMNS = ("answers", "answer", "label")  # label: HuggingFaceM4/ChartQA's list of answers
# Multiple-choice data, refused by detect_layout: a column of options (AI2D, MMMU, ScienceQA), or one column per
# option (MMBench's A, B, C, D; SEED-Bench's choice_a ...).
CHOICE_COLUMNS = ("options", "choices")
CHOICE_COLUMN = re.compile(r"(?:(?:choice|option)_?)?[A-Da-d]")
# The conversation records' own columns (gemma3vl.data.records): messages, LLaVA / ShareGPT, the_cauldron / FineVision.
CONVERSATION_COLUMNS = ("messages", "conversations", "texts")

# The metrics each layout reports unless --metric says otherwise.
DEFAULT_METRICS = {
    "cord": ("field_f1", "ted_accuracy"),
    "vqa": ("vqa_accuracy", "anls", "exact_match"),
    "caption": ("bleu4", "token_f1"),
    "conversation": ("exact_match", "token_f1"),
}
# The longest answer each layout needs (a receipt's JSON is long).
DEFAULT_MAX_NEW_TOKENS = {"cord": 512, "vqa": 32, "caption": 64, "conversation": 128}


@dataclass
class Example:
    """One prompt to answer. ``turns`` are the prompt's turns (ending with the user's); images are
    :class:`ImageRef` s, opened relative to ``base_dir`` when asked."""

    id: Any
    source: str  # file:line or file:row N
    turns: list[Turn]
    target: str  # the answer to train on
    references: list[str]  # the answers to score against
    base_dir: Path

    @property
    def prompt_text(self) -> str:
        """The prompt as text, an ``<image>`` marker where each image goes (for predictions.jsonl)."""
        lines = []
        for turn in self.turns:
            parts = [turn.content] if isinstance(turn.content, str) else turn.content
            text = "".join("<image>" if isinstance(part, ImageRef) else part for part in parts)
            lines.append(text if len(self.turns) == 1 else f"{turn.role}: {text}")
        return "\n".join(lines)

    def conversation_record(self) -> dict[str, Any]:
        """The example as a ``{"messages": [...], "images": [...]}`` record (the TRL / HF datasets form)."""
        images: list[Any] = []
        messages = []
        for turn in self.turns:
            if isinstance(turn.content, str):
                messages.append({"role": turn.role, "content": turn.content})
                continue
            content = []
            for part in turn.content:
                if isinstance(part, ImageRef):
                    images.append(part.source)
                    content.append({"type": "image"})
                else:
                    content.append({"type": "text", "text": part})
            messages.append({"role": turn.role, "content": content})
        messages.append({"role": "assistant", "content": self.target})
        record: dict[str, Any] = {"messages": messages}
        if images:
            record["images"] = images
        return record


# -------------------------------------------------------------------------------------------- rows
class RowFile:
    """Rows of a parquet file, a directory of parquet files, or a JSONL / JSON array file, by index or in order.

    Opening one reads only what describes the data (parquet footers: row counts and columns; a JSONL file's line
    offsets). ``iter_rows`` streams the rows in order (parquet in small record batches, row group by row group;
    JSONL line by line), so memory does not grow with the dataset: what ``gemma3vl eval`` reads. ``row`` gives
    any row (what training's shuffled access needs): a parquet dataset is then read whole, once, memory-mapped.
    A JSON array file is parsed whole either way (its records cannot be told apart otherwise).
    """

    def __init__(self, path: str | Path, split: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise Gemma3VLError(f"{self.path}: no such dataset file or directory")
        self.base_dir = self.path if self.path.is_dir() else self.path.parent
        self.table = None  # the whole parquet data, read at the first ``row`` call
        self.parquet = False
        self.json_source = None
        self.files: list[Path] = [self.path]
        self.file_starts: list[int] = [0]  # the global index of each file's first row
        self.num_rows = 0
        whole = self.path.resolve()
        # A single file is of the split by its own name or its directory's (data/test/0000.parquet): not by any
        # directory further up (a train file under ~/test/ is not of split 'test').
        if split is not None and self.path.is_file() and not in_split(whole, whole.parent.parent, split):
            # A single file is read whole: --split would silently be ignored, and a model scored on the
            # train file when the test split was asked for.
            raise Gemma3VLError(f"--split {split}: {self.path} is one file, not a file of split {split!r} "
                                f"(--split picks {split}-*.parquet, {split}.parquet or {split}/ files in a directory)")
        if self.path.is_dir() or self.path.suffix == ".parquet":
            self.parquet = True
            self.files = _parquet_files(self.path, split)
            self.columns, counts = _parquet_footers(self.path, self.files)
            self.file_starts = [0]
            for count in counts[:-1]:
                self.file_starts.append(self.file_starts[-1] + count)
            self.num_rows = sum(counts)
        else:
            from gemma3vl.data.sources import JsonArraySource, JsonlSource

            with self.path.open("rb") as handle:
                head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            self.json_source = JsonArraySource(self.path) if head[:1] == b"[" else JsonlSource(self.path)
            self.columns = self._json_columns()

    def _json_columns(self) -> list[str]:
        first_bad = None
        for index in range(min(len(self.json_source), 8)):
            try:
                row, _ = self.json_source.record(index)
            except BadRecord as bad:
                first_bad = first_bad or bad
                continue
            if isinstance(row, dict):
                return list(row)
        if first_bad is not None:  # else "cannot tell the layout from its columns []", naming no line
            raise Gemma3VLError(f"no readable record among the first lines of {self.path}: {first_bad}")
        return []

    def __len__(self) -> int:
        return self.num_rows if self.parquet else len(self.json_source)

    def _label(self, index: int) -> str:
        """``file:row N``: the row's own file and its row number in that file (a directory holds several shards)."""
        at = bisect.bisect_right(self.file_starts, index) - 1
        return f"{self.files[at]}:row {index - self.file_starts[at]}"

    def row(self, index: int) -> tuple[Any, str]:
        """The row (a dict, or what a JSON line holds) and its ``file:line`` / ``file:row N`` label."""
        if self.parquet:
            if self.table is None:
                self.table = _read_parquet(self.path, self.files)
            return self.table.slice(index, 1).to_pylist()[0], self._label(index)
        return self.json_source.record(index)

    def iter_rows(self, stop: int | None = None) -> Iterator[tuple[int, Any, str] | tuple[int, BadRecord, str]]:
        """``(index, row, label)`` for the rows ``0 .. stop - 1`` in order, reading no further than ``stop``; a row
        that cannot be read (a bad JSONL line) comes as ``(index, BadRecord, label)``."""
        stop = len(self) if stop is None else min(stop, len(self))
        if not self.parquet:
            for index in range(stop):
                try:
                    row, label = self.json_source.record(index)
                except BadRecord as bad:
                    yield index, bad, bad.source
                    continue
                yield index, row, label
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        for file, start in zip(self.files, self.file_starts):
            if start >= stop:
                return
            index = start
            try:
                with pq.ParquetFile(str(file)) as reader:
                    for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                        for row in batch.to_pylist():
                            if index >= stop:
                                return
                            yield index, row, f"{file}:row {index - start}"
                            index += 1
            except (OSError, ValueError, pa.ArrowException) as exc:
                raise Gemma3VLError(f"{file}: cannot read the parquet data: {exc}") from None


# Rows decoded from parquet at a time while streaming (each may hold an image's bytes).
PARQUET_BATCH_ROWS = 16


def _pyarrow(path: Path) -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise Gemma3VLError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    return pa, pq


def _parquet_files(path: Path, split: str | None) -> list[Path]:
    _pyarrow(path)
    if not path.is_dir():
        return [path]
    every = sorted(path.rglob("*.parquet"))
    if not every:
        json_files = sorted(f for f in path.rglob("*") if f.suffix in (".jsonl", ".json") and f.is_file())
        raise Gemma3VLError(f"{path}: no parquet files in this directory" + (
            f" (a JSONL or JSON file is given as --data itself, e.g. {json_files[0]})" if json_files else ""))
    files = every
    if split is not None:
        files = [f for f in every if in_split(f, path, split)]
        if not files:
            names = ", ".join(str(f.relative_to(path)) for f in every[:8])
            raise Gemma3VLError(f"{path}: no parquet file of split {split!r} among {names}")
    return files


def _parquet_footers(path: Path, files: list[Path]) -> tuple[list[str], list[int]]:
    """The columns (each file's, in order of first appearance, as ``pyarrow.concat_tables`` unites them) and the
    row count of each file, from their footers alone."""
    pa, pq = _pyarrow(path)
    columns: list[str] = []
    counts = []
    try:
        for file in files:
            with pq.ParquetFile(str(file)) as reader:
                counts.append(reader.metadata.num_rows)
                columns += [name for name in reader.schema_arrow.names if name not in columns]
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise Gemma3VLError(f"{path}: cannot read the parquet data: {exc}") from None
    return columns, counts


def _read_parquet(path: Path, files: list[Path]) -> Any:
    """Every row of ``files`` as one table (memory-mapped), for random access."""
    pa, pq = _pyarrow(path)
    try:
        tables = [pq.read_table(str(file), memory_map=True) for file in files]
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise Gemma3VLError(f"{path}: cannot read the parquet data: {exc}") from None


# -------------------------------------------------------------------------------------------- layouts
def detect_layout(columns: list[str], where: str | Path) -> str:
    names = set(columns)
    if names & set(CONVERSATION_COLUMNS):
        return "conversation"
    if "ground_truth" in names:
        return "cord"
    if ("question" in names and ("answers" in names or "answer" in names)) or \
            ("query" in names and names & {"answers", "answer", "label"}):
        lettered = sorted(name for name in names if CHOICE_COLUMN.fullmatch(name))
        choices = sorted(names & set(CHOICE_COLUMNS)) or (lettered if len(lettered) >= 2 else [])
        if choices:
            # AI2D, ScienceQA, MMMU...: the answer is an option's index or letter, and the options are not in the
            # question: asked as a VQA question it would be scored against "1".
            raise Gemma3VLError(
                f"{where}: multiple-choice data (column(s) {', '.join(choices)} beside the question) is not a layout "
                "gemma3vl eval reads: the vqa layout would ask the question without its options and score the "
                "answer against the option's index. Write the rows as conversations (messages) whose question lists "
                "the options, with the expected letter as the answer")
        return "vqa"
    if "caption" in names or "captions" in names:
        return "caption"
    raise Gemma3VLError(
        f"{where}: cannot tell the dataset layout from its columns {sorted(names)}; expected CORD-v2 "
        "(image, ground_truth), VQA (image, question, answers or answer; or query and label), captions (image, "
        "caption or captions) or conversations (messages, LLaVA conversations, or the_cauldron / FineVision texts); "
        "name it with --layout (data.layout when training)"
    )


REQUIRED_COLUMNS = {
    "cord": (("image",), ("ground_truth",)),
    "vqa": (("image",), QUESTION_COLUMNS, ANSWER_COLUMNS),
    "caption": (("image",), ("caption", "captions")),
    "conversation": (CONVERSATION_COLUMNS,),
}


def check_columns(layout: str, columns: list[str], where: str | Path) -> None:
    missing = [" or ".join(group) for group in REQUIRED_COLUMNS[layout] if not set(group) & set(columns)]
    if missing:
        raise Gemma3VLError(
            f"{where}: the {layout} layout needs column(s) {', '.join(missing)}; the data has {sorted(columns)}"
        )


class ExampleFile:
    """A dataset file read as examples of one layout (``auto``: detected from the columns)."""

    def __init__(self, path: str | Path, layout: str = "auto", split: str | None = None):
        if layout not in LAYOUTS:
            raise Gemma3VLError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        self.rows = RowFile(path, split)
        self.path = self.rows.path
        self.base_dir = self.rows.base_dir
        if not len(self.rows):
            raise Gemma3VLError(f"{self.path}: the dataset has no rows")
        self.layout = detect_layout(self.rows.columns, self.path) if layout == "auto" else layout
        check_columns(self.layout, self.rows.columns, self.path)

    def __len__(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> Example:
        """Row ``index`` as an :class:`Example` (raises :class:`BadRecord` naming the row when it is bad)."""
        row, source = self.rows.row(index)
        return self._example(row, source, index)

    def _example(self, row: Any, source: str, index: int) -> Example:
        if not isinstance(row, dict):
            raise BadRecord(source, INVALID_SCHEMA, f"a row must be an object, got {type(row).__name__}")
        return to_example(row, self.layout, source, index, self.base_dir)

    def iter_examples(self, stop: int | None = None, rows: Container[int] | None = None
                      ) -> Iterator[tuple[int, Example | BadRecord]]:
        """``(index, example)`` for the rows ``0 .. stop - 1`` in order (only those in ``rows`` when given), read
        a few at a time (``RowFile.iter_rows``); a bad row comes as ``(index, BadRecord)`` naming it."""
        for index, row, source in self.rows.iter_rows(stop):
            if rows is not None and index not in rows:
                continue
            if isinstance(row, BadRecord):
                yield index, row
                continue
            try:
                example = self._example(row, source, index)
            except BadRecord as bad:
                yield index, bad
                continue
            yield index, example


def to_example(row: dict, layout: str, source: str, index: int, base_dir: Path) -> Example:
    identifier = next((row[key] for key in ID_COLUMNS if not _missing(row.get(key))), index)
    if layout == "conversation":
        conversation = parse_record(row, source, base_dir)
        answer = conversation.turns[-1]
        target = " ".join(answer.texts())
        return Example(identifier, source, conversation.turns[:-1], target, [target], base_dir)
    image = ImageRef(_image_value(row.get("image"), source))
    if layout == "cord":
        target = _cord_target(row.get("ground_truth"), source)
        prompt, references = CORD_PROMPT, [target]
    elif layout == "vqa":
        key = next((key for key in QUESTION_COLUMNS if not _missing(row.get(key))), QUESTION_COLUMNS[0])
        question = row.get(key)
        if not isinstance(question, str) or not question.strip():
            raise BadRecord(source, INVALID_SCHEMA, f"{key!r} must be a non-empty string, got {question!r}")
        references = _answers(row, source)
        # Blank answers stay references (as stored) but are never the target: a tie or a majority of blanks
        # would otherwise train on an empty answer.
        target = Counter(r for r in references if r.strip()).most_common(1)[0][0]
        prompt = f"{question.strip()}\n{VQA_SUFFIX}"
    elif layout == "caption":
        references = _strings(row.get("captions") if row.get("captions") is not None else row.get("caption"),
                              "captions" if row.get("captions") is not None else "caption", source)
        target, prompt = next(r for r in references if r.strip()), CAPTION_PROMPT
    else:
        raise Gemma3VLError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    return Example(identifier, source, [Turn("user", [image, prompt])], target, references, base_dir)


def _cord_target(ground_truth: Any, source: str) -> str:
    parsed = ground_truth
    if isinstance(ground_truth, str):
        try:
            parsed = json.loads(ground_truth)
        except (ValueError, RecursionError) as exc:
            raise BadRecord(source, INVALID_SCHEMA, f"'ground_truth' is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict) or "gt_parse" not in parsed:
        keys = sorted(parsed) if isinstance(parsed, dict) else type(parsed).__name__
        raise BadRecord(source, INVALID_SCHEMA, f"'ground_truth' must be a JSON object with 'gt_parse' (got {keys})")
    return json.dumps(parsed["gt_parse"], ensure_ascii=False, sort_keys=True, separators=(",", ":"))


class Unlabelled(BadRecord):
    """A row with nothing to score against: its answers are null or blank, as in the test splits the benchmarks
    publish without their answers (DocVQA, TextVQA, VQAv2's test and test-dev)."""

    def __init__(self, source: str, detail: str):
        super().__init__(source, INVALID_SCHEMA, f"{detail}: no answer to score against (an unlabelled row, as in a "
                                                 "test split published without its answers)")


def _answers(row: dict, source: str) -> list[str]:
    # label only where the data has neither answers nor answer (HuggingFaceM4/ChartQA), not a class beside them
    columns = [key for key in ANSWER_COLUMNS if key in row and (key != "label" or not {"answers", "answer"} & set(row))]
    key = next((key for key in columns if not _missing(row[key])), None)
    if key is None:
        named = columns[0] if columns else ANSWER_COLUMNS[0]
        raise Unlabelled(source, f"{named!r} must be a string or a non-empty list of strings, got None")
    value = row[key]
    if isinstance(value, list) and not value:
        raise Unlabelled(source, f"{key!r} must be a string or a non-empty list of strings, got []")
    if isinstance(value, list):  # VQAv2 keeps {"answer", "answer_confidence", "answer_id"} objects
        value = [item.get("answer") if isinstance(item, dict) else item for item in value]
    return _strings(value, key, source)


def _missing(value: Any) -> bool:
    """None, or the NaN that pandas writes for a missing value in a numeric column."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _answer_text(value: Any) -> str | None:
    """A reference answer as text; None when it is not one. A float column (pandas turns a column of integers
    with a missing value into floats) holds 3.0 for the answer "3": integral floats are written as integers, so
    the model's "3" is not scored against "3.0"; NaN / infinity are missing answers, not the text "nan"."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value.is_integer():
            return str(int(value))
    return str(value)


def _strings(value: Any, key: str, source: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    texts = [text for text in map(_answer_text, values) if text is not None]
    if not texts or len(texts) != len(values):
        raise BadRecord(source, INVALID_SCHEMA, f"{key!r} must be a string or a non-empty list of strings, "
                                                f"got {value!r}"[:300])
    if not any(text.strip() for text in texts):
        # An unlabelled row (a test split's blank answers) would score an empty answer as correct.
        raise Unlabelled(source, f"{key!r} holds no answer, only blank text: {value!r}"[:200])
    return texts


def _image_value(value: Any, source: str) -> Any:
    """What :class:`gemma3vl.data.images.ImageLoader` opens: bytes, a path / data: URL, or a bytes+path dict."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, str):  # JSONL cannot hold bytes: base64 text
            data = _base64(data, source)
        if isinstance(data, (bytes, bytearray)):
            return {"bytes": bytes(data), "path": path}
        if isinstance(path, str) and path:
            return path
        raise BadRecord(source, INVALID_SCHEMA, "'image' holds neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        return value
    raise BadRecord(source, INVALID_SCHEMA, f"'image' must be a path, bytes or {{'bytes', 'path'}}, got "
                                            f"{type(value).__name__}")


def _base64(text: str, source: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRecord(source, INVALID_SCHEMA, f"'image' bytes are not base64 ({exc})") from None


# --------------------------------------------------------------------------------- training from layouts
class LayoutSource:
    """A :class:`gemma3vl.data.sources.RecordSource` over a layout file: rows become conversation records,
    so ``gemma3vl train`` (``data.layout``) trains on exactly the prompts ``gemma3vl eval`` asks."""

    def __init__(self, path: str | Path, layout: str = "auto", split: str | None = None):
        self.examples = ExampleFile(path, layout, split)
        self.path = self.examples.path
        self.base_dir = self.examples.base_dir

    def __len__(self) -> int:
        return len(self.examples)

    def record(self, index: int) -> tuple[Any, str]:
        example = self.examples.example(index)
        return example.conversation_record(), example.source

    def references(self, index: int) -> list[str]:
        return self.examples.example(index).references


def prompt_conversation(example: Example) -> Conversation:
    return Conversation(example.turns, example.source, example.base_dir)
