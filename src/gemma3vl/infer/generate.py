"""Batched generation with a KV cache: left padding, per-sequence stopping, greedy or sampled tokens.

Correct first (reference §5.3 and §8): the prompt is prefilled with images bidirectional inside their
blocks; each later step feeds one text token per sequence with plain causal / sliding-window attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from gemma3vl.infer.cache import KVCache
from gemma3vl.model import Gemma3Model, TokenInfo


@dataclass
class Sampling:
    max_new_tokens: int = 64
    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def validate(self) -> None:
        from gemma3vl.errors import Gemma3VLError

        if self.max_new_tokens < 1:
            raise Gemma3VLError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not self.greedy and self.temperature <= 0:
            raise Gemma3VLError(f"temperature={self.temperature} must be > 0 (use greedy decoding for 0)")
        if self.top_k is not None and self.top_k < 1:
            raise Gemma3VLError(f"top_k={self.top_k} must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise Gemma3VLError(f"top_p={self.top_p} must be in (0, 1]")


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from [B, V] logits: argmax, or temperature -> top-k -> top-p -> sample."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    scores = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - sampling.top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Gemma3Model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    sampling: Sampling | None = None,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Generate for a left-padded batch; returns the new token ids per row, stop token included.

    ``on_step(tokens [B], finished [B])`` is called after every step (streaming); rows that have already
    finished report ``pad_token_id``.
    """
    sampling = sampling or Sampling()
    sampling.validate()
    device = model.text.embed.weight.device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)

    batch = input_ids.shape[0]
    cache = KVCache(model.config.text)
    info = TokenInfo.for_tokens(input_ids, attention_mask=attention_mask, image_token_id=model.image_token_id)
    logits = model(input_ids, pixel_values, info=info, cache=cache, logits_to_keep=1)[:, -1]
    next_position = info.positions[:, -1] + 1
    stop_ids = torch.tensor(sorted(set(sampling.stop_token_ids)), dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    for step in range(sampling.max_new_tokens):
        tokens = next_tokens(logits, sampling, generator)
        tokens = torch.where(finished, torch.full_like(tokens, sampling.pad_token_id), tokens)
        for row, token in enumerate(tokens.tolist()):
            if not finished[row]:
                outputs[row].append(token)
        finished = finished | torch.isin(tokens, stop_ids)
        if on_step is not None:
            on_step(tokens, finished)
        if bool(finished.all()) or step == sampling.max_new_tokens - 1:
            break
        step_info = TokenInfo(
            positions=next_position[:, None],
            segment_ids=torch.ones_like(tokens)[:, None],
            image_block_ids=torch.full_like(tokens, -1)[:, None],
        )
        logits = model(tokens[:, None], info=step_info, cache=cache)[:, -1]
        next_position = next_position + 1
    return outputs
