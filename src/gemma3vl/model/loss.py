"""Cross-entropy through the output matrix without ever holding ``[tokens, vocab]`` logits.

At 32k tokens and a 262,208-token vocabulary the logits alone are 17 GB in bf16, and autograd would keep
an fp32 copy and its gradient as well. Here the loss and both gradients (hidden states and output matrix)
are computed chunk by chunk in the forward pass, in float32, and only ``[tokens, hidden]`` and
``[vocab, hidden]`` gradients are kept for the backward pass. Only positions that have a target are
projected at all (prompts, images and padding never reach the vocabulary matrix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, softcap: float | None):
        """Sum of token losses over ``hidden`` [N, D] with ``targets`` [N] (all valid)."""
        need_hidden_grad = ctx.needs_input_grad[0]
        need_weight_grad = ctx.needs_input_grad[1]
        accumulate = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if need_weight_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            t = targets[start:start + chunk_size]
            logits = F.linear(h, weight).to(accumulate)
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            log_z = torch.logsumexp(logits, dim=-1)
            total += (log_z - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (need_hidden_grad or need_weight_grad):
                continue
            grad_logits = torch.softmax(logits, dim=-1)
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            chunk_hidden_grad, chunk_weight_grad = chunk_gradients(
                grad_logits, h, weight, capped if softcap is not None else None, need_hidden_grad, need_weight_grad
            )
            if need_hidden_grad:
                grad_hidden[start:start + chunk_size] = chunk_hidden_grad
            if need_weight_grad:
                grad_weight += chunk_weight_grad.to(accumulate)
        ctx.save_for_backward(
            grad_hidden if need_hidden_grad else None,
            grad_weight if need_weight_grad else None,
        )
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        return (*scale_saved_gradients(ctx, grad_output), None, None, None)


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


def scale_saved_gradients(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backward of a loss whose gradients were computed in the forward pass: scale them by ``grad_output``."""
    grad_hidden, grad_weight = ctx.saved_tensors
    if grad_hidden is not None:
        grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
    if grad_weight is not None:
        grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
    return grad_hidden, grad_weight


def select_targets(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Hidden states [N, D] and targets [N] of the positions that have a target (``IGNORE`` dropped)."""
    keep = targets.reshape(-1) != IGNORE
    flat_targets = targets.reshape(-1)[keep]
    return hidden.reshape(-1, hidden.shape[-1])[keep], flat_targets, int(flat_targets.shape[0])


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 4096,
    softcap: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (``IGNORE`` skipped).

    ``hidden`` [..., D] and ``targets`` [...] of the same leading shape. Returns (sum of losses, count) so
    that callers can divide by the token count of the whole global batch (gradient accumulation and
    data parallelism then give the exact token-weighted mean).
    """
    flat_hidden, flat_targets, count = select_targets(hidden, targets)
    if count == 0:
        return hidden.sum() * 0.0, 0
    return _ChunkedLinearCrossEntropy.apply(flat_hidden, weight, flat_targets, chunk_size, softcap), count
