"""SigLIP vision tower as Gemma 3 uses it (reference §3): patch conv, learned positions, pre-LN encoder,
post-LayerNorm; a pooling head only kept (never run) when the checkpoint has one. QKV is fused as ``[3, Dv, Dv]`` (+ bias ``[3, Dv]``)."""

from __future__ import annotations

import torch
from torch import nn

from gemma3vl.config import VisionConfig
from gemma3vl.model.attention import attend
from gemma3vl.model.layers import FusedLinear, activation


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv = FusedLinear(3, config.hidden_size, config.hidden_size, bias=True)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in self.qkv(x).unbind(-2))
        out = attend(q, k, v, None, self.head_dim**-0.5)  # full bidirectional, no mask
        return self.out(out.transpose(1, 2).reshape(batch, length, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Weights(nn.Module):
    """A holder of frozen parameters (no forward): of the head below, in SigLIP's module names."""

    def __init__(self, **shapes: tuple[int, ...]):
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape), requires_grad=False))


class VisionHead(nn.Module):
    """SigLIP's attention-pooling head, present when the checkpoint's ``vision_use_head`` is true (transformers'
    default; the hub's Gemma 3 have none). Gemma 3 never runs it: its image features are the tower's last hidden
    states, in transformers as here. Its weights are only kept, frozen, so that such a checkpoint converts, trains
    and exports whole. Holders, not ``nn.Linear`` modules: no adapter or parallel plan takes them for a projection."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.probe = nn.Parameter(torch.empty(1, 1, d), requires_grad=False)
        self.attention = _Weights(in_proj_weight=(3 * d, d), in_proj_bias=(3 * d,))
        self.attention.out_proj = _Weights(weight=(d, d), bias=(d,))
        self.layernorm = _Weights(weight=(d,), bias=(d,))
        self.mlp = nn.Module()
        self.mlp.fc1 = _Weights(weight=(i, d), bias=(i,))
        self.mlp.fc2 = _Weights(weight=(d, i), bias=(d,))


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.pos_embed = nn.Embedding(config.num_patches, config.hidden_size)
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))
        self.post_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.use_head:
            self.head = VisionHead(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` [N, C, S, S] -> patch features [N, P*P, Dv] (row-major patches)."""
        weight = self.patch_embed.weight
        x = self.patch_embed(pixel_values.to(device=weight.device, dtype=weight.dtype))
        x = x.flatten(2).transpose(1, 2) + self.pos_embed.weight
        for block in self.layers:
            x = block(x)
        return self.post_norm(x)
