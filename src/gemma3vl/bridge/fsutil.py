"""Crash-safe output directories and the non-weight files that travel with a checkpoint.

A conversion writes into a hidden sibling ``.NAME.tmp-<pid>`` and renames it into place only once every
file is complete and fsynced, so ``NAME`` is either absent, the old contents, or the whole new checkpoint:
never half of one. Any failure removes the temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from gemma3vl.errors import Gemma3VLError

# Files that are weights (ours to convert or not ours to carry); everything else in an HF dir is a side file.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_durable(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def copy_file_durable(source: Path, target: Path) -> None:
    """Copy contents (following symlinks, as the Hub cache uses them) and fsync the copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    with open(target, "rb+") as handle:
        os.fsync(handle.fileno())


def side_files(directory: Path) -> list[str]:
    """Relative paths of every non-weight file under ``directory`` except config.json (which the manifest
    keeps verbatim); hidden entries (``.cache``, ``.git``) are skipped."""
    found = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            relative = path.relative_to(directory).as_posix()
            if name.startswith(".") or relative == "config.json" or name.endswith(WEIGHT_SUFFIXES):
                continue
            if path.is_file():
                found.append(relative)
    return found


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output_dir(out_dir: Path, overwrite: bool, *inputs: Path) -> None:
    """Refuse before any work: a non-empty ``out_dir`` (unless overwrite), a file in its place, or an
    ``out_dir`` that is, is inside, or contains an input directory (overwriting would delete the input)."""
    out = out_dir.resolve()
    for source in inputs:
        source = source.resolve()
        if out == source or source in out.parents:
            raise Gemma3VLError(f"{out_dir}: the output directory cannot be inside the input directory {source}")
        if out in source.parents:
            raise Gemma3VLError(f"{out_dir}: the output directory cannot contain the input directory {source}")
    if out_dir.exists() and not out_dir.is_dir():
        raise Gemma3VLError(f"{out_dir}: exists and is not a directory")
    if out_dir.exists() and not _is_empty_dir(out_dir) and not overwrite:
        raise Gemma3VLError(f"{out_dir}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")


@contextlib.contextmanager
def staged_output(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out_dir`` when the block finishes without error."""
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if staging.exists():  # left by a crashed run that had our pid
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
        for root, _, _ in os.walk(staging):  # file contents are fsynced as written; now their names
            fsync_dir(Path(root))
        retired = None
        if out_dir.exists():
            if _is_empty_dir(out_dir):
                out_dir.rmdir()
            else:
                retired = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
                os.rename(out_dir, retired)
        os.rename(staging, out_dir)
        fsync_dir(out_dir.parent)
        if retired is not None:
            shutil.rmtree(retired)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
