"""Where records come from: a JSONL file, a JSON array file (LLaVA's usual form), a local HF dataset (a
``save_to_disk`` directory, parquet files, a data directory of them), or a data directory of JSONL / JSON files.

Every source gives random access by record index (the dataset shuffles an index order, and resumes by
position in it) and a ``file:line`` label per record, so a bad record can be named. Reading a record's text
happens on access, so a malformed line is a bad *record*, skipped or fatal like any other.
"""

from __future__ import annotations

import bisect
import copy
import json
import logging
import re
from pathlib import Path
from typing import Any, Protocol

from gemma3vl.data.records import INVALID_JSON, INVALID_SCHEMA, BadRecord, parse_json_line
from gemma3vl.errors import Gemma3VLError

# Record keys a Hugging Face dataset column can be mapped onto (DataConfig.columns: key -> column name).
COLUMN_KEYS = ("messages", "images", "conversations", "image", "texts")

logger = logging.getLogger("gemma3vl.data")


class RecordSource(Protocol):
    """(A source whose records' image paths start in different directories also has ``record_base_dir(index)``.)"""

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
        end = _skip_space(text, at + 1)
        if end < len(text):  # a second array, or any other text: its records would be lost without a word
            where = line + text.count("\n", counted, end)
            raise Gemma3VLError(
                f"{path}:{where}: text after the array's closing ']' (a second array? one file holds one JSON array "
                "of records, or one JSON object per line)"
            )

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> tuple[Any, str]:
        return self.records[index], f"{self.path}:{self.line_numbers[index]}"


class HFDatasetSource:
    """A local Hugging Face dataset (a ``save_to_disk`` directory, a data directory, or parquet files).

    ``columns`` maps record keys (``messages``, ``images``, ``conversations``, ``image``, ``texts``) to the
    dataset's column names; rows are read as records with those keys, so they parse like JSON records. Records are
    labelled ``file:row N`` (0-based rows): a parquet shard's own row, or the row of ``path`` (of its split's
    directory, for a ``save_to_disk`` dataset with splits).

    A null in a column or a struct field is a key the record does not have (a table holding both ``messages`` and
    LLaVA ``conversations`` rows has nulls in the other column). Images of an ``Image`` feature are read undecoded
    (``{"bytes", "path"}``) and opened by :class:`gemma3vl.data.images.ImageLoader` under the data settings, as
    those of JSON records: ``datasets`` would decode the whole picture before the pixel limit is checked, open
    any path and fetch URLs, and a corrupt picture would end the run instead of being a bad record.
    """

    def __init__(
        self, path: Path, *, split: str = "train", columns: dict[str, str] | None = None,
        data_files: tuple[str, list[str]] | None = None,
    ):
        self.path = path
        self.base_dir = path if path.is_dir() else path.parent
        dataset = _load_hf_dataset(path, split, data_files)
        names = set(dataset.column_names)
        self.columns = _column_keys(path, columns, names)
        dataset = dataset.select_columns(list(dict.fromkeys(self.columns.values())))
        self.dataset = dataset
        self._rows = dataset.with_format("arrow")  # rows as pyarrow tables: nothing decoded
        self._features = _undecoded_images(dataset.features)
        # Labels: a shard's own row (``file:row N``, as gemma3vl eval names them) when the rows come from parquet
        # files; else the row of the split's directory of a save_to_disk DatasetDict, or of ``path``.
        self._shards = _parquet_shards(data_files, len(dataset))
        self._shard_starts = None if self._shards is None else [start for _, start in self._shards]
        split_dir = path / split
        self._where = split_dir if path.is_dir() and not _is_data_directory(path) and split_dir.is_dir() else path

    def __len__(self) -> int:
        return len(self.dataset)

    def label(self, index: int) -> str:
        """Row ``index``'s ``file:row N`` label."""
        if self._shards is None:
            return f"{self._where}:row {index}"
        file, start = self._shards[bisect.bisect_right(self._shard_starts, index) - 1]
        return f"{file}:row {index - start}"

    def record(self, index: int) -> tuple[Any, str]:
        source = self.label(index)
        row = self._rows[index].to_pylist()[0]
        try:
            row = self._features.decode_example(row)  # what the dataset's features decode, but images
        except Exception as exc:  # noqa: BLE001 (a feature's own decoding; the row is what is bad)
            raise BadRecord(source, INVALID_SCHEMA, f"cannot decode the row ({type(exc).__name__}: {exc})") from None
        return _without_nulls({key: row[column] for key, column in self.columns.items()}), source


