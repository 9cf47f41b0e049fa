"""Cross-entropy through a vocab-parallel output matrix, chunked, without ``[tokens, vocab]`` logits anywhere.

Under tensor parallelism the tied embedding is sharded over the vocabulary: rank r holds rows
``[r*V/tp, (r+1)*V/tp)`` of the output matrix. Each rank projects the (replicated) hidden states onto its
rows only; the softmax normaliser needs every rank's logits, so per chunk of tokens two small all-reduces
over the TP group combine them: the max (for a stable exponent), then the sum of exponentials together with
the target logit (which only its owner has). As in ``gemma3vl.model.loss`` both gradients are computed in
the forward pass, in float32, chunk by chunk: the hidden-state gradient is a sum over ranks (one
all-reduce at the end), the weight gradient stays local to the rows the rank owns.

Gathering the whole matrix instead would cost ``V x D`` per rank in the compute dtype plus its float32
gradient (262,208 x 5,376 for the 27B: 2.8 GB + 5.6 GB), which this avoids.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

from gemma3vl.model.loss import scale_saved_gradients, select_targets


def chunk_gradients(
    grad_logits: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    capped: torch.Tensor | None,
    need_hidden_grad: bool,
    need_weight_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """From d(loss)/d(logits) of one chunk (before softcapping; ``capped`` is ``tanh(logits / cap)`` when the
    logits were capped), the chunk's gradients for its hidden states and for the output matrix."""
    if capped is not None:
        grad_logits *= 1.0 - capped * capped
    grad_logits = grad_logits.to(weight.dtype)
    return (grad_logits @ weight if need_hidden_grad else None,
            grad_logits.t() @ hidden if need_weight_grad else None)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, softcap: float | None, group, vocab_start: int,
                grad_enabled: bool):
        """Sum of token losses; ``hidden`` [N, D] the same on every rank, ``weight`` [V/tp, D] this rank's rows,
        ``targets`` [N] global token ids (all valid). ``grad_enabled``: the caller's grad mode (``needs_input_grad``
        reads True under ``torch.no_grad`` too: the held-out loss would compute gradients for nothing)."""
        need_hidden_grad = grad_enabled and ctx.needs_input_grad[0]
        need_weight_grad = grad_enabled and ctx.needs_input_grad[1]
        accumulate = torch.promote_types(hidden.dtype, torch.float32)
        local_vocab = weight.shape[0]
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden, dtype=accumulate) if need_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if need_weight_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            local_targets = targets[start:start + chunk_size] - vocab_start
            owned = (local_targets >= 0) & (local_targets < local_vocab)
            local_targets = torch.where(owned, local_targets, torch.zeros_like(local_targets))
            logits = F.linear(h, weight).to(accumulate)  # [n, V/tp]
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            peak = logits.max(dim=-1).values
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
            target_logit = torch.where(owned, logits.gather(1, local_targets[:, None]).squeeze(1), 0.0)
            exp_sum = (logits - peak[:, None]).exp().sum(dim=-1)
            sums = torch.stack((exp_sum, target_logit))
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            log_z = peak + sums[0].log()
            total += (log_z - sums[1]).sum()
            if not (need_hidden_grad or need_weight_grad):
                continue
            grad_logits = (logits - log_z[:, None]).exp()  # this rank's slice of the softmax
            rows = torch.arange(h.shape[0], device=h.device)
            grad_logits[rows[owned], local_targets[owned]] -= 1.0
            chunk_hidden_grad, chunk_weight_grad = chunk_gradients(
                grad_logits, h, weight, capped if softcap is not None else None, need_hidden_grad, need_weight_grad
            )
            if need_hidden_grad:
                grad_hidden[start:start + chunk_size] = chunk_hidden_grad
            if need_weight_grad:
                grad_weight += chunk_weight_grad.to(accumulate)
        if need_hidden_grad:
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)  # every rank's vocabulary share
            grad_hidden = grad_hidden.to(hidden.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        return (*scale_saved_gradients(ctx, grad_output), None, None, None, None, None, None)


def vocab_parallel_cross_entropy(
    hidden: torch.Tensor,
    weight: DTensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 4096,
    softcap: float | None = None,
) -> tuple[torch.Tensor, int]:
    """``gemma3vl.model.loss.linear_cross_entropy`` for an output matrix sharded ``Shard(0)`` over a 1-D TP
    mesh: (summed cross-entropy, number of target tokens), the same on every TP rank."""
    if not isinstance(weight, DTensor) or weight.placements != (Shard(0),) or weight.device_mesh.ndim != 1:
        raise TypeError("vocab_parallel_cross_entropy needs the output matrix as a DTensor, Shard(0) on a TP mesh")
    mesh = weight.device_mesh
    local = weight.to_local()  # its gradient comes back as this rank's rows of the DTensor's gradient
    vocab_start = mesh.get_local_rank() * local.shape[0]  # even shards: ParallelDims.validate checks V % tp
    flat_hidden, flat_targets, count = select_targets(hidden, targets)
    if count == 0:
        return hidden.sum() * 0.0 + local.sum() * 0.0, 0
    summed = _VocabParallelCrossEntropy.apply(flat_hidden, local, flat_targets, chunk_size, softcap,
                                              mesh.get_group(), vocab_start, torch.is_grad_enabled())
    return summed, count
