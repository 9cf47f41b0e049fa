"""Crash-safe output directories and the non-weight files that travel with a checkpoint.

A conversion writes into a hidden sibling ``.NAME.tmp-<pid>`` and renames it into place only once every
file is complete and fsynced, so ``NAME`` is either absent, the old contents, or the whole new checkpoint:
never half of one. Replacing a non-empty ``NAME`` (``overwrite``) swaps the two directories in one atomic
``renameat2(RENAME_EXCHANGE)`` where the filesystem has it; elsewhere the old one is first renamed aside to
``.NAME.old-<pid>``, and a run killed between the two renames has it put back by the next run. Any error
removes the temporary directory (an ``OSError`` such as a full disk becomes a :class:`Gemma3VLError` naming
the output). A process killed with SIGKILL cannot clean up: its ``.NAME.tmp-<pid>`` stays until the next
write to ``NAME``, which removes the leftovers of processes that are no longer running, and says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

from gemma3vl.errors import Gemma3VLError

logger = logging.getLogger("gemma3vl.bridge")

# Files that are weights (ours to convert or not ours to carry); everything else in an HF dir is a side file.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes (a ValueError saying what is wrong otherwise)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGIB")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB)") from None
    if unit not in units or not 0 < value < float("inf"):
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    return int(value * units[unit])


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
    """Copy contents (following symlinks, as the Hub cache uses them) and fsync the copy. A source that cannot be
    opened is an error naming it (an input's fault), not the output's (``staged_output`` reports OSErrors as the
    output's)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        reader = open(source, "rb")
    except OSError as exc:
        raise Gemma3VLError(f"{source}: cannot read ({exc.strerror or exc})") from None
    with reader, open(target, "wb") as writer:
        shutil.copyfileobj(reader, writer)
        writer.flush()
        os.fsync(writer.fileno())


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


def blocking_file(path: Path) -> Path | None:
    """A parent of ``path`` that exists as a file, not a directory (so ``path`` cannot be made), or None."""
    return next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)


def check_output_dir(out_dir: Path, overwrite: bool, *inputs: Path) -> None:
    """Refuse before any work: a non-empty ``out_dir`` (unless overwrite), a file in its place or in place of one
    of its parents, or an ``out_dir`` that is, is inside, or contains an input directory (overwriting would delete
    the input)."""
    out = out_dir.resolve()
    for source in inputs:
        source = source.resolve()
        if out == source or source in out.parents:
            raise Gemma3VLError(f"{out_dir}: the output directory cannot be inside the input directory {source}")
        if out in source.parents:
            raise Gemma3VLError(f"{out_dir}: the output directory cannot contain the input directory {source}")
    if out_dir.exists() and not out_dir.is_dir():
        raise Gemma3VLError(f"{out_dir}: exists and is not a directory")
    blocking = blocking_file(out_dir)
    if blocking is not None:
        raise OutputNotWritten(out_dir, f"{blocking} is a file, not a directory", False)
    if out_dir.exists() and not _is_empty_dir(out_dir) and not overwrite:
        raise Gemma3VLError(f"{out_dir}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")


class OutputNotWritten(Gemma3VLError):
    """An output directory could not be written (a full disk, ...); nothing of the attempt is left."""

    def __init__(self, out_dir: Path, reason: str, replaced: bool):
        kept = "its previous contents are untouched" if replaced else "nothing was left behind"
        super().__init__(f"{out_dir}: cannot write the output ({reason}); {kept}")
        self.reason = reason


@contextlib.contextmanager
def staged_output(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out_dir`` when the block finishes without error."""
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        _recover_leftovers(out_dir)  # first: an output put back must not then be replaced without overwrite
        check_output_dir(out_dir, overwrite)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():  # left by a crashed run that had our pid
            shutil.rmtree(staging)
        staging.mkdir()
    except OSError as exc:  # a read-only location, a file where a parent directory should be, ...
        blocking = blocking_file(out_dir)
        reason = f"{blocking} is a file, not a directory" if blocking is not None else _reason(exc)
        raise OutputNotWritten(out_dir, reason, False) from None
    replaced = out_dir.exists() and not _is_empty_dir(out_dir)
    try:
        yield staging
        for root, _, _ in os.walk(staging):  # file contents are fsynced as written; now their names
            fsync_dir(Path(root))
        _move_into_place(staging, out_dir)
    except OSError as exc:  # a full disk, a read-only or vanished directory: the output and the reason
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputNotWritten(out_dir, _reason(exc), replaced) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _reason(exc: OSError) -> str:
    return f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else exc.strerror or str(exc)


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """``staging`` becomes ``out_dir``; at no instant is ``out_dir`` a mixture of the two, or (where the
    filesystem can swap atomically) missing."""
    if out_dir.exists() and _is_empty_dir(out_dir):
        out_dir.rmdir()
    if not out_dir.exists():
        os.rename(staging, out_dir)
        fsync_dir(out_dir.parent)
        return
    if _exchange(staging, out_dir):  # staging now holds the old output
        fsync_dir(out_dir.parent)
        shutil.rmtree(staging)
        return
    retired = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    os.rename(out_dir, retired)
    os.rename(staging, out_dir)  # a kill before this line leaves retired for _recover_leftovers to restore
    fsync_dir(out_dir.parent)
    shutil.rmtree(retired)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False where unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the filesystem (or kernel) cannot swap: fall back to two renames
    raise OSError(code, os.strerror(code), str(b))


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def native_copy_dir(out_dir: Path) -> Path:
    """Where ``export_model`` writes the native copy it exports ``out_dir`` from (hidden beside it, named by this
    process, so that any later writer to ``out_dir`` can tell a killed process's copy and remove it)."""
    return out_dir.parent / f".{out_dir.name}.native-{os.getpid()}"


def remove_native_leftovers(out_dir: Path) -> None:
    """Remove the native copies (:func:`native_copy_dir`) of killed exports to ``out_dir``, and their own
    staging leftovers (``..OUT.native-PID.tmp-PID``, ``..OUT.native-PID.old-PID``): a whole model each."""
    for prefix in (f".{out_dir.name}.native-", f"..{out_dir.name}.native-"):
        for leftover in sorted(out_dir.parent.glob(f"{glob.escape(prefix)}*")):
            pid = leftover.name[len(prefix):].split(".", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_running(int(pid)):
                continue
            shutil.rmtree(leftover, ignore_errors=True)
            logger.warning("%s: removed %s, the native copy of an export by process %s, which was killed", out_dir,
                           leftover.name, pid)


def _recover_leftovers(out_dir: Path) -> None:
    """Tidy what killed writers to ``out_dir`` left: an old output renamed aside while ``out_dir`` is
    missing is put back (it was the last complete one); other temporary directories of processes that are
    no longer running are removed. Directories of running processes are left alone."""
    remove_native_leftovers(out_dir)
    for leftover in sorted(out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*-*")):
        kind, _, pid = leftover.name[len(out_dir.name) + 2:].rpartition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or int(pid) == os.getpid() or _pid_running(int(pid)):
            continue
        if kind == "old" and not out_dir.exists():
            os.rename(leftover, out_dir)
            logger.warning("%s: restored the previous output from %s (a run was killed while replacing it)",
                           out_dir, leftover.name)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
            logger.warning("%s: removed %s, left by process %s, which was killed while writing", out_dir,
                           leftover.name, pid)
