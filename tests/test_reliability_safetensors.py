"""Safetensors headers that lie: each is refused before any tensor data is read or any large allocation made.

Model files are data from elsewhere. A header can claim ranges past the end of the file, ranges that overlap,
shapes whose size does not match their byte range or that are astronomically large, a header length of
petabytes, negative offsets, a name twice, an unknown dtype, booleans for numbers. Each must give a
``Gemma3VLError`` naming the file (and the tensor, where one is at fault), while the memory Python allocates
stays small (tracemalloc) and no tensor is ever read (the reader is replaced by one that fails the test).
A header whose entries are merely listed out of data order is not a lie: it is read, value for value.
"""

from __future__ import annotations

import json
import re
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch

from gemma3vl import bridge
from gemma3vl.bridge.safetensors_io import SafetensorsFile
from gemma3vl.errors import Gemma3VLError
from gemma3vl.tiny import tiny_hf_config

KEY = "language_model.model.layers.0.mlp.down_proj.weight"  # [64, 128] F32 in the tiny config
OTHER = "language_model.model.layers.0.mlp.up_proj.weight"
PEAK_LIMIT = 4 * 2**20  # the tiny checkpoint's tensors are ~1 MB: reading any of them would show


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pristine")
    bridge.write_random_hf_checkpoint(tiny_hf_config(), directory, dtype=torch.float32)
    return directory


@pytest.fixture
def single(pristine, tmp_path) -> Path:
    directory = tmp_path / "single"
    directory.mkdir()
    for path in pristine.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    return directory


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def join(header: dict | str, data: bytes, length: int | None = None) -> bytes:
    encoded = (header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


def edit(entry_of_key):
    """A lie that changes one field of KEY's entry (the rest of the file stays exactly as it was)."""
    def lie(header: dict, data: bytes) -> bytes:
        entry_of_key(header[KEY], header)
        return join(header, data)
    return lie


def overlapping(header: dict, data: bytes) -> bytes:
    begin, end = header[OTHER]["data_offsets"]
    header[KEY]["data_offsets"] = [begin, end]  # same byte count, same place as another tensor
    return join(header, data)


def duplicate_name(header: dict, data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":"))
    entry = json.dumps(header[KEY], separators=(",", ":"))
    last = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    twin = dict(header[KEY], data_offsets=[last, last + 64 * 128 * 4])
    # the same name twice: JSON parsers keep the last, which would hide the first entry's bytes
    text = text[:-1] + f',"{KEY}":' + json.dumps(twin, separators=(",", ":")) + "}"
    assert entry in text
    return join(text, data + bytes(64 * 128 * 4))


LIES = {
    # name: (make the lying file, what the error must say besides the file)
    "offsets past the end": (edit(lambda e, h: e.update(data_offsets=[e["data_offsets"][0], 10**12])),
                             rf"tensor '{re.escape(KEY)}' .* needs 32768 bytes, its data_offsets .* give"),
    "offsets overlapping": (overlapping, "overlapping or missing data"),
    "shape larger than its bytes": (edit(lambda e, h: e.update(shape=[64, 129])),
                                    rf"'{re.escape(KEY)}' \(F32 \[64, 129\]\) needs 33024 bytes"),
    "astronomical shape, offsets to match": (
        edit(lambda e, h: e.update(shape=[2**40, 2**40], data_offsets=[e["data_offsets"][0],
                                                                       e["data_offsets"][0] + 2**82])),
        rf"tensor '{re.escape(KEY)}' \(F32 \[1099511627776, 1099511627776\]\) ends at data offset \d+, past the end"),
    "shape over 64 bits": (edit(lambda e, h: e.update(shape=[0, 2**70])),
                           rf"'{re.escape(KEY)}' has shape \[0, 1180591620717411303424\]"),
    "negative offset": (edit(lambda e, h: e.update(data_offsets=[-8, e["data_offsets"][1] - 8])),
                        rf"'{re.escape(KEY)}'"),
    "negative dimension": (edit(lambda e, h: e.update(shape=[-64, -128])), rf"'{re.escape(KEY)}' has shape"),
    "booleans for numbers": (edit(lambda e, h: e.update(shape=[True, 64 * 128])), rf"'{re.escape(KEY)}' has shape"),
    "unknown dtype": (edit(lambda e, h: e.update(dtype="F128")), r"unsupported or corrupt dtype 'F128'"),
    "name given twice": (duplicate_name, rf"tensor '{re.escape(KEY)}' appears twice"),
    "header length of petabytes": (lambda h, d: join(h, d, length=2**50), "header length 1125899906842624 is"),
    "header length over 100 MB": (lambda h, d: join(h, d, length=150 * 2**20), "header length 157286400 is"),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_lying_headers_are_refused_before_any_allocation(single, tmp_path, monkeypatch, lie):
    make, words = LIES[lie]
    path = single / "model.safetensors"
    header, data = split(path)
    path.write_bytes(make(header, data))
    if lie == "header length over 100 MB":
        with open(path, "r+b") as handle:  # a sparse file large enough that the length alone is the lie
            handle.truncate(200 * 2**20)

    def no_reading(*args, **kwargs):
        raise AssertionError("tensor data was read from a file whose header lies")

    monkeypatch.setattr(SafetensorsFile, "read_into", no_reading)
    out = tmp_path / "out"
    tracemalloc.start()
    try:
        with pytest.raises(Gemma3VLError) as caught:
            bridge.import_checkpoint(single, out, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert re.search(words, message), (words, message)
    assert peak < PEAK_LIMIT, f"{peak} bytes allocated while refusing"
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_entries_out_of_data_order_are_not_a_lie(single, tmp_path):
    """safetensors sorts by offsets when it reads; so do we: a header listed backwards loads the same values."""
    path = single / "model.safetensors"
    header, data = split(path)
    metadata = header.pop("__metadata__")
    backwards = {"__metadata__": metadata, **dict(reversed(list(header.items())))}
    path.write_bytes(join(backwards, data))
    from safetensors.torch import load_file

    expected = load_file(str(path))
    with _opened(path) as stored:
        assert list(stored.tensors)[0] == list(backwards)[1]
        for name, tensor in expected.items():
            assert torch.equal(stored.read(name), tensor), name
    bridge.import_checkpoint(single, tmp_path / "out", progress=False)


class _opened:
    def __init__(self, path: Path):
        self.file = SafetensorsFile(path)

    def __enter__(self) -> SafetensorsFile:
        return self.file

    def __exit__(self, *exc) -> None:
        self.file.close()
