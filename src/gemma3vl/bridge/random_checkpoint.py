"""Random HF checkpoints of any size, written tensor by tensor (tests use tiny ones, benchmarks the real 4B).

transformers initialises every Gemma RMSNorm weight and the projector matrix to zero, which makes whole
ops vanish and hides mapping bugs; here every tensor is noise drawn for its role (the ``init`` of its rule).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gemma3vl.bridge.checkpoint import SINGLE_FILE, write_index
from gemma3vl.bridge.fsutil import staged_output, write_text_durable
from gemma3vl.bridge.layouts import get_layout
from gemma3vl.bridge.mapping import build_mappings
from gemma3vl.bridge.safetensors_io import (
    PlannedTensor, dtype_name, plan_shards, shard_file_name, write_in_canonical_order,
)
from gemma3vl.config import Gemma3Config

NORM_STD = 0.3  # Gemma RMSNorm weights are offsets: the scale is (1 + w)
LAYER_NORM_STD = 0.1  # SigLIP LayerNorm weights: 1 + N(0, 0.1)


def write_random_hf_checkpoint(
    config_dict: dict[str, Any],
    out_dir: str | Path,
    *,
    layout: str = "hub",
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int | None = None,
    seed: int = 0,
    std: float = 0.02,
    overwrite: bool = False,
) -> Path:
    """Write config.json (``config_dict`` as given) and random weights in ``layout`` to ``out_dir``: one
    ``model.safetensors``, or shards of at most ``max_shard_bytes`` with an index. Deterministic in ``seed``.
    Memory stays at about the largest single tensor, whatever the model size."""
    out_dir = Path(out_dir)
    config = Gemma3Config.from_hf_dict(config_dict, where="config_dict")
    mappings = build_mappings(config, get_layout(layout))
    init = {key: m.init for m in mappings for key in m.hf}
    planned = [PlannedTensor(key, dtype_name(dtype), shape) for m in mappings for key, shape in zip(m.hf, m.hf_shapes)]
    shards = plan_shards(planned, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [shard_file_name(i, len(shards)) for i in range(len(shards))]
    generator = torch.Generator().manual_seed(seed)

    shapes = {t.name: t.shape for t in planned}

    def produce(key: str) -> torch.Tensor:
        return _random(shapes[key], init[key], dtype, std, generator)

    with staged_output(out_dir, overwrite) as staging:
        for name, shard in zip(names, shards):
            write_in_canonical_order(staging / name, shard, produce)
        if len(shards) > 1:
            write_index(staging, dict(zip(names, shards)), {"total_size": sum(t.nbytes for t in planned)})
        write_text_durable(staging / "config.json", json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    return out_dir


def _random(shape: tuple[int, ...], init: str, dtype: torch.dtype, std: float, generator: torch.Generator):
    tensor = torch.empty(shape, dtype=dtype)
    if init == "rms_norm":
        return tensor.normal_(0.0, NORM_STD, generator=generator)
    if init == "layer_norm":
        return tensor.normal_(1.0, LAYER_NORM_STD, generator=generator)
    return tensor.normal_(0.0, std, generator=generator)
