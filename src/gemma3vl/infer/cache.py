"""KV cache with the sliding-window semantics of transformers' DynamicCache (reference §8).

Global layers keep every position. Sliding layers keep only the last ``window - 1`` positions after each
step (the window minus the query itself), so 5 of every 6 layers hold at most ``window - 1`` keys however
long the conversation grows. Keys are stored after q/k-norm and RoPE at absolute positions, so nothing is
re-rotated when the window slides. The mask description of the cached keys (positions, segments, image
blocks) is kept beside them, one per layer type, so decode steps get exactly the prefill's rule.
"""

from __future__ import annotations

import torch

from gemma3vl.config import SLIDING, TextConfig
from gemma3vl.model.attention import TokenInfo


class KVCache:
    def __init__(self, config: TextConfig):
        self.window = config.sliding_window
        self.layer_types = config.layer_types
        self.keys: list[torch.Tensor | None] = [None] * config.num_hidden_layers
        self.values: list[torch.Tensor | None] = [None] * config.num_hidden_layers
        self.info: dict[str, TokenInfo | None] = {kind: None for kind in set(config.layer_types)}

    def keys_info(self, layer_type: str, new: TokenInfo) -> TokenInfo:
        """Mask description of every key the next step's queries see: cached ones, then ``new``."""
        cached = self.info[layer_type]
        full = new if cached is None else cached.cat(new)
        self.info[layer_type] = full
        return full

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def end_step(self) -> None:
        """Drop what no sliding-window query can see any more: keep the last ``window - 1`` keys."""
        keep = self.window - 1
        for layer, kind in enumerate(self.layer_types):
            if kind == SLIDING and self.keys[layer] is not None and self.keys[layer].shape[2] > keep:
                start = self.keys[layer].shape[2] - keep
                self.keys[layer] = self.keys[layer][:, :, start:]
                self.values[layer] = self.values[layer][:, :, start:]
        info = self.info.get(SLIDING)
        if info is not None and info.positions.shape[1] > keep:
            self.info[SLIDING] = info.last(keep)

    def cached_length(self, layer: int) -> int:
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]
