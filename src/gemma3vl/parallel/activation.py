"""Activation checkpointing and ``torch.compile``, both per decoder block (compile: vision blocks and the loss too).

* ``full``: a block keeps only its input for backward and recomputes everything else; activation memory
  per block falls from ~a dozen ``[tokens, hidden]``-sized tensors (plus the MLP's ``[tokens, I]`` ones) to
  one, for about one extra forward of compute.
* ``selective`` (per op): keep the outputs of the expensive ops (matmuls, attention — SDPA's kernels and
  FlexAttention — and the collectives of tensor/sequence parallelism, which would otherwise be re-run) and
  recompute the cheap elementwise ones (norms, rotary, GeGLU) and the low-rank matmuls of LoRA/DoRA adapters
  (``LOW_RANK``). Most of ``full``'s memory saving for a few
  percent of compute. With FlexAttention, use it with ``compile`` (the policy then applies inside the compiled
  block's graph, where FlexAttention is one operator).

Blocks are wrapped with ``checkpoint_wrapper``; the wrapper's name never reaches a state dict (its hooks
strip ``_checkpoint_wrapped_module``), so checkpoints and exports keep the plain names.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from gemma3vl.model import Gemma3Model

MODES = ("none", "full", "selective")


def _ops_to_save() -> set:
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default,
           aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_flash_attention.default,
           aten._scaled_dot_product_cudnn_attention.default}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        op = getattr(aten, name, None)
        if op is not None:
            ops.add(op.default)
    # FlexAttention is a higher-order operator: the policy sees it as one call, whatever its kernel.
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    if flex is not None:
        ops.add(flex)
    functional = getattr(torch.ops, "_c10d_functional", None)
    if functional is not None:
        for name in ("reduce_scatter_tensor", "all_gather_into_tensor", "all_reduce"):
            ops.add(getattr(functional, name).default)
    return ops


LOW_RANK = 64  # a matmul with an inner or outer size this small is a LoRA/DoRA factor: cheap to recompute


def _low_rank(func, args) -> bool:
    """Whether ``func(*args)`` is a matmul with an inner or output width of at most ``LOW_RANK``: a LoRA factor
    (``x A^T``: [T, r] out; ``(x A^T) B^T``: r inner). Recomputing one costs ``2 T r d`` FLOPs, a sliver of
    the block; saving the second keeps a full ``[T, d_out]`` tensor per adapted projection (on the 27B at 4,096
    tokens, tens of GB over the model)."""
    try:
        if func is torch.ops.aten.linear.default:
            inner, outer = args[0].shape[-1], args[1].shape[0]
        elif func is torch.ops.aten.addmm.default:
            inner, outer = args[1].shape[-1], args[2].shape[-1]
        elif func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
            inner, outer = args[0].shape[-1], args[1].shape[-1]
        else:
            return False
    except (AttributeError, IndexError, TypeError):
        return False
    return min(int(inner), int(outer)) <= LOW_RANK


def _selective_policy(ops, ctx, func, *args, **kwargs) -> CheckpointPolicy:
    if func in ops and not _low_rank(func, args):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: Gemma3Model, mode: str) -> None:
    """Wrap every decoder block (``mode``: full or selective) in place."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return
    kwargs = {}
    if mode == "selective":
        ops = _ops_to_save()
        kwargs["context_fn"] = lambda: create_selective_checkpoint_contexts(partial(_selective_policy, ops))
    layers = model.text.layers
    for index, block in enumerate(layers):
        # The RNG state is replayed only for a block with active dropout (LoRA/DoRA adapters' peft.dropout): the
        # recomputed forward must drop what the first one dropped, or the gradients are wrong. Gemma's own blocks
        # have none, and saving the state costs a sync per block.
        dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in block.modules())
        layers[index] = checkpoint_wrapper(block, preserve_rng_state=dropout, **kwargs)


def apply_compile(model: Gemma3Model, backend: str = "inductor", mode: str = "default") -> None:
    """``torch.compile`` each decoder block and each vision-tower block in place (after checkpointing, before
    FSDP, as torchtitan does): the blocks of a kind are identical, so one compiled graph serves them all, and the
    FSDP hooks between blocks stay outside the graphs. The training loss's per-chunk softmax arithmetic is
    compiled too (``gemma3vl.model.loss``): fused, it never writes the float32 ``[tokens, vocab]`` intermediates.

    ``mode`` (``parallel.compile_mode``) is torch.compile's for the blocks: ``max-autotune-no-cudagraphs`` times
    inductor's candidate kernels (matmul tiles, and FlexAttention's forward and backward tiles, traced into the
    blocks) at the first step's shapes and keeps the fastest; no CUDA graphs (FSDP's hooks run between blocks)."""
    options = {} if mode == "default" else {"mode": mode}
    for block in model.text.layers:
        block.compile(backend=backend, fullgraph=True, **options)
    for block in model.vision.layers if model.vision is not None else ():
        block.compile(backend=backend, fullgraph=True, **options)
    model.text.loss_compile_backend = backend
