"""One mask description, turned into the attention mask each layer type needs (reference §5.2).

A batch is described per token by three integers:

* ``positions``       — RoPE position; causality and the sliding window are decided on it;
* ``segment_ids``     — which conversation a token belongs to (packing); 0 marks padding;
* ``image_block_ids`` — which image block (run of ``<image_soft_token>``) a token is in; -1 for text.

The rule, for query q and key k, is::

    allowed = same_segment(q, k) and segment(k) != 0
              and (pos(k) <= pos(q) or same_image_block(q, k))
              and (not sliding or pos(k) > pos(q) - window)

Within one segment positions advance by one per token, so deciding causality and the window on positions is
exactly transformers' index-based rule, while also holding for packed rows and left padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TokenInfo:
    """Per-token mask description for a batch, each tensor [B, T] (long)."""

    positions: torch.Tensor
    segment_ids: torch.Tensor
    image_block_ids: torch.Tensor

    @classmethod
    def for_tokens(
        cls,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        image_token_id: int | None = None,
        start_positions: torch.Tensor | None = None,
    ) -> "TokenInfo":
        """Description of a left- or right-padded batch of single conversations.

        Positions count real tokens only (``cumsum(mask) - 1``, as ``generate`` does), offset by
        ``start_positions`` [B] when continuing after a cache.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.long()
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        if start_positions is not None:
            positions = positions + start_positions[:, None]
        return cls(
            positions=positions,
            segment_ids=attention_mask,
            image_block_ids=image_block_ids(input_ids, image_token_id),
        )

    def cat(self, other: "TokenInfo") -> "TokenInfo":
        return TokenInfo(
            positions=torch.cat((self.positions, other.positions), dim=1),
            segment_ids=torch.cat((self.segment_ids, other.segment_ids), dim=1),
            image_block_ids=torch.cat((self.image_block_ids, other.image_block_ids), dim=1),
        )

    def columns(self, start: int, stop: int) -> "TokenInfo":
        """The description of columns ``start:stop`` (a chunk of the prompt)."""
        return TokenInfo(
            positions=self.positions[:, start:stop],
            segment_ids=self.segment_ids[:, start:stop],
            image_block_ids=self.image_block_ids[:, start:stop],
        )

    def last(self, count: int) -> "TokenInfo":
        start = max(self.positions.shape[1] - count, 0)
        return TokenInfo(
            positions=self.positions[:, start:],
            segment_ids=self.segment_ids[:, start:],
            image_block_ids=self.image_block_ids[:, start:],
        )


def image_block_ids(input_ids: torch.Tensor, image_token_id: int | None) -> torch.Tensor:
    """Number each contiguous run of image soft tokens 0, 1, 2, ... per row; text is -1."""
    if image_token_id is None:
        return torch.full_like(input_ids, -1)
    is_image = input_ids == image_token_id
    previous = F.pad(is_image[:, :-1], (1, 0), value=False)
    starts = is_image & ~previous
    return torch.where(is_image, starts.long().cumsum(-1) - 1, torch.full_like(input_ids, -1))


def dense_mask(queries: TokenInfo, keys: TokenInfo, window: int | None) -> torch.Tensor:
    """Boolean mask [B, 1, Tq, Tk] (True = may attend) for SDPA.

    Rows with nothing allowed (padding queries) are opened completely so the softmax stays finite; their
    outputs are never used.
    """
    q_pos = queries.positions[:, :, None]
    k_pos = keys.positions[:, None, :]
    q_seg = queries.segment_ids[:, :, None]
    k_seg = keys.segment_ids[:, None, :]
    q_blk = queries.image_block_ids[:, :, None]
    k_blk = keys.image_block_ids[:, None, :]
    same_image = (q_blk == k_blk) & (q_blk >= 0)
    allowed = (q_seg == k_seg) & (k_seg != 0) & ((k_pos <= q_pos) | same_image)
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """SDPA over [B, H, Tq, hd] queries and [B, K, Tk, hd] keys/values (GQA: H a multiple of K); one query row
    (a decode step) takes ``attend_one_query``."""
    if q.shape[2] == 1:
        return attend_one_query(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def attend_one_query(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention of a single query row ([B, H, 1, hd]) over [B, K, Tk, hd] keys/values, in float32 (float64 stays).

    A decode step's attention is a pair of matrix-vector products per head over a cache that is mostly short: a
    fused attention kernel (cuDNN's flash kernel under ``torch.compile``) spent about 18 us a layer on it at 4B
    shapes on an H200, a fixed cost that was a sixth of the whole step. Compiled, the products are written as
    reductions (``(q * k).sum``), which inductor fuses into a few kernels that read each cached key and value once
    and accumulate in float32. Eager, where every operator costs a launch, one SDPA call in float32 with each
    KV head's G query heads as G query rows (no GQA expansion). Both keep scores, probabilities and the weighted
    sum in float32 and round to the input dtype once at the end.
    """
    batch, heads, _, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    wide = torch.promote_types(q.dtype, torch.float32)
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim).to(wide)  # [B, K, G, hd]: head h reads kv h // G
    allowed = None if mask is None else mask.reshape(mask.shape[0], 1, 1, length)
    if torch.compiler.is_compiling():
        scores = (grouped[:, :, :, None, :] * k[:, :, None].to(wide)).sum(-1) * scale  # [B, K, G, Tk]
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        out = (scores.softmax(-1)[..., None] * v[:, :, None].to(wide)).sum(-2)  # [B, K, G, hd]
    else:
        out = F.scaled_dot_product_attention(grouped, k.to(wide), v.to(wide), attn_mask=allowed, scale=scale)
    return out.to(q.dtype).reshape(batch, heads, 1, dim)
