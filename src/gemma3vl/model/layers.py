"""Building blocks shared by the decoder and the vision tower: Gemma RMSNorm, RoPE, fused linears."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gemma3vl.config import RopeConfig


class GemmaRMSNorm(nn.Module):
    """``y = x / rms(x) * (1 + w)`` computed in float32, one downcast at the end (reference §2.2).

    The weight is stored as an offset from 1 (HF initialises it to zero), exactly as in the checkpoints.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        y = y * (1.0 + self.weight.float())
        return y.type_as(x)


class FusedLinear(nn.Module):
    """A linear map whose weight keeps an explicit leading group dimension: ``[groups, out, in]``.

    Tensor parallelism shards the group dimension, so a rank always holds whole groups (whole KV groups
    for QKV, whole halves for gate/up). The forward is one matmul over the flattened weight.
    """

    def __init__(self, groups: int, out_per_group: int, in_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, out_per_group, in_features))
        self.bias = nn.Parameter(torch.zeros(groups, out_per_group)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups, out_per_group, in_features = self.weight.shape
        bias = None if self.bias is None else self.bias.reshape(-1)
        y = F.linear(x, self.weight.reshape(groups * out_per_group, in_features), bias)
        return y.unflatten(-1, (groups, out_per_group))


class Rotary(nn.Module):
    """One RoPE table (rotate-half convention). Angles in float32, cos/sin cast to the activation dtype.

    ``inv_freq`` is kept as a float32 CPU tensor outside the state dict, so ``model.to(bfloat16)`` cannot
    round it (transformers computes it once in float32 the same way).
    """

    def __init__(self, head_dim: int, rope: RopeConfig):
        super().__init__()
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        inv_freq = 1.0 / (rope.theta**exponent)
        if rope.rope_type == "linear":
            inv_freq = inv_freq / rope.factor
        self._inv_freq = inv_freq
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [B, T] -> cos, sin [B, 1, T, head_dim] in ``dtype``."""
        device = positions.device
        inv_freq = self._inv_freq_by_device.get(device)
        if inv_freq is None:
            inv_freq = self._inv_freq_by_device[device] = self._inv_freq.to(device)
        angles = positions[..., None].float() * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_TANH_GELU_SLOPE = math.sqrt(2.0 / math.pi)


def _gelu_tanh_formula(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation written out (transformers' gelu_new / gelu_python_tanh / gelu_accurate compute it
    this way, not with the fused kernel, so their last bits differ from ``gelu_tanh``)."""
    return 0.5 * x * (1.0 + torch.tanh(_TANH_GELU_SLOPE * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_erf_formula(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_clipped(x: torch.Tensor) -> torch.Tensor:
    return torch.clip(F.gelu(x), -10.0, 10.0)


# By the names of transformers' ACT2FN (the config's hidden_activation / hidden_act), each computing what that
# entry computes; config.SUPPORTED_ACTIVATIONS lists the same names.
ACTIVATIONS = {
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "gelu": F.gelu,
    "gelu_python": _gelu_erf_formula,
    "gelu_new": _gelu_tanh_formula,
    "gelu_python_tanh": _gelu_tanh_formula,
    "gelu_accurate": _gelu_tanh_formula,
    "gelu_fast": _gelu_fast,
    "quick_gelu": _quick_gelu,
    "gelu_10": _gelu_clipped,
}


def activation(name: str):
    """The MLP activation a config names (validated by the config; see ``ACTIVATIONS``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})") from None
