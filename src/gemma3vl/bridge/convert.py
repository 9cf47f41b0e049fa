"""HF checkpoint directory <-> native checkpoint directory, streamed tensor by tensor.

Native directory::

    model-00001-of-0000N.safetensors ...   native tensor names (mapping.py), each tensor's dtype kept
    model.safetensors.index.json           transformers' index format, native names
    gemma3vl.json                          the manifest (below)
    hf/                                    every non-weight file of the HF directory, verbatim

The manifest records what export needs to give back the source exactly: its config.json text and index text
(byte for byte: line endings, another tool's JSON style), its layout, and per source file the metadata and the
keys in data order (so each key's file and dtype too).
"""

from __future__ import annotations

import json
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch

from gemma3vl.bridge.checkpoint import (
    FORMAT, FORMAT_VERSION, MANIFEST, NATIVE_LM_HEAD, SINGLE_FILE, HFCheckpoint, NativeCheckpoint, write_index,
)
from gemma3vl.bridge.fsutil import check_output_dir, copy_file_durable, side_files, staged_output, write_text_durable
from gemma3vl.bridge.layouts import WRITABLE, get_layout, source_export_layout
from gemma3vl.bridge.mapping import Mapping, build_mappings
from gemma3vl.bridge.safetensors_io import (
    DTYPES, PT_METADATA, PlannedTensor, canonical_order, plan_shards, shard_file_name, write_in_canonical_order,
    write_safetensors,
)
from gemma3vl.errors import Gemma3VLError

HF_DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' "5GB"
SPLIT_CACHE_BYTES = 2**30  # fused tensors whose HF parts wait for a later file (see _SplitCache)
SIDE_DIR = "hf"
# Which config.json form each layout's transformers writes (hub configs come from transformers 4.x).
CONFIG_FORM = {"hub": "legacy", "transformers5": "v5", "memory": "v5", "memory4": "legacy"}


