"""The data settings: one small dataclass, checked when built so a typo fails before any record is read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gemma3vl.data.encode import TRUNCATIONS
from gemma3vl.data.images import DEFAULT_MAX_REMOTE_BYTES
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.prompt import DEFAULT_MAX_IMAGE_PIXELS

FORMATS = ("auto", "messages", "llava", "texts", "hf")
ON_BAD_RECORD = ("skip", "error")
LAYOUTS = ("conversation", "auto", "cord", "vqa", "caption")  # as gemma3vl.evaluation.layouts.LAYOUTS


@dataclass(frozen=True)
class DataConfig:
    """Where the conversations are and how to turn them into training samples.

    ``format``: ``auto`` tells the file kind from the path (directory / ``.parquet`` -> HF dataset, a file
    starting with ``[`` -> JSON array, else JSONL, read whole when it turns out to be pretty-printed JSON) and the
    schema per record (``messages``, LLaVA ``conversations``, or the_cauldron / FineVision ``texts``);
    ``messages`` / ``llava`` / ``texts`` insist on one schema; ``hf`` forces a HF dataset.
    ``truncation``: ``turns`` drops whole trailing user+assistant pairs until the sample fits ``seq_length``
    (skipping it when even the first pair does not), ``skip`` skips any sample over ``seq_length``.
    ``on_bad_record``: ``skip`` logs the record's ``file:line`` and counts it in the summary, ``error`` stops.
    ``pan_and_scan``: ``None`` follows the checkpoint's ``preprocessor_config.json`` (as inference does).
    ``columns``: for HF datasets, record key -> column name, e.g. ``{"messages": "chat", "images": "pictures"}``
    (keys: ``messages``, ``conversations``, ``texts``, ``images``, ``image``).
    ``shuffle`` / ``seed``: each epoch visits the records in an order fixed by ``(seed, epoch)``.
    ``layout``: ``conversation`` reads conversation records as above; ``cord``, ``vqa``, ``caption`` (or
    ``auto``, told from the columns) read the field's dataset layouts from parquet or JSONL and turn each row
    into a conversation (``gemma3vl.evaluation.layouts``).
    """

    path: str | Path
    format: str = "auto"
    seq_length: int = 4096
    packing: bool = True
    truncation: str = "turns"
    on_bad_record: str = "skip"
    pan_and_scan: bool | None = None
    allow_remote_images: bool = False
    allow_outside_paths: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_remote_image_bytes: int = DEFAULT_MAX_REMOTE_BYTES
    shuffle: bool = True
    seed: int = 0
    columns: dict[str, str] | None = None
    split: str = "train"
    layout: str = "conversation"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("format", self.format, FORMATS),
            ("truncation", self.truncation, TRUNCATIONS),
            ("on_bad_record", self.on_bad_record, ON_BAD_RECORD),
            ("layout", self.layout, LAYOUTS),
        ):
            if value not in allowed:
                raise Gemma3VLError(f"data {name} must be one of {', '.join(allowed)}, got {value!r}")
        for name in ("seq_length", "max_image_pixels", "max_remote_image_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise Gemma3VLError(f"data {name} must be a positive integer, got {value!r}")
        columns = self.columns
        if columns is not None and not (
            isinstance(columns, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items())
        ):
            raise Gemma3VLError(f"data columns must map record keys to column names, got {self.columns!r}")

    @property
    def record_format(self) -> str:
        """The schema records are parsed with (``auto`` for HF datasets, which may hold either)."""
        return "auto" if self.format == "hf" else self.format

    @property
    def source_format(self) -> str:
        return "hf" if self.format == "hf" else "auto"
