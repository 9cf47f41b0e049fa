"""Sharded loading: each rank reads only the slices of the checkpoint it owns.

The model is built on the ``meta`` device (no memory), parallelized there (TP turns parameters into
DTensors on the TP mesh, FSDP2 shards them further), then given empty local storage on the rank's device
(``to_empty``). Each parameter's local shard is the box ``[offset, offset + local_shape)`` of the global
tensor that DTensor computes from the placements (``Shard``, FSDP-over-TP's strided shard, ``Replicate``);
:meth:`read_native_region` reads exactly that box from the safetensors files — through the bridge's
mapping, so an HF checkpoint's q/k/v rows land in the fused ``[K, (G+2)*hd, D]`` layout without ever
building the whole fused tensor. No rank ever holds more of the model than its own shards (plus a
replicated parameter where the layout replicates it).

Parameters that are not in the checkpoint (LoRA adapters) come from ``extra``: whole tensors made on the
CPU exactly as a single process makes them (so a sharded run starts from the same adapters), of which each
rank keeps its box. DoRA's magnitudes start from the base weights' row norms: :func:`dora_magnitudes` computes
them from the checkpoint, one base weight at a time on the host, as a single process computes them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from gemma3vl.bridge.checkpoint import open_checkpoint
from gemma3vl.bridge.loading import check_fits
from gemma3vl.errors import Gemma3VLError


def local_region(param: torch.Tensor) -> tuple[slice, ...]:
    """The box of the global tensor this rank holds: all of it for a plain tensor."""
    if not isinstance(param, DTensor):
        return tuple(slice(0, size) for size in param.shape)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(start, start + size) for start, size in zip(offset, shape))


def load_sharded(model_dir: str | Path, model: nn.Module, *, extra: dict[str, torch.Tensor] | None = None,
                 part_of: nn.Module | None = None) -> int:
    """Fill every parameter's local shard of an already parallelized ``model`` (storage allocated, e.g. by
    ``to_empty``) from ``model_dir``, or from ``extra`` for parameters the checkpoint does not have.
    ``part_of``: the whole model ``model`` is a part of, under the same names (a pipeline stage of it): the
    checkpoint must fit that, and ``model`` reads only its own tensors. Returns the bytes of tensor data this
    rank read from the checkpoint."""
    extra = extra or {}
    # The state dict's names, not named_parameters': checkpoint wrappers add a prefix only the latter shows.
    targets = model.state_dict(keep_vars=True)
    whole = targets if part_of is None else part_of.state_dict(keep_vars=True)
    with open_checkpoint(model_dir) as checkpoint:
        by_name = {m.native: m for m in checkpoint.mappings}
        check_fits(model_dir, {k: v for k, v in whole.items() if k not in extra}, by_name, checkpoint)
        with torch.no_grad():
            for name, param in targets.items():
                region = local_region(param)
                local = param.to_local() if isinstance(param, DTensor) else param
                if tuple(local.shape) != tuple(r.stop - r.start for r in region):
                    raise Gemma3VLError(
                        f"{name}: this rank's shard has shape {list(local.shape)}, but its placements "
                        f"{getattr(param, 'placements', None)} give {[r.stop - r.start for r in region]}"
                    )
                if name in extra:
                    source = extra[name][region]
                else:
                    source = checkpoint.read_native_region(by_name[name], region)
                local.copy_(source.to(device=local.device, dtype=local.dtype))
                del source
        return checkpoint.files.bytes_read


def dora_magnitudes(model_dir: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The starting magnitude of every DoRA adapter of ``model`` (built on ``meta``, adapters applied, not yet
    parallelized): ``||W + s·BA||`` row-wise of its projection's base rows (``LoraAdapter.weight_norm``, B zero),
    with W read whole from ``model_dir`` one module at a time, on the host. By state-dict name, for ``extra``."""
    from gemma3vl.train.lora import lora_modules

    magnitudes: dict[str, torch.Tensor] = {}
    with open_checkpoint(model_dir) as checkpoint:
        by_name = {m.native: m for m in checkpoint.mappings}
        with torch.no_grad():
            for name, module in lora_modules(model):
                chosen = {key: adapter for key, adapter in module.adapters.items() if adapter.magnitude is not None}
                if not chosen:
                    continue
                mapping = by_name[f"{name}.weight"]
                whole = checkpoint.read_native_region(mapping, tuple(slice(0, n) for n in mapping.native_shape))
                parts = module.op.to_hf(whole.to(module.weight.dtype))
                for projection, weight in zip(module.projections, parts):
                    if projection in chosen:
                        magnitudes[f"{name}.adapters.{projection}.magnitude"] = chosen[projection].weight_norm(weight)
                del whole, parts
    return magnitudes
