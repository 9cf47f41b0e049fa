"""A disk that fills up part-way through an export (or an import, or a save of a trained model).

The full disk is simulated where the bytes go: the safetensors writer's file handle raises
``OSError(ENOSPC)`` once a byte budget is spent, part-way through a file; or ``fsync`` raises it, as a
filesystem with delayed allocation (or NFS) reports a full disk only there. Each must give a clear
``Gemma3VLError`` naming the output and the reason, leave nothing under the output's name that looks complete
(an earlier output, when overwriting, stays exactly as it was), no temporary directory, and the input untouched.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path

import pytest
import torch

from gemma3vl import bridge
from gemma3vl.bridge import fsutil, safetensors_io
from gemma3vl.errors import Gemma3VLError
from gemma3vl.tiny import tiny_hf_config

NO_SPACE = os.strerror(errno.ENOSPC)


def digest(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny HF checkpoint in 3 shards and its native import."""
    root = tmp_path_factory.mktemp("disk-full")
    hf = root / "hf"
    bridge.write_random_hf_checkpoint(tiny_hf_config(), hf, dtype=torch.float32, max_shard_bytes=450_000)
    native = bridge.import_checkpoint(hf, root / "native", progress=False)
    return hf, native


class _FillingFile:
    """A binary file whose writes fail with ENOSPC once ``budget[0]`` bytes have been written in all."""

    def __init__(self, handle, budget: list[int]):
        self.handle, self.budget = handle, budget

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.budget[0]:
            self.handle.write(memoryview(data).cast("B")[: self.budget[0]])  # the disk takes what fits
            self.budget[0] = 0
            raise OSError(errno.ENOSPC, NO_SPACE)
        self.budget[0] -= size
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def fill_disk_after(monkeypatch, nbytes: int) -> None:
    """Writes of safetensors files fail once ``nbytes`` have been written (over all files)."""
    budget = [nbytes]
    monkeypatch.setattr(safetensors_io, "open", lambda path, mode="r", **kw: _FillingFile(open(path, mode, **kw),
                                                                                          budget), raising=False)


def fail_fsync_of(monkeypatch, name: str) -> None:
    real = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == name:
            raise OSError(errno.ENOSPC, NO_SPACE)
        return real(fd)

    monkeypatch.setattr(fsutil.os, "fsync", fsync)


def assert_refused_cleanly(action, out: Path, kept: dict | None, *inputs: Path) -> str:
    before = [digest(p) for p in inputs]
    with pytest.raises(Gemma3VLError) as caught:
        action()
    message = str(caught.value)
    assert message.startswith(f"{out}: cannot write the output ({NO_SPACE})"), message
    if kept is None:
        assert not out.exists() and "nothing was left behind" in message
    else:
        assert digest(out) == kept and "its previous contents are untouched" in message
    assert not list(out.parent.glob(f".{out.name}.*")), "no temporary directory may be left behind"
    assert [digest(p) for p in inputs] == before
    return message


@pytest.mark.parametrize("where", ["mid-file", "fsync of config.json"])
def test_export_onto_a_full_disk(checkpoints, tmp_path, monkeypatch, where):
    hf, native = checkpoints
    if where == "mid-file":
        first = min(p.stat().st_size for p in hf.glob("*.safetensors"))
        fill_disk_after(monkeypatch, first + 1000)  # inside the second file, after its header
    else:
        fail_fsync_of(monkeypatch, "config.json")
    out = tmp_path / "exported"
    assert_refused_cleanly(lambda: bridge.export_checkpoint(native, out, progress=False), out, None, native)


def test_export_over_an_earlier_export_onto_a_full_disk_keeps_it(checkpoints, tmp_path, monkeypatch):
    hf, native = checkpoints
    out = bridge.export_checkpoint(native, tmp_path / "exported", layout="transformers5", progress=False)
    earlier = digest(out)
    fill_disk_after(monkeypatch, 200_000)
    assert_refused_cleanly(lambda: bridge.export_checkpoint(native, out, overwrite=True, progress=False), out,
                           earlier, native)
    monkeypatch.undo()  # space again: the same export now succeeds
    bridge.export_checkpoint(native, out, overwrite=True, progress=False)
    assert digest(out) == digest(hf) | {"config.json": digest(hf)["config.json"]}


def test_import_and_save_of_a_trained_model_onto_a_full_disk(checkpoints, tmp_path, monkeypatch):
    hf, _ = checkpoints
    fill_disk_after(monkeypatch, 300_000)
    out = tmp_path / "native"
    message = assert_refused_cleanly(lambda: bridge.import_checkpoint(hf, out, progress=False), out, None, hf)
    assert re.search(r"cannot write the output \(No space left on device\)", message)
    from gemma3vl.infer.loading import load_model

    model, _ = load_model(hf, device="cpu", dtype="float32")
    monkeypatch.undo()
    fill_disk_after(monkeypatch, 300_000)
    out = tmp_path / "trained"
    assert_refused_cleanly(lambda: bridge.export_model(model, hf, out), out, None, hf)
    assert not list(tmp_path.glob(".trained*")), "export_model's hidden native directory is gone too"
