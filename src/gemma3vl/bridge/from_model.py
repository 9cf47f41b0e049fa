"""An in-memory model (e.g. after training) back to disk, shaped like the checkpoint it started from.

The weights are written in the base checkpoint's dtypes (training keeps fp32 master weights; a bf16 hub
checkpoint comes back bf16), with the base's manifest and side files (tokenizer, processor, chat template,
generation config), so ``export_checkpoint`` then writes the base's own layout and file split.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from gemma3vl.bridge.checkpoint import MANIFEST, NativeCheckpoint, open_checkpoint, write_index
from gemma3vl.bridge.convert import SIDE_DIR, _manifest, export_checkpoint
from gemma3vl.bridge.fsutil import (OutputNotWritten, copy_file_durable, native_copy_dir, remove_native_leftovers,
                                    side_files, staged_output, write_text_durable)
from gemma3vl.bridge.safetensors_io import DTYPES, PlannedTensor, plan_shards, shard_file_name, write_in_canonical_order
from gemma3vl.errors import Gemma3VLError


def save_native(
    model: nn.Module,
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s weights (native names) as a native directory derived from ``base_dir``."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    with open_checkpoint(base_dir) as base:
        dtypes = {m.native: base.native_dtype(m) for m in base.mappings}
        if isinstance(base, NativeCheckpoint):
            manifest = base.manifest
            side_root = base_dir / SIDE_DIR
            carried = side_files(side_root) if side_root.is_dir() else []
        else:
            side_root = base_dir
            carried = side_files(base_dir)
            manifest = _manifest(base, carried)
    state = {name: tensor for name, tensor in model.state_dict().items()}
    missing = sorted(set(dtypes) - set(state))
    extra = sorted(set(state) - set(dtypes))
    if missing or extra:
        raise Gemma3VLError(
            f"the model does not match {base_dir}: missing {missing[:3]}, unexpected {extra[:3]} "
            "(merge LoRA adapters before saving)"
        )
    planned = [PlannedTensor(name, dtypes[name], tuple(state[name].shape)) for name in dtypes]
    shards = plan_shards(planned, max_shard_bytes)
    names = [shard_file_name(i, len(shards)) for i in range(len(shards))]

    def read(name: str) -> torch.Tensor:
        return state[name].detach().to(device="cpu", dtype=DTYPES[dtypes[name]]).contiguous()

    with staged_output(out_dir, overwrite) as staging:
        for name, shard in zip(names, shards):
            write_in_canonical_order(staging / name, shard, read)
        write_index(staging, dict(zip(names, shards)), {"total_size": sum(t.nbytes for t in planned)})
        for relative in carried:
            copy_file_durable(side_root / relative, staging / SIDE_DIR / relative)
        write_text_durable(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return out_dir


def export_model(
    model: nn.Module,
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    layout: str = "source",
    overwrite: bool = False,
) -> Path:
    """A complete HF checkpoint of ``model`` in ``out_dir``: the base's layout, files and side files."""
    out_dir = Path(out_dir)
    remove_native_leftovers(out_dir)  # a killed export's copy: a whole model on the disk
    native = native_copy_dir(out_dir)  # removed below (a killed process's, by the next writer to out_dir)
    shutil.rmtree(native, ignore_errors=True)
    try:
        try:
            save_native(model, base_dir, native)
        except OutputNotWritten as exc:  # the hidden directory is ours: name the output the caller asked for
            raise OutputNotWritten(out_dir, exc.reason, out_dir.is_dir() and any(out_dir.iterdir())) from None
        return export_checkpoint(native, out_dir, layout=layout, overwrite=overwrite, progress=False)
    finally:
        shutil.rmtree(native, ignore_errors=True)
