"""``parallelize``: apply tensor parallelism, activation checkpointing, compile and FSDP2 to a plain model.

The order is torchtitan's and it matters:

1. TP first: it replaces parameters by DTensors on the TP mesh, and FSDP must see those to shard them
   further over the data-parallel mesh (2-D: ``(dp_shard, tp)``).
2. Activation checkpointing wraps whole (already TP-sharded) blocks.
3. ``torch.compile`` per block, on the checkpoint-wrapped block, so the recomputation is compiled too.
4. FSDP last, bottom-up: one unit per block, then the root, so the FSDP hooks sit between the compiled
   blocks instead of inside them.

Context parallelism changes no parameter: it gives the model a ``context_parallel_loss`` (``parallel/context.py``)
before FSDP, which registers it as a forward method, and shards over ``dp_shard x cp``.
"""

from __future__ import annotations

import torch

from gemma3vl.model import Gemma3Model
from gemma3vl.parallel.activation import apply_activation_checkpointing, apply_compile
from gemma3vl.parallel.context import apply_context_parallel
from gemma3vl.parallel.distributed import ParallelContext
from gemma3vl.parallel.fsdp import apply_fsdp
from gemma3vl.parallel.tensor import apply_tensor_parallel


def parallelize(
    model: Gemma3Model,
    context: ParallelContext | None,
    *,
    activation_checkpoint: str = "none",
    compile: bool = False,
    param_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
    compile_mode: str = "default",
) -> Gemma3Model:
    """Apply the layout of ``context`` (``None``: one process, only checkpointing/compile) in place.

    ``param_dtype`` is FSDP's compute dtype (``None``: the parameters' own dtype).
    """
    if context is not None and context.dims.tp_enabled:
        apply_tensor_parallel(model, context.tp_mesh, sequence_parallel=context.sequence_parallel)
    apply_activation_checkpointing(model, activation_checkpoint)
    if compile:
        apply_compile(model, mode=compile_mode)
    if context is not None and context.dims.cp > 1:
        apply_context_parallel(model)
    if context is not None and context.dims.fsdp_enabled:
        apply_fsdp(model, context.fsdp_mesh, param_dtype=param_dtype, cpu_offload=cpu_offload)
    return model
