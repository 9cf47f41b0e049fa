"""The mask description of ``attention.py`` as a FlexAttention ``BlockMask``: block-sparse attention for training
and prefill on the GPU.

SDPA with a dense mask reads every (query, key) pair and holds a ``[B, 1, Tq, Tk]`` mask: 17 G entries at
131,072 tokens. FlexAttention instead takes the rule itself as a ``mask_mod`` and a ``BlockMask`` saying, per
tile of ``block_size`` x ``block_size``, whether the tile is empty (skipped), full (no mask evaluated) or partial.
Sliding layers then touch ``window / T`` of the tiles and global layers half of them; nothing ``Tq x Tk`` is ever
materialised (``create_block_mask`` is compiled on CUDA so it never builds the dense mask either).

The ``mask_mod`` reads the per-token tensors of both sides and decides everything from them, never from the
index order: the keys may be a KV cache's ring buffer (prefill after a cache), or, under context parallelism, the
whole sequence's keys in a permuted order while the queries are one rank's slice. So ``Tq != Tk`` and
``queries is not keys`` are the general case here, not exceptions.

Query rows with no allowed key (padding) give 0 from FlexAttention, where ``dense_mask`` opens them to keep the
softmax finite; either way their outputs are never used (no key is padding, no target sits on padding).
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from gemma3vl.errors import Gemma3VLError
from gemma3vl.model.attention import TokenInfo

BACKENDS = ("auto", "sdpa", "flex")
DEFAULT_BLOCK_SIZE = 128  # FlexAttention's tile; its GPU kernels are tuned for it


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention)``, built once per process and shared by every layer and step.

    FlexAttention is only fast compiled (the eager form is a dense reference implementation). Built on first use,
    not at import: creating any ``torch.compile`` wrapper imports dynamo, seconds that a CPU-only command should not
    pay. Inside a per-block ``torch.compile`` the call is traced into the block's own graph instead.
    """
    return torch.compile(flex_attention)


@functools.cache
def compiled_create_block_mask():
    """``torch.compile(create_block_mask)``: evaluates the rule tile by tile without building the dense mask."""
    return torch.compile(create_block_mask)


def use_flex(backend: str, device: torch.device, query_length: int) -> bool:
    """Whether a forward of ``query_length`` tokens on ``device`` runs FlexAttention under ``backend``.

    ``auto``: flex on CUDA (training and prefill), SDPA on the CPU, where FlexAttention has no backward.
    A one-token decode step always takes SDPA: its mask is a single row, so there are no tiles to skip, and
    building a BlockMask per step would only add work to the step CUDA graphs replay.
    """
    if backend not in BACKENDS:
        raise Gemma3VLError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if query_length <= 1 or backend == "sdpa":
        return False
    return backend == "flex" or device.type == "cuda"


def token_mask_mod(queries: TokenInfo, keys: TokenInfo, window: int | None):
    """The rule of ``attention.py`` (same segment, key not padding, causal on positions or same image block,
    window on positions) as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``; heads all share it."""
    q_pos, q_seg, q_blk = queries.positions, queries.segment_ids, queries.image_block_ids
    k_pos, k_seg, k_blk = keys.positions, keys.segment_ids, keys.image_block_ids

    def mask_mod(b, h, q_idx, kv_idx):
        query_position, key_position = q_pos[b, q_idx], k_pos[b, kv_idx]
        query_block = q_blk[b, q_idx]
        key_segment = k_seg[b, kv_idx]
        same_segment = (q_seg[b, q_idx] == key_segment) & (key_segment != 0)
        same_image = (query_block == k_blk[b, kv_idx]) & (query_block >= 0)
        allowed = same_segment & ((key_position <= query_position) | same_image)
        if window is not None:
            allowed = allowed & (key_position > query_position - window)
        return allowed

    return mask_mod


def block_mask(
    queries: TokenInfo, keys: TokenInfo, window: int | None, block_size: int = DEFAULT_BLOCK_SIZE
) -> BlockMask:
    """One ``BlockMask`` for a layer type: queries ``[B, Tq]`` against keys ``[B, Tk]`` (any lengths, any order)."""
    batch, query_length = queries.positions.shape
    key_batch, key_length = keys.positions.shape
    if key_batch != batch:
        raise Gemma3VLError(f"queries describe {batch} rows but keys describe {key_batch}")
    device = queries.positions.device
    compiled = device.type == "cuda" and not torch.compiler.is_compiling()
    build = compiled_create_block_mask() if compiled else create_block_mask
    return build(
        token_mask_mod(queries, keys, window), batch, None, query_length, key_length, device=device,
        BLOCK_SIZE=block_size,
    )


def attend_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, scale: float) -> torch.Tensor:
    """FlexAttention over [B, H, Tq, hd] queries and [B, K, Tk, hd] keys/values (GQA: H a multiple of K).

    SDPA is on autocast's list and casts its inputs itself; FlexAttention is not. Under autocast over fp32 weights
    v comes out of the (autocast) projection in bf16 while q/k come out of the fp32 rotary in fp32: q/k are cast to
    v's dtype, which is what SDPA's autocast does.
    """
    device_type = q.device.type
    # Contiguous: q/k/v are strided views into the fused QKV projection, and inductor's FlexAttention lowering
    # (torch 2.13, CPU) mis-reads such views when the projection is compiled into the same graph (wrong outputs,
    # or a lowering error): one copy of each, small beside the attention itself.
    q, k, v = q.to(v.dtype).contiguous(), k.to(v.dtype).contiguous(), v.contiguous()
    if device_type == "cpu":
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise Gemma3VLError(
                "attention backend 'flex' cannot train on the CPU (FlexAttention has no CPU backward in torch "
                f"{torch.__version__}): use model.attention=auto or sdpa there"
            )
        attention = flex_attention
    elif torch.compiler.is_compiling():
        attention = flex_attention  # already inside a compiled graph (per-block compile): traced into it
    else:
        attention = compiled_flex_attention()
    return attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