class JsonFilesSource:
    """The JSONL / JSON array files of a data directory (one split's), each read as :func:`open_records` reads one
    file, in file-name order: records are labelled with their own ``file:line``, a bad line is one bad record,
    records need not share a schema, and image paths are relative to (and inside) the record's own file's
    directory. ``columns`` renames record keys as for a Hugging Face dataset."""

    def __init__(self, path: Path, files: list[Path], columns: dict[str, str] | None = None):
        self.path = path
        self.base_dir = path
        self.columns = _column_keys(path, columns, None)
        self.sources: list[RecordSource] = [_json_file(file) for file in files]
        self.starts = [0]
        for part in self.sources:
            self.starts.append(self.starts[-1] + len(part))

    def __len__(self) -> int:
        return self.starts[-1]

    def record(self, index: int) -> tuple[Any, str]:
        at = self._file(index)
        raw, source = self.sources[at].record(index - self.starts[at])
        if self.columns is None or not isinstance(raw, dict):
            return raw, source
        return {key: raw[column] for key, column in self.columns.items() if column in raw}, source

    def record_base_dir(self, index: int) -> Path:
        """Where record ``index``'s relative image paths start: its own file's directory."""
        return self.sources[self._file(index)].base_dir

    def _file(self, index: int) -> int:
        return bisect.bisect_right(self.starts, index) - 1


