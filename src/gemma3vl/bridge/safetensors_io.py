"""Streaming safetensors reading and writing, one tensor at a time.

Why not ``safe_open`` / ``save_file``: ``save_file`` needs every tensor of a shard in memory at once (a 5 GB
shard is 5 GB of RAM, more with its serialised copy), and ``safe_open`` reads through an mmap whose touched
pages stay resident, so reading a 9 GB checkpoint shows up as 9 GB of RSS. The format is simple (8-byte
little-endian header length, a JSON header, then raw little-endian data), so we read each tensor with
``readinto`` straight into its destination (for a fused tensor, into its slot of the fused buffer) and
write each shard header-first, then tensor by tensor (strided views piece by piece, without a copy). Peak
memory is about the largest single tensor, whatever the shard size.

Files we write are byte-for-byte what ``safetensors.torch.save_file`` writes for the same tensors and
metadata (same header JSON, same data order, same padding; a test checks this), and a file can also be
written in a given data order, which is how export reproduces a source file exactly.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from gemma3vl.errors import Gemma3VLError

# safetensors dtype name -> torch dtype. Item sizes come from torch.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# safetensors (Rust) sorts a file's tensors by dtype, largest enum value first, then by name. This is that
# enum order, largest first, as observed from safetensors 0.8 save_file.
_CANONICAL_DTYPE_RANK = {
    name: rank
    for rank, name in enumerate(
        ["U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"]
    )
}
_HEADER_LIMIT = 100 * 2**20  # safetensors itself refuses headers over 100 MB
PT_METADATA = {"format": "pt"}  # what torch-written files carry (transformers checks for it)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise Gemma3VLError(f"dtype {dtype} cannot be stored in safetensors") from None


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * DTYPES[dtype].itemsize


def canonical_order(entries: Iterable[tuple[str, str]]) -> list[str]:
    """Names of ``(name, dtype)`` pairs in the data order ``safetensors.save_file`` uses."""
    return [name for name, dtype in sorted(entries, key=lambda e: (_CANONICAL_DTYPE_RANK[e[1]], e[0]))]


class SafetensorsFile:
    """A safetensors file whose header has been checked against the file itself before any data is read.

    Every problem (truncated file, header length past the end or over 100 MB, garbage header, a name given twice,
    overlapping, missing or out-of-file data ranges, shapes that do not match their bytes, unknown dtype) raises
    Gemma3VLError naming the file (and the tensor), before any tensor data is read: the only allocation is the
    header itself, at most what the file holds and never over 100 MB. The file handle stays open until close().
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] | None = None
        self._handle = None
        self.bytes_read = 0  # tensor data read so far (sharded loading is tested on it)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                head = handle.read(8)
                if len(head) < 8:
                    self._fail(f"file is {size} bytes, too short for a safetensors header")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > _HEADER_LIMIT:
                    self._fail(f"header length {header_len} is implausible (corrupt file?)")
                if 8 + header_len > size:
                    self._fail(f"header length {header_len} points past the end of the file ({size} bytes; truncated?)")
                raw = handle.read(header_len)
        except OSError as exc:
            raise Gemma3VLError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        self._parse_header(raw, data_start=8 + header_len, size=size)
        self._check_with_safetensors()

    def _check_with_safetensors(self) -> None:
        """Let the safetensors library parse the header too, so we never accept a file it would refuse."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt"):
                pass
        except Exception as exc:  # SafetensorError and friends; the library's message is the detail
            self._fail(f"safetensors cannot open the file ({exc})")

    def _fail(self, why: str) -> None:
        raise Gemma3VLError(f"{self.path}: {why}")

    def _parse_header(self, raw: bytes, data_start: int, size: int) -> None:
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=self._refuse_twice_named)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._fail(f"corrupt safetensors header (not JSON: {exc})")
        if not isinstance(header, dict):
            self._fail("corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        ):
            self._fail("corrupt safetensors header (__metadata__ must map strings to strings)")
        self.metadata = metadata
        for name, entry in header.items():
            self.tensors[name] = self._parse_entry(name, entry, data_start)
        # Data ranges must tile [0, data_len) exactly, as safetensors requires; the file must end there.
        # Only the last range may reach past the end (the file is then truncated); any other is a lie, named.
        ordered = sorted(self.tensors.values(), key=lambda t: (t.begin, t.end))
        for info in ordered[:-1]:
            if info.end > size:
                self._fail(
                    f"corrupt safetensors header: tensor {info.name!r} ({info.dtype} {list(info.shape)}) ends at "
                    f"data offset {info.end - data_start}, past the end of the file's {size - data_start} data bytes"
                )
        expected = 0
        for info in ordered:
            if info.begin - data_start != expected:
                self._fail(
                    f"corrupt safetensors header: tensor {info.name!r} starts at data offset "
                    f"{info.begin - data_start}, expected {expected} (overlapping or missing data)"
                )
            expected = info.end - data_start
        if data_start + expected > size:
            self._fail(
                f"file is truncated: {size} bytes, but the header says its data ends at byte {data_start + expected}"
            )
        if data_start + expected < size:
            self._fail(f"file has {size - data_start - expected} unexpected trailing bytes after its data")

    def _refuse_twice_named(self, pairs: list[tuple[str, object]]) -> dict[str, object]:
        """JSON parsers keep the last of two equal keys, which would hide the first entry's bytes."""
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                self._fail(f"corrupt safetensors header: tensor {key!r} appears twice")
            seen[key] = value
        return seen

    def _parse_entry(self, name: str, entry: object, data_start: int) -> TensorInfo:
        if not isinstance(entry, dict):
            self._fail(f"corrupt safetensors header: entry for {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            self._fail(f"tensor {name!r} has unsupported or corrupt dtype {dtype!r}")
        # type() is int, not isinstance: JSON true/false parse as bool, a subclass of int.
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**63 for d in shape)):
            self._fail(f"corrupt safetensors header: tensor {name!r} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            self._fail(f"corrupt safetensors header: tensor {name!r} has data_offsets {offsets!r}")
        begin, end = offsets
        if end - begin != tensor_nbytes(dtype, shape) or begin < 0:
            self._fail(
                f"corrupt safetensors header: tensor {name!r} ({dtype} {shape}) needs "
                f"{tensor_nbytes(dtype, shape)} bytes, its data_offsets {offsets} give {end - begin}"
            )
        return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)

    def keys_in_data_order(self) -> list[str]:
        return [t.name for t in sorted(self.tensors.values(), key=lambda t: t.begin)]

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read into a fresh CPU buffer (no mmap: see the module docstring)."""
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=DTYPES[info.dtype])
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read tensor ``name`` straight into ``out``: a CPU tensor (or strided view) of the same dtype and
        element count whose row-major element order is the stored one (see mapping.Op.slots)."""
        info = self.tensors[name]
        if out.dtype != DTYPES[info.dtype] or out.numel() * out.element_size() != info.nbytes:
            raise Gemma3VLError(
                f"{self.path}: cannot read tensor {name!r} ({info.dtype} {list(info.shape)}) into a "
                f"{out.dtype} tensor of shape {list(out.shape)}"
            )
        if self._handle is None:
            self._handle = open(self.path, "rb", buffering=0)
        offset = info.begin
        for block in _contiguous_blocks(out):
            view = memoryview(block.reshape(-1).view(torch.uint8).numpy())
            self._read_exactly(name, offset, view)
            offset += len(view)

    def read_region(self, name: str, region: Sequence[slice], view_shape: Sequence[int] | None = None) -> torch.Tensor:
        """Only the elements of tensor ``name`` inside ``region`` (one ``slice(start, stop)`` per dim, of the
        tensor seen with ``view_shape``, a reshape of the stored shape), as a new contiguous tensor.

        Sharded loading reads this way, so a rank reads (and holds) only its own shard: the region is read
        as runs of contiguous bytes, one per index of the dims before the last partial one (a ``Shard(0)``
        slice is one run; a ``Shard(1)`` slice of a matrix is one run per row).
        """
        info = self.tensors[name]
        shape = tuple(view_shape) if view_shape is not None else info.shape
        numel = 1
        for size in shape:
            numel *= size
        stored = 1
        for size in info.shape:
            stored *= size
        if numel != stored or len(region) != len(shape):
            raise Gemma3VLError(f"{self.path}: tensor {name!r} {list(info.shape)} cannot be read as {list(shape)} "
                                f"over {len(region)} dims")
        bounds = [(r.start or 0, size if r.stop is None else r.stop) for r, size in zip(region, shape)]
        if any(not 0 <= lo <= hi <= size for (lo, hi), size in zip(bounds, shape)):
            raise Gemma3VLError(f"{self.path}: region {bounds} is outside tensor {name!r} of shape {list(shape)}")
        dtype = DTYPES[info.dtype]
        out = torch.empty([hi - lo for lo, hi in bounds], dtype=dtype)
        if out.numel() == 0:
            return out
        strides = [1] * len(shape)
        for dim in range(len(shape) - 2, -1, -1):
            strides[dim] = strides[dim + 1] * shape[dim + 1]
        # The last dim whose range is partial: everything after it is whole, so each run is contiguous.
        split = 0
        for dim in range(len(shape) - 1, -1, -1):
            if bounds[dim] != (0, shape[dim]):
                split = dim
                break
        run = (bounds[split][1] - bounds[split][0]) * strides[split]
        item = out.element_size()
        flat = out.view(-1).view(torch.uint8).numpy()
        if self._handle is None:
            self._handle = open(self.path, "rb", buffering=0)
        done = 0
        for index in itertools.product(*(range(lo, hi) for lo, hi in bounds[:split])):
            start = sum(i * strides[d] for d, i in enumerate(index)) + bounds[split][0] * strides[split]
            self._read_exactly(name, info.begin + start * item, memoryview(flat[done:done + run * item]))
            done += run * item
        return out

    def _read_exactly(self, name: str, offset: int, view: memoryview) -> None:
        self._handle.seek(offset)
        done = 0
        while done < len(view):
            got = self._handle.readinto(view[done:])
            if not got:
                self._fail(f"file ended while reading tensor {name!r} (truncated while in use?)")
            done += got
        self.bytes_read += len(view)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _contiguous_blocks(tensor: torch.Tensor):
    """``tensor``'s elements as contiguous pieces, in row-major order (a whole tensor is one piece; a slice
    along dim 1 of a [K, n, D] tensor is K pieces)."""
    if tensor.is_contiguous():
        if tensor.numel():
            yield tensor
        return
    for sub in tensor.unbind(0):
        yield from _contiguous_blocks(sub)


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to be written: what the header says before its data exists."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def write_safetensors(
    path: Path,
    tensors: Sequence[PlannedTensor],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``tensors`` to ``path`` in the given data order, asking ``produce(name)`` for each one only
    when its bytes are due, then fsync. ``produce`` returns the planned dtype and element count, in the
    planned shape or as any view whose row-major order is that of the planned shape (mapping.Op.slots):
    strided views are written piece by piece, never copied."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for planned in tensors:
        header[planned.name] = {
            "dtype": planned.dtype,
            "shape": list(planned.shape),
            "data_offsets": [offset, offset + planned.nbytes],
        }
        offset += planned.nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for planned in tensors:
            tensor = produce(planned.name).detach().cpu()
            if dtype_name(tensor.dtype) != planned.dtype or tensor.numel() * tensor.element_size() != planned.nbytes:
                raise Gemma3VLError(
                    f"{path}: internal error: tensor {planned.name!r} came out {dtype_name(tensor.dtype)} "
                    f"{tuple(tensor.shape)}, planned {planned.dtype} {planned.shape}"
                )
            for block in _contiguous_blocks(tensor):
                handle.write(memoryview(block.reshape(-1).view(torch.uint8).numpy()))
            del tensor
        handle.flush()
        os.fsync(handle.fileno())


def write_in_canonical_order(
    path: Path, tensors: Sequence[PlannedTensor], produce: Callable[[str], torch.Tensor]
) -> None:
    """A file in safetensors' own data order with ``{"format": "pt"}`` metadata: byte for byte what
    ``save_file`` (and so transformers' ``save_pretrained``) writes for the same tensors."""
    by_name = {t.name: t for t in tensors}
    order = canonical_order((t.name, t.dtype) for t in tensors)
    write_safetensors(path, [by_name[n] for n in order], produce, dict(PT_METADATA))


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int | None) -> list[list[PlannedTensor]]:
    """Greedy split in the given order, as transformers does: start a new shard when the next tensor would
    push the current one past ``max_shard_bytes`` (a tensor larger than the limit gets a shard of its own)."""
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise Gemma3VLError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for planned in tensors:
        if max_shard_bytes is not None and shards[-1] and size + planned.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(planned)
        size += planned.nbytes
    return shards


def shard_file_name(index: int, count: int) -> str:
    """transformers' shard naming, 1-based: ``model-00001-of-00003.safetensors``."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"
