"""Cross-entropy through the output matrix without ever holding ``[tokens, vocab]`` logits.

At 32k tokens and a 262,208-token vocabulary the logits alone are 17 GB in bf16, and autograd would keep
an fp32 copy and its gradient as well. Here the loss and both gradients (hidden states and output matrix)
are computed chunk by chunk in the forward pass, and only ``[tokens, hidden]`` and ``[vocab, hidden]``
gradients are kept for the backward pass. Only positions that have a target are projected at all (prompts,
images and padding never reach the vocabulary matrix).

Per chunk, the softmax arithmetic (log-sum-exp, the loss, ``softmax - one_hot`` and the softcap's derivative)
runs in float32 by :func:`chunk_loss_and_grad`. Eagerly that is half a dozen passes over a float32
``[chunk, vocab]`` tensor (4.3 GB at 4,096 tokens); compiled (``compile_backend``, which
``parallel.apply_compile`` sets for training with ``parallel.compile``) it is two reads of the logits and one
write of their gradient, in the matmul's dtype. The output matrix's gradient of a single chunk stays in the
matmul's dtype (bf16 under autocast, as autograd's would be); several chunks are summed in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE = -100


def chunk_loss_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, softcap: float | None, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For one chunk of logits [n, V] (before softcapping) and targets [n] (all valid): the summed loss (float32,
    or float64 for float64 logits) and, when ``with_grad``, d(summed loss)/d(logits) in the logits' dtype."""
    accumulate = torch.promote_types(logits.dtype, torch.float32)
    values = logits.to(accumulate)
    capped = None
    if softcap is not None:
        capped = torch.tanh(values / softcap)
        values = capped * softcap
    log_z = torch.logsumexp(values, dim=-1)
    target_values = values.gather(1, targets[:, None]).squeeze(1)
    total = (log_z - target_values).sum()
    if not with_grad:
        return total, None
    grad = torch.exp(values - log_z[:, None])  # softmax
    rows = torch.arange(targets.shape[0], device=targets.device)
    if capped is None:
        grad = grad.to(logits.dtype)
        grad[rows, targets] -= 1.0
    else:  # d(capped)/d(logits) = 1 - tanh^2, applied after the one-hot term
        slope = 1.0 - capped * capped
        grad = (grad * slope).to(logits.dtype)
        grad[rows, targets] -= slope.gather(1, targets[:, None]).squeeze(1).to(logits.dtype)
    return total, grad


@functools.cache
def compiled_chunk_loss_and_grad(backend: str) -> Callable:
    """:func:`chunk_loss_and_grad` under ``torch.compile`` (one per backend and process; chunk lengths vary, so
    the second length compiles a dynamic-shape version)."""
    return torch.compile(chunk_loss_and_grad, backend=backend)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, softcap: float | None, compile_backend: str | None,
                grad_enabled: bool):
        """Sum of token losses over ``hidden`` [N, D] with ``targets`` [N] (all valid). ``grad_enabled``: the
        caller's grad mode (``needs_input_grad`` says True under ``torch.no_grad`` too, where computing the
        gradients would only cost time and a ``[vocab, hidden]`` buffer: the held-out loss)."""
        need_hidden_grad = grad_enabled and ctx.needs_input_grad[0]
        need_weight_grad = grad_enabled and ctx.needs_input_grad[1]
        with_grad = need_hidden_grad or need_weight_grad
        accumulate = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        softmax_part = compiled_chunk_loss_and_grad(compile_backend) if compile_backend else chunk_loss_and_grad
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            chunk_total, grad_logits = softmax_part(F.linear(h, weight), targets[start:start + chunk_size], softcap,
                                                    with_grad)
            total += chunk_total
            if need_hidden_grad:
                grad_hidden[start:start + chunk_size] = grad_logits @ weight
            if need_weight_grad:
                chunk_weight_grad = grad_logits.t() @ h
                if grad_weight is None:
                    grad_weight = chunk_weight_grad  # one chunk: no float32 copy of [V, D]
                else:
                    grad_weight = grad_weight.to(accumulate)  # (a no-op after the second chunk)
                    grad_weight += chunk_weight_grad
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        return (*scale_saved_gradients(ctx, grad_output), None, None, None, None, None)


def scale_saved_gradients(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backward of a loss whose gradients were computed in the forward pass: scale them by ``grad_output``.

    The output matrix's gradient is scaled in the wider of its own dtype and the weight's (a bf16 gradient of
    fp32 master weights is widened first, so the scaling rounds once, to float32), in one pass when they agree."""
    grad_hidden, grad_weight = ctx.saved_tensors
    if grad_hidden is not None:
        grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
    if grad_weight is not None:
        wider = torch.promote_types(grad_weight.dtype, ctx.weight_dtype)
        grad_weight = (grad_weight.to(wider) * grad_output).to(ctx.weight_dtype)
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
    compile_backend: str | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (``IGNORE`` skipped).

    ``hidden`` [..., D] and ``targets`` [...] of the same leading shape. Returns (sum of losses, count) so
    that callers can divide by the token count of the whole global batch (gradient accumulation and
    data parallelism then give the exact token-weighted mean). ``compile_backend`` (e.g. ``"inductor"``):
    compile each chunk's softmax arithmetic (:func:`compiled_chunk_loss_and_grad`); ``None``: eager.
    """
    flat_hidden, flat_targets, count = select_targets(hidden, targets)
    if count == 0:
        return hidden.sum() * 0.0, 0
    return _ChunkedLinearCrossEntropy.apply(flat_hidden, weight, flat_targets, chunk_size, softcap,
                                            compile_backend, torch.is_grad_enabled()), count