def _column_keys(path: Path, columns: dict[str, str] | None, names: set[str] | None) -> dict[str, str] | None:
    """Record key -> column for the keys a source reads (``names``: the dataset's columns; ``None`` for JSON
    files, whose records keep their own keys unless ``columns`` maps some)."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(COLUMN_KEYS))
    if unknown:
        raise Gemma3VLError(f"columns: unknown key(s) {unknown}; map any of {list(COLUMN_KEYS)} to column names")
    if names is None:
        # Unmapped keys keep the key of the same name.
        return {key: columns.get(key, key) for key in COLUMN_KEYS} if columns else None
    missing = sorted(column for column in columns.values() if column not in names)
    if missing:
        raise Gemma3VLError(f"{path}: no column(s) {missing}; the dataset has {sorted(names)}")
    # Unmapped keys read the column of the same name when there is one.
    mapped = {key: columns.get(key, key) for key in COLUMN_KEYS if columns.get(key, key) in names}
    if not {"messages", "conversations", "texts"} & set(mapped):
        raise Gemma3VLError(
            f"{path}: no 'messages' or 'conversations' column (nor the_cauldron / FineVision 'texts'; columns: "
            f"{sorted(names)}); map one with data.columns=messages=<column> (gemma3vl train) or "
            "columns={'messages': '<column>'} (Python)"
        )
    return mapped


def _without_nulls(value: Any) -> Any:
    """A table row as the record it stands for: a null in a struct (or a column) is a key the record lacks, since a
    table gives every row every column and every struct every field (``messages`` and ``conversations`` rows side by
    side, ``from``/``value`` and ``role``/``content`` entries, ``texts`` entries' own fields). Nulls inside lists
    stay (they are bad values)."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _undecoded_images(features: Any) -> Any:
    """``features`` with every ``Image`` (nested in lists and structs too) left undecoded."""
    import datasets

    def visit(feature: Any) -> Any:
        if isinstance(feature, datasets.Image):
            plain = copy.copy(feature)
            plain.decode = False
            return plain
        if isinstance(feature, dict):  # Features, or a struct
            return type(feature)({key: visit(value) for key, value in feature.items()})
        if isinstance(feature, (list, tuple)):  # the old spelling of a list feature: [feature]
            return type(feature)(visit(value) for value in feature)
        if hasattr(feature, "feature"):  # List, LargeList, Sequence
            nested = copy.copy(feature)
            nested.feature = visit(feature.feature)
            return nested
        return feature

    return visit(features)


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
        data_files = _directory_data_files(path, split) if _is_data_directory(path) else None
        if data_files is not None and data_files[0] == "json":
            return JsonFilesSource(path, [Path(file) for file in data_files[1]], columns)
        return HFDatasetSource(path, split=split, columns=columns, data_files=data_files)
    if columns:
        raise Gemma3VLError("columns only apply to Hugging Face datasets (a directory or .parquet files)")
    return _json_file(path)


def _json_file(path: Path) -> RecordSource:
    """A JSON array file when its first character is ``[``, else JSONL (or pretty-printed objects)."""
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return JsonArraySource(path) if head[:1] == b"[" else JsonlSource(path)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise Gemma3VLError(f"{path}:{line}: not UTF-8 text ({exc})") from None


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


def _is_data_directory(path: Path) -> bool:
    """A directory of data files (not one written by ``save_to_disk``)."""
    return path.is_dir() and not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


# The data files a directory's split is read from, by kind (the ``datasets`` builder that reads them).
DATA_FILE_KINDS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}
# ``datasets``' folder datasets (imagefolder ...) take their other columns from these files.
FOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def _directory_data_files(path: Path, split: str) -> tuple[str, list[str]] | None:
    """The kind and files of ``split`` in a data directory, the split told by Hugging Face's file naming
    (``data/train-00000-of-00002.parquet``, ``train.jsonl``, ``train/`` ...; every file is ``train`` without
    one), or ``None`` to leave the directory to ``datasets.load_dataset`` (a dataset card that declares configs,
    a folder dataset's metadata file, files of no kind read here).

    ``datasets`` itself would pick its builder by the most common extension, so pictures kept beside the data
    (``images/*.png``) would turn the directory into an image folder without a conversation column.
    """
    try:
        from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns
    except ImportError:
        return None  # (no datasets: _load_hf_dataset says so; an older one: it decides as before)
    card = path / "README.md"
    if card.is_file() and re.search(r"^configs:", _front_matter(card), re.MULTILINE):
        return None
    try:
        splits = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except EmptyDatasetError:
        raise Gemma3VLError(f"{path}: no data files in this directory") from None
    except Exception:  # noqa: BLE001 (another datasets version's internals: let load_dataset decide)
        return None
    if split not in splits:
        raise Gemma3VLError(f"{path}: no split {split!r} (splits: {sorted(map(str, splits))})")
    files = [str(file) for file in splits[split]]
    if any(Path(file).name in FOLDER_METADATA for file in files):
        return None
    kinds = _by_kind(files)
    if not kinds:
        # The split's files hold no data file: Hugging Face's naming matched folders of pictures first (the tiny
        # recipe's images-train/ beside train.jsonl is the train split, and train.jsonl is left out), which would
        # load the directory as an image folder without a conversation column. Tell the split of the data files.
        kinds = _by_kind(_data_files_of_split(path, split))
    if not kinds:
        return None
    # The most common kind (parquet first on a draw), as datasets would choose among these.
    kind = max(kinds, key=lambda name: (len(kinds[name]), name == "parquet", name == "arrow"))
    ignored = sorted(file for other, named in kinds.items() if other != kind for file in named)
    if ignored:
        logger.warning("%s: reading the %d %s file(s) of split %r, not the %d other data file(s) (%s%s)", path,
                       len(kinds[kind]), kind, split, len(ignored), ", ".join(ignored[:3]),
                       ", ..." if len(ignored) > 3 else "")
    return kind, sorted(kinds[kind])


def _by_kind(files: list[str]) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {}
    for file in files:
        kind = DATA_FILE_KINDS.get(Path(file).suffix.lower())
        if kind is not None:
            kinds.setdefault(kind, []).append(file)
    return kinds