def import_checkpoint(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Convert the HF Gemma 3 checkpoint in ``hf_dir`` into a native directory ``out_dir``.

    Everything is checked before a byte is written (config, every header, every key and shape); the output
    appears under its name only when complete. Peak memory is about the largest single tensor."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_output_dir(out_dir, overwrite, hf_dir)
    report = _Reporter("import", progress)
    with HFCheckpoint(hf_dir) as source:
        planned = source.planned_native()
        by_name = {m.native: m for m in source.mappings}
        shards = plan_shards(planned, max_shard_bytes)
        names = [shard_file_name(i, len(shards)) for i in range(len(shards))]
        carried = side_files(hf_dir)
        with staged_output(out_dir, overwrite) as staging:
            for name, shard in zip(names, shards):
                report.file_started()
                write_in_canonical_order(staging / name, shard, lambda n: source.read_native(by_name[n]))
                report.file_done(name, shard)
            write_index(staging, dict(zip(names, shards)), {"total_size": sum(t.nbytes for t in planned)})
            for relative in carried:
                copy_file_durable(hf_dir / relative, staging / SIDE_DIR / relative)
            manifest = _manifest(source, carried)
            write_text_durable(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    report.finished(out_dir)
    return out_dir


def export_checkpoint(
    native_dir: str | Path,
    out_dir: str | Path,
    *,
    layout: str = "source",
    max_shard_bytes: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the native checkpoint in ``native_dir`` as an HF checkpoint directory ``out_dir``.

    ``layout="source"`` with no ``max_shard_bytes`` gives back the imported checkpoint exactly: same files,
    same keys in each, same data order and metadata, same config.json text (tensors bit for bit). Any other
    layout (hub, transformers5, memory, text) or a ``max_shard_bytes`` shards like transformers does
    (5 GB by default; one ``model.safetensors`` when it fits)."""
    native_dir, out_dir = Path(native_dir), Path(out_dir)
    check_output_dir(out_dir, overwrite, native_dir)
    report = _Reporter("export", progress)
    with NativeCheckpoint(native_dir) as native:
        source = native.manifest["source"]
        keep_source = layout == "source"
        target_name = source["layout"] if keep_source else layout
        if target_name not in WRITABLE:
            raise Gemma3VLError(f"unknown layout {layout!r} (choose source, {', '.join(WRITABLE)})")
        if keep_source:
            target_name = source_export_layout(target_name)  # in-memory names are read, not written, unless asked for
        target = get_layout(target_name)
        mappings = build_mappings(native.config, target, lm_head=NATIVE_LM_HEAD in native.files.keys() or None)
        # Each HF key: the mapping it comes from and which of its parts it is.
        parts = {key: (m, i) for m in mappings for i, key in enumerate(m.hf)}
        planned = {key: PlannedTensor(key, native.native_dtype(m), m.hf_shapes[i]) for key, (m, i) in parts.items()}
        if keep_source and max_shard_bytes is None:
            files, index = _source_split(native, planned)
        else:
            files, index = _fresh_split(list(planned.values()), max_shard_bytes or HF_DEFAULT_SHARD_BYTES)
        split = _SplitCache(native)
        with staged_output(out_dir, overwrite) as staging:
            for name, (tensors, metadata) in files.items():
                report.file_started()
                write_safetensors(staging / name, tensors, lambda key: split.part(*parts[key]), metadata)
                report.file_done(name, tensors)
            if index is not None:
                source_text = source.get("index_json") if keep_source and max_shard_bytes is None else None
                write_index(staging, {n: t for n, (t, _) in files.items()}, index, source_text)
            write_text_durable(staging / "config.json", _config_text(native, keep_source, target_name))
            side = native_dir / SIDE_DIR
            if side.is_dir():
                for relative in side_files(side):
                    copy_file_durable(side / relative, staging / relative)
    report.finished(out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------------ planning
def _fresh_split(planned: list[PlannedTensor], max_shard_bytes: int):
    """transformers' sharding; returns {file: (tensors in data order, metadata)} and the index metadata
    (None when everything fits one ``model.safetensors``, which then has no index, as in transformers)."""
    shards = plan_shards(planned, max_shard_bytes)
    files = {}
    for i, shard in enumerate(shards):
        name = SINGLE_FILE if len(shards) == 1 else shard_file_name(i, len(shards))
        by_name = {t.name: t for t in shard}
        files[name] = ([by_name[n] for n in canonical_order((t.name, t.dtype) for t in shard)], dict(PT_METADATA))
    if len(shards) == 1:
        return files, None
    total = sum(t.nbytes for t in planned)
    params = sum(t.nbytes // DTYPES[t.dtype].itemsize for t in planned)
    return files, {"total_parameters": params, "total_size": total}


def _source_split(native: NativeCheckpoint, planned: dict[str, PlannedTensor]):
    """The source's files, each with its keys in their original data order and its original metadata, and
    the source index's metadata (None if the source was one file without an index)."""
    source = native.manifest["source"]
    source_layout = get_layout(source["layout"])
    source_keys = {}  # source key -> target key, through (native name, part index)
    for old, new in zip(build_mappings(native.config, source_layout, lm_head=True),
                        build_mappings(native.config, get_layout(source_export_layout(source["layout"])),
                                       lm_head=True)):
        source_keys.update(zip(old.hf, new.hf))
    files, seen = {}, set()
    for entry in source["files"]:
        keys = [source_keys.get(k, k) for k in entry["tensors"]]
        unknown = [k for k in keys if k not in planned]
        if unknown:
            raise Gemma3VLError(
                f"{native.directory}: the source file {entry['name']} held {unknown[0]!r}, which this checkpoint "
                "no longer has; export with --max-shard-size (the Python API's max_shard_size) to shard afresh"
            )
        files[entry["name"]] = ([planned[k] for k in keys], entry.get("metadata"))
        seen.update(keys)
    if seen != set(planned):
        extra = sorted(set(planned) - seen)
        raise Gemma3VLError(
            f"{native.directory}: {extra[0]!r} was not in the source checkpoint, so its file split cannot be "
            "reproduced; export with --max-shard-size (the Python API's max_shard_size) to shard afresh"
        )
    if not source["sharded"]:
        return files, None
    metadata = source.get("index_metadata") or {}
    source_dtypes = source.get("dtypes") or {}
    changed = any(source_dtypes.get(old, planned[new].dtype) != planned[new].dtype
                  for old, new in source_keys.items() if new in planned)
    if "total_size" in metadata and changed:  # dtypes changed since import: keep the index truthful
        # (only then: a source index whose total_size another tool counted otherwise comes back as it was)
        metadata = {**metadata, "total_size": sum(t.nbytes for t in planned.values())}
    return files, metadata


class _SplitCache:
    """HF parts of native tensors, split once and handed out one by one, as slots (views of the native
    tensor that the writer streams without copying). A fused tensor's parts can sit in different output
    files (or far apart in one); a byte budget bounds what waits, and anything evicted is simply read and
    split again when asked for."""

    def __init__(self, native: NativeCheckpoint):
        self.native, self.budget = native, SPLIT_CACHE_BYTES
        self.waiting: OrderedDict[str, tuple[dict[int, torch.Tensor], int]] = OrderedDict()

    def part(self, m: Mapping, index: int) -> torch.Tensor:
        if len(m.hf) == 1:
            return m.op.slots(self.native.read_native(m))[0]
        if m.native not in self.waiting:
            tensor = self.native.read_native(m)
            self.waiting[m.native] = (dict(enumerate(m.op.slots(tensor))), tensor.nbytes)
            while sum(size for _, size in self.waiting.values()) > self.budget and len(self.waiting) > 1:
                self.waiting.popitem(last=False)
        pieces, _ = self.waiting[m.native]
        piece = pieces.pop(index)
        if not pieces:
            del self.waiting[m.native]
        return piece


# ------------------------------------------------------------------------------------------------ files
def _manifest(source: HFCheckpoint, carried: list[str]) -> dict[str, Any]:
    files = source.files
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config_json": source.config_text,
        "source": {
            "layout": source.layout.name,
            "sharded": files.weight_map is not None,
            "index_metadata": files.index_metadata,
            "index_json": files.index_text,
            "files": [
                {"name": name, "metadata": handle.metadata, "tensors": handle.keys_in_data_order()}
                for name, handle in files.files.items()
            ],
            "dtypes": {key: files.info(key).dtype for key in sorted(files.keys())},
        },
        "side_files": carried,
    }


def _config_text(native: NativeCheckpoint, keep_source: bool, layout: str) -> str:
    if keep_source:
        return native.manifest["config_json"]
    form = CONFIG_FORM.get(layout, native.config.source_form)
    return json.dumps(native.config.to_hf_dict(form), indent=2, sort_keys=True) + "\n"


class _Reporter:
    """One stderr line per file written (sizes and rates): conversions of real models take minutes."""

    def __init__(self, what: str, enabled: bool):
        self.what, self.enabled = what, enabled
        self.started = self.file_start = time.perf_counter()
        self.total = 0

    def file_started(self) -> None:
        self.file_start = time.perf_counter()

    def file_done(self, name: str, tensors: Sequence[PlannedTensor]) -> None:
        size = sum(t.nbytes for t in tensors)
        self.total += size
        if self.enabled:
            seconds = time.perf_counter() - self.file_start
            print(f"[{self.what}] {name}: {len(tensors)} tensors, {_size(size)} in {seconds:.1f}s",
                  file=sys.stderr, flush=True)

    def finished(self, out_dir: Path) -> None:
        if self.enabled:
            seconds = time.perf_counter() - self.started
            print(f"[{self.what}] {out_dir}: {_size(self.total)} in {seconds:.1f}s "
                  f"({_size(self.total / max(seconds, 1e-9))}/s)", file=sys.stderr, flush=True)


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"
