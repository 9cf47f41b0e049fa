"""A sharded model back into one plain model on rank 0, for the HF export.

Every rank walks the state dict in the same order and takes part in one all-gather per tensor
(``DTensor.full_tensor``); rank 0 keeps each gathered tensor on the CPU and the others drop it at once. So
no GPU ever holds more than its shard plus one whole tensor, and rank 0's host memory holds the model once,
in the training dtype (fp32 master weights: 4 bytes per parameter, 16 GB for the 4B, 108 GB for the 27B),
which is what a single-process run holds too. The bridge then writes it exactly as it writes a
single-process model, so the files are the same bit for bit.

Pipeline stages hold different tensors: each stage gathers its own as above, and its first rank sends them on
to rank 0 one at a time (``gather_pipeline_state``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def gather_full_state(model: nn.Module, device: torch.device) -> dict[str, torch.Tensor] | None:
    """The whole state dict as plain CPU tensors on rank 0; ``None`` on the other ranks. Collective."""
    main = dist.get_rank() == 0
    gathered: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = _whole(tensor, device)
        if main:
            gathered[name] = tensor.detach().to("cpu", copy=True)
        del tensor
    return gathered if main else None


def _whole(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A DTensor all-gathered into one whole tensor (collective over its mesh); a plain tensor as it is."""
    if isinstance(tensor, DTensor):
        if tensor.device.type != device.type:  # FSDP CPU offload keeps shards on the host
            tensor = tensor.to(device)
        tensor = tensor.full_tensor()
    return tensor


def plain_model(build: Callable[[], nn.Module], state: dict[str, torch.Tensor]) -> nn.Module:
    """``build()`` run on the meta device (no memory), then given ``state``'s tensors as its parameters."""
    with torch.device("meta"):
        model = build()
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def gather_pipeline_state(
    model: nn.Module, context, skip: frozenset[str] = frozenset()
) -> dict[str, torch.Tensor] | None:
    """``gather_full_state`` for pipeline stages: rank 0's stages, then each later pipeline rank's (the
    ranks of one stage gather its DTensors together, and that stage's first rank sends every whole tensor on
    to rank 0, one at a time). ``skip``: names this rank holds that an earlier stage holds too (the last
    stage's copy of the tied embedding). Collective; the full state on rank 0, ``None`` elsewhere."""
    device = context.device
    group = context.pp_mesh.get_group()
    state = {name: tensor for name, tensor in model.state_dict().items() if name not in skip}
    # The first rank of each stage along every other mesh dimension speaks for the stage.
    coordinates = context.mesh.get_coordinate() or []
    speaker = all(c == 0 for c in coordinates[1:])
    listing = [(name, tuple(t.shape), t.dtype) for name, t in state.items()] if speaker else None
    listings: list = [None] * context.dims.pp
    dist.all_gather_object(listings, listing, group=group)
    main = dist.get_rank() == 0
    pp_rank = context.pp_mesh.get_local_rank()
    gathered: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        tensor = _whole(tensor, device)
        if main:
            gathered[name] = tensor.detach().to("cpu", copy=True)
        elif speaker and pp_rank > 0:
            dist.send(tensor.detach().to(device).contiguous(), group_dst=0, group=group)
        del tensor
    if main:
        for source in range(1, context.dims.pp):
            for name, shape, dtype in listings[source]:
                buffer = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(buffer, group_src=source, group=group)
                gathered[name] = buffer.to("cpu", copy=True)
    return gathered if main else None