def _data_files_of_split(path: Path, split: str) -> list[str]:
    """The data files (``.jsonl``, ``.parquet`` ...) under ``path`` of ``split``, told by Hugging Face's keywords
    (``train``/``training``; ``validation``/``valid``/``dev``/``val``; ``test``/``testing``/``eval``/``evaluation``)
    in their folder names first, then in their file names, as ``datasets`` tells them, but among data files only;
    without any keyword every data file is ``train``. An error when data files exist but none is of ``split``."""
    try:
        from datasets.data_files import SPLIT_KEYWORDS
    except ImportError:  # another datasets version: load_dataset decides, as before
        return []
    files = sorted(file for file in path.rglob("*")
                   if file.is_file() and file.suffix.lower() in DATA_FILE_KINDS and file.name not in FOLDER_METADATA
                   and not any(part.startswith(".") for part in file.relative_to(path).parts))
    if not files:
        return []

    def split_of(texts: tuple[str, ...]) -> str | None:
        for text in texts:
            tokens = set(re.split(r"[-._ 0-9]+", text.lower()))
            for name, keywords in SPLIT_KEYWORDS.items():
                if tokens & set(keywords):
                    return str(name)
        return None

    for part in ("folders", "names"):
        splits: dict[str, list[str]] = {}
        for file in files:
            relative = file.relative_to(path)
            found = split_of(relative.parts[:-1] if part == "folders" else (relative.name,))
            if found is not None:
                splits.setdefault(found, []).append(str(file))
        if splits:
            if split not in splits:
                raise Gemma3VLError(f"{path}: no split {split!r} among its data files (splits: {sorted(splits)})")
            return splits[split]
    if split != "train":
        raise Gemma3VLError(f"{path}: no split {split!r} among its data files (their names give none: all are train)")
    return [str(file) for file in files]


def _front_matter(card: Path) -> str:
    """The YAML block opening a dataset card (``---`` ... ``---``), or ``""``."""
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return ""
    end = text.find("\n---", 3)
    return text[3:end] if end >= 0 else ""


def in_split(file: Path, root: Path, split: str) -> bool:
    """HF's naming: data/<split>-00000-of-00001.parquet, <split>.parquet, or files under <split>/ directories
    (below ``root``)."""
    return (file.name.startswith(f"{split}-") or file.stem == split
            or split in file.relative_to(root).parts[:-1])


def _check_unsplit(path: Path, split: str, what: str) -> None:
    """A source without splits is read whole, whatever ``split`` says: asked for a split other than the default
    (``train``) that its own name does not give (``test.parquet``, ``test-00000-of-00001.parquet``, ``test/``),
    it is refused, not read: ``data.eval_split=test`` on the training file would evaluate on the training rows."""
    if split == "train" or in_split(path, path.parent.parent, split):  # (its own name or folder only)
        return
    raise Gemma3VLError(
        f"{path}: {what}, read whole: it has no split {split!r} to choose (data.split / data.eval_split); give the "
        f"held-out rows as their own file (data.eval_path / --eval-data), or a data directory or DatasetDict with "
        f"splits")


def _parquet_shards(data_files: tuple[str, list[str]] | None, rows: int) -> list[tuple[str, int]] | None:
    """Each parquet data file and the index of its first row in the loaded dataset (datasets reads them in this
    order), from the files' footers; None for other kinds, or when the counts do not add up to ``rows``."""
    if data_files is None or data_files[0] != "parquet":
        return None
    try:
        import pyarrow.parquet as pq

        shards, start = [], 0
        for file in data_files[1]:
            shards.append((file, start))
            start += pq.ParquetFile(file).metadata.num_rows
    except Exception:  # noqa: BLE001 (a footer pyarrow cannot read: datasets read it, so label by the whole)
        return None
    return shards if start == rows else None


def _load_hf_dataset(path: Path, split: str, data_files: tuple[str, list[str]] | None = None) -> Any:
    try:
        import datasets
    except ImportError:
        raise Gemma3VLError(
            f"{path}: reading a Hugging Face dataset needs the 'datasets' package (pip install datasets)"
        ) from None
    try:
        if path.is_dir() and not _is_data_directory(path):
            loaded = datasets.load_from_disk(str(path))  # written by save_to_disk
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise Gemma3VLError(f"{path}: no split {split!r} (splits: {sorted(loaded)})")
                loaded = loaded[split]
            else:
                _check_unsplit(path, split, "one dataset saved without splits (save_to_disk of a Dataset)")
            return loaded
        if data_files is not None:
            kind, files = data_files
            return datasets.load_dataset(kind, data_files=files, split="train")
        if path.is_dir():
            return datasets.load_dataset(str(path), split=split)
        _check_unsplit(path, split, "one file")
        kind = DATA_FILE_KINDS.get(path.suffix.lower(), "parquet")  # (data.format=hf on a .jsonl file too)
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Gemma3VLError:
        raise
    except Exception as exc:  # datasets raises many types; the path and the reason is what the user needs
        raise Gemma3VLError(f"{path}: cannot load the dataset: {exc}") from None
