"""Where records come from: a JSONL file, a JSON array file (LLaVA's usual form), or a local HF dataset.

Every source gives random access by record index (the dataset shuffles an index order, and resumes by
position in it) and a ``file:line`` label per record, so a bad record can be named. Reading a record's text
happens on access, so a malformed line is a bad *record*, skipped or fatal like any other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from gemma3vl.data.records import INVALID_JSON, BadRecord, parse_json_line
from gemma3vl.errors import Gemma3VLError

# Record keys a Hugging Face dataset column can be mapped onto (DataConfig.columns: key -> column name).
COLUMN_KEYS = ("messages", "images", "conversations", "image")


class RecordSource(Protocol):
    path: Path
    base_dir: Path  # where relative image paths start

    def __len__(self) -> int: ...

    def record(self, index: int) -> tuple[Any, str]:
        """The raw record and its ``file:line`` label (raises :class:`BadRecord` for undecodable text)."""
        ...


class JsonlSource:
    """One JSON object per line; blank lines are not records. Indexing stores one byte offset per record.

    Pretty-printed JSON named ``.jsonl`` (``jq .`` output, ``json.dump(..., indent=2)``: one or more objects,
    each spanning several lines) is told by its first record line, which is not JSON by itself while the next
    one is not either. Such a file is read whole as a sequence of JSON values, each a record labelled with the
    line it starts on; a syntax error in it is fatal (with its line), as in a JSON array file.
    """

    def __init__(self, path: Path):
        self.path = path
        self.base_dir = path.parent
        self.offsets: list[int] = []
        self.line_numbers: list[int] = []
        self.records: list[Any] | None = None  # the values of a pretty-printed file, read whole
        offset = 0
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.removeprefix(b"\xef\xbb\xbf").strip():  # a byte-order mark alone is a blank line
                    self.offsets.append(offset)
                    self.line_numbers.append(number)
                offset += len(line)
        if self._looks_pretty_printed():
            self._read_json_values()

    def __len__(self) -> int:
        return len(self.records) if self.records is not None else len(self.offsets)

    def record(self, index: int) -> tuple[Any, str]:
        source = f"{self.path}:{self.line_numbers[index]}"
        if self.records is not None:
            return self.records[index], source
        text = self._line(index, source)
        try:
            return parse_json_line(text, source), source
        except BadRecord as bad:
            if not _cut_short(text):
                raise
            raise BadRecord(
                source, INVALID_JSON, f"{bad.detail}; the line ends before its JSON value does (a record spanning "
                "several lines? a .jsonl file holds one object per line)"
            ) from None

    def _line(self, index: int, source: str) -> str:
        with self.path.open("rb") as handle:
            handle.seek(self.offsets[index])
            raw = handle.readline()
        try:
            return raw.decode("utf-8").lstrip("\ufeff")  # a byte-order mark may open the file
        except UnicodeDecodeError as exc:
            raise BadRecord(source, INVALID_JSON, f"not UTF-8 text ({exc})") from None

    def _looks_pretty_printed(self) -> bool:
        """The first record line opens an object it does not close, and the second line is no record either
        (a JSONL file whose first record alone is broken keeps being read line by line)."""
        lines = []
        for index in range(min(2, len(self.offsets))):
            try:
                lines.append(self._line(index, ""))
            except BadRecord:
                return False
        if not lines or not lines[0].lstrip().startswith("{") or not _cut_short(lines[0]):
            return False
        return len(lines) < 2 or not _is_json(lines[1])

    def _read_json_values(self) -> None:
        text = _read_text(self.path)
        decoder = json.JSONDecoder()
        self.records, self.line_numbers = [], []
        at, line, counted = _skip_space(text, 0), 1, 0
        while at < len(text):
            line += text.count("\n", counted, at)
            counted = at
            try:
                value, at = decoder.raw_decode(text, at)
            except (ValueError, RecursionError) as exc:
                where = line + text.count("\n", counted, getattr(exc, "pos", at))
                raise Gemma3VLError(
                    f"{self.path}:{where}: this file looks like pretty-printed JSON (a record spans several lines), "
                    f"not one object per line, and it is not valid JSON ({exc}); fix it, or write one object per "
                    "line (e.g. jq -c)"
                ) from None
            self.records.append(value)
            self.line_numbers.append(line)
            at = _skip_space(text, at)


class JsonArraySource:
    """A file holding one JSON array of records. Records are labelled with the line each one starts on.

    The file is parsed whole; a syntax error anywhere makes the array unreadable, so it is fatal (with its
    line), unlike a bad line of a JSONL file.
    """

    def __init__(self, path: Path):
        self.path = path
        self.base_dir = path.parent
        text = _read_text(path)
        self.records: list[Any] = []
        self.line_numbers: list[int] = []
        decoder = json.JSONDecoder()
        at = _skip_space(text, 0)
        if text[at : at + 1] != "[":
            raise Gemma3VLError(f"{path}: a .json dataset must hold one JSON array of records")
        at = _skip_space(text, at + 1)
        line, counted = 1, 0
        while text[at : at + 1] != "]":
            line += text.count("\n", counted, at)
            counted = at
            try:
                value, at = decoder.raw_decode(text, at)
            except (ValueError, RecursionError) as exc:
                raise Gemma3VLError(f"{path}:{line}: not valid JSON ({exc}); the whole array is unreadable") from None
            self.records.append(value)
            self.line_numbers.append(line)
            at = _skip_space(text, at)
            if text[at : at + 1] == ",":
                at = _skip_space(text, at + 1)
            elif text[at : at + 1] != "]":
                where = line + text.count("\n", counted, at)
                raise Gemma3VLError(f"{path}:{where}: expected ',' or ']' between records")

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> tuple[Any, str]:
        return self.records[index], f"{self.path}:{self.line_numbers[index]}"


class HFDatasetSource:
    """A local Hugging Face dataset (a ``save_to_disk`` directory, a data directory, or parquet files).

    ``columns`` maps record keys (``messages``, ``images``, ``conversations``, ``image``) to the dataset's
    column names; rows are read as records with those keys, so they parse like JSON records. Records are
    labelled ``path:row N`` (0-based rows).
    """

    def __init__(self, path: Path, *, split: str = "train", columns: dict[str, str] | None = None):
        self.path = path
        self.base_dir = path if path.is_dir() else path.parent
        self.dataset = _load_hf_dataset(path, split)
        names = set(self.dataset.column_names)
        columns = dict(columns or {})
        unknown = sorted(set(columns) - set(COLUMN_KEYS))
        if unknown:
            raise Gemma3VLError(f"columns: unknown key(s) {unknown}; map any of {list(COLUMN_KEYS)} to column names")
        missing = sorted(column for column in columns.values() if column not in names)
        if missing:
            raise Gemma3VLError(f"{path}: no column(s) {missing}; the dataset has {sorted(names)}")
        # Unmapped keys read the column of the same name when there is one.
        self.columns = {key: columns.get(key, key) for key in COLUMN_KEYS if columns.get(key, key) in names}
        if "messages" not in self.columns and "conversations" not in self.columns:
            raise Gemma3VLError(
                f"{path}: no 'messages' or 'conversations' column (columns: {sorted(names)}); map one with "
                "data.columns=messages=<column> (gemma3vl train) or columns={'messages': '<column>'} (Python)"
            )

    def __len__(self) -> int:
        return len(self.dataset)

    def record(self, index: int) -> tuple[Any, str]:
        row = self.dataset[index]
        return {key: row[column] for key, column in self.columns.items()}, f"{self.path}:row {index}"


def is_hf_dataset(path: str | Path, source_format: str = "auto") -> bool:
    """Whether ``path`` is read as a Hugging Face dataset: a directory, ``.parquet`` files, or ``format=hf``."""
    path = Path(path)
    return source_format == "hf" or path.is_dir() or path.suffix == ".parquet"


def open_records(
    path: str | Path, *, source_format: str = "auto", split: str = "train", columns: dict[str, str] | None = None,
    layout: str = "conversation",
) -> RecordSource:
    """The source for ``path``: directories and ``.parquet`` files (or ``source_format="hf"``) are HF
    datasets; a file whose first character is ``[`` is a JSON array (whatever its name); any other file is
    JSONL (or pretty-printed JSON objects, see :class:`JsonlSource`).

    A ``layout`` other than ``conversation`` reads the rows of a CORD-v2 / VQA / caption dataset (parquet or
    JSONL) as conversations (``gemma3vl.evaluation.layouts``)."""
    path = Path(path)
    if not path.exists():
        raise Gemma3VLError(f"{path}: no such dataset file or directory")
    if layout != "conversation":
        from gemma3vl.evaluation.layouts import LayoutSource

        if columns:
            raise Gemma3VLError("columns do not apply with a dataset layout (the layout names the columns)")
        # A directory of parquet files keeps the split's files where they are named by split (HF's
        # data/<split>-*.parquet), and is read whole otherwise.
        named = path.is_dir() and any(f.name.startswith(f"{split}-") or f.stem == split
                                      for f in path.rglob("*.parquet"))
        return LayoutSource(path, layout, split=split if named else None)
    if is_hf_dataset(path, source_format):
        return HFDatasetSource(path, split=split, columns=columns)
    if columns:
        raise Gemma3VLError("columns only apply to Hugging Face datasets (a directory or .parquet files)")
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return JsonArraySource(path) if head[:1] == b"[" else JsonlSource(path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Gemma3VLError(f"{path}: not UTF-8 text ({exc})") from None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def _cut_short(text: str) -> bool:
    """Whether ``text`` is JSON that stops before its value is complete (the rest is on later lines)."""
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return exc.pos >= len(text.rstrip())
    except (ValueError, RecursionError):
        return False
    return False


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def _load_hf_dataset(path: Path, split: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise Gemma3VLError(
            f"{path}: reading a Hugging Face dataset needs the 'datasets' package (pip install datasets)"
        ) from None
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(path))  # written by save_to_disk
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise Gemma3VLError(f"{path}: no split {split!r} (splits: {sorted(loaded)})")
                loaded = loaded[split]
            return loaded
        if path.is_dir():
            return datasets.load_dataset(str(path), split=split)
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Gemma3VLError:
        raise
    except Exception as exc:  # datasets raises many types; the path and the reason is what the user needs
        raise Gemma3VLError(f"{path}: cannot load the dataset: {exc}") from None
