"""Gemma 3 multimodal projector (reference §4): average-pool the patch grid, Gemma RMSNorm, project."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemma3vl.config import Gemma3Config
from gemma3vl.model.layers import GemmaRMSNorm


class Projector(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        assert config.vision is not None
        self.patches_per_side = config.vision.patches_per_side
        self.pool_kernel = config.pool_kernel
        self.norm = GemmaRMSNorm(config.vision.hidden_size, config.vision.layer_norm_eps)
        # Stored as [Dv, D] and applied as x @ W, like the checkpoint (it is not an nn.Linear).
        self.proj = nn.Parameter(torch.zeros(config.vision.hidden_size, config.text.hidden_size))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """[N, P*P, Dv] -> [N, (P/k)^2, D] soft tokens, row-major over the pooled grid."""
        count, _, width = patches.shape
        grid = patches.transpose(1, 2).reshape(count, width, self.patches_per_side, self.patches_per_side)
        pooled = F.avg_pool2d(grid, self.pool_kernel, self.pool_kernel).flatten(2).transpose(1, 2)
        return torch.matmul(self.norm(pooled), self.proj).type_as(patches)
