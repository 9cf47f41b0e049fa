"""The mask description of ``attention.py`` as a FlexAttention ``BlockMask``: block-sparse attention for training
and prefill on the GPU.

SDPA with a dense mask reads every (query, key) pair and holds a ``[B, 1, Tq, Tk]`` mask: 17 G entries at
131,072 tokens. FlexAttention instead takes the rule itself as a ``mask_mod`` and a ``BlockMask`` saying, per
tile of ``block_size`` x ``block_size``, whether the tile is empty (skipped), full (no mask evaluated) or partial.
Sliding layers then touch ``window / T`` of the tiles and global layers half of them; nothing ``Tq x Tk`` is ever
materialised: the tiles are classified from per-tile ranges of the token tensors (``tile_classes``), a few
``[B, Tq/128, Tk/128]`` comparisons with no compilation (torch's ``create_block_mask``, which evaluates the rule on
every pair, stays as the reference and a way out: ``GEMMA3VL_BLOCK_MASK=torch``).

The ``mask_mod`` reads the per-token tensors of both sides and decides everything from them, never from the
index order: the keys may be a KV cache's ring buffer (prefill after a cache), or, under context parallelism, the
whole sequence's keys in a permuted order while the queries are one rank's slice. So ``Tq != Tk`` and
``queries is not keys`` are the general case here, not exceptions.

Query rows with no allowed key (padding) give 0 from FlexAttention, where ``dense_mask`` opens them to keep the
softmax finite; either way their outputs are never used (no key is padding, no target sits on padding).
"""

from __future__ import annotations

import functools
import json
import os

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
    """One ``BlockMask`` for a layer type: queries ``[B, Tq]`` against keys ``[B, Tk]`` (any lengths, any order).

    The tiles are classified from per-tile summaries of the token tensors (``tile_classes``): a few
    ``[B, Tq/bs, Tk/bs]`` comparisons, no compilation and nothing ``Tq x Tk``, on any device.
    ``GEMMA3VL_BLOCK_MASK=torch`` builds it with torch's ``create_block_mask`` instead (compiled on CUDA), which
    evaluates the rule on every pair: the reference the tests compare with, and a way out."""
    batch, query_length = queries.positions.shape
    key_batch, key_length = keys.positions.shape
    if key_batch != batch:
        raise Gemma3VLError(f"queries describe {batch} rows but keys describe {key_batch}")
    mask_mod = token_mask_mod(queries, keys, window)
    if os.environ.get("GEMMA3VL_BLOCK_MASK", "tiles") == "torch":
        device = queries.positions.device
        compiled = device.type == "cuda" and not torch.compiler.is_compiling()
        build = compiled_create_block_mask() if compiled else create_block_mask
        return build(mask_mod, batch, None, query_length, key_length, device=device, BLOCK_SIZE=block_size)
    present, full = tile_classes(queries, keys, window, block_size)
    partial = present & ~full
    return BlockMask.from_kv_blocks(
        *_ordered(partial), *_ordered(full), BLOCK_SIZE=block_size, mask_mod=mask_mod,
        seq_lengths=(query_length, key_length),
    )


def _tile_summary(info: TokenInfo, block_size: int) -> dict[str, torch.Tensor]:
    """Per tile of ``block_size`` tokens: the range of segment ids and of positions ([B, tiles]), and the image
    block ids ([B, tiles, block_size], -1 for other tokens). A ragged last tile is padded with padding tokens
    (segment 0), so it is never classified full: the kernels mask its out-of-range pairs themselves."""
    batch, length = info.positions.shape
    tiles = -(-length // block_size)
    pad = tiles * block_size - length

    def tiled(tensor: torch.Tensor, value: int) -> torch.Tensor:
        if pad:
            tensor = torch.nn.functional.pad(tensor, (0, pad), value=value)
        return tensor.reshape(batch, tiles, block_size)

    segments, positions = tiled(info.segment_ids, 0), tiled(info.positions, 0)
    # (segment, position) as one number: for two tokens of one conversation it orders them as their positions
    # do, and pairs of different conversations are never allowed, so its range per tile (padding left out) lets a
    # tile that straddles two conversations still be found entirely before or after another one.
    live = segments > 0
    order = segments.to(torch.int64) * 2**32 + positions.to(torch.int64)
    return {
        "seg_lo": segments.amin(-1), "seg_hi": segments.amax(-1),  # padding (0) included: full tiles have none
        "live_lo": torch.where(live, segments, torch.iinfo(segments.dtype).max).amin(-1),  # padding left out
        "pos_lo": positions.amin(-1), "pos_hi": positions.amax(-1),
        "order_lo": torch.where(live, order, torch.iinfo(torch.int64).max).amin(-1),
        "order_hi": torch.where(live, order, -1).amax(-1),
        "images": tiled(info.image_block_ids, -1),
    }


def _share_image(query_images: torch.Tensor, key_images: torch.Tensor) -> torch.Tensor:
    """[B, query tiles, key tiles]: whether the two tiles hold a token of one same image block (ids >= 0), from
    each tile's set of image ids as a one-hot row (ids are few: the images of the batch)."""
    count = int(max(query_images.max(), key_images.max())) + 1 if query_images.numel() else 0
    if count <= 0:
        return torch.zeros(query_images.shape[0], query_images.shape[1], key_images.shape[1], dtype=torch.bool,
                           device=query_images.device)

    def one_hot(images: torch.Tensor) -> torch.Tensor:  # [B, tiles, block] -> [B, tiles, count] in {0, 1}
        hot = torch.zeros(*images.shape[:2], count + 1, dtype=torch.float32, device=images.device)
        hot.scatter_(2, (images + 1).clamp_min(0), 1.0)  # column 0 collects the non-image tokens
        return hot[:, :, 1:]

    return torch.bmm(one_hot(query_images), one_hot(key_images).transpose(1, 2)) > 0


def tile_classes(
    queries: TokenInfo, keys: TokenInfo, window: int | None, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(present, full), each ``[B, query tiles, key tiles]`` bool: a tile is left out only when no pair in it can
    be allowed, and is full only when every pair is; everything else is partial (the kernels then evaluate the
    rule per pair), so the classification is safe whatever the order of the tokens. From per-tile ranges:

    * empty: the two tiles share no segment id (or the keys are all padding); or every key comes after every
      query (by position, or by (segment, position) order: pairs of different conversations never count) and
      no image block has tokens in both (no bidirectional exception); or, with a window, every key is at least
      ``window`` before every query (again by either);
    * full: both tiles lie in one and the same conversation (no padding), every key at or before every query,
      and, with a window, every key within it of every query (an image block only adds pairs)."""
    q = _tile_summary(queries, block_size)
    k = q if keys is queries else _tile_summary(keys, block_size)  # training: the row against itself

    def rows(name: str) -> torch.Tensor:  # query tiles along dim 1
        return q[name][:, :, None]

    def cols(name: str) -> torch.Tensor:  # key tiles along dim 2
        return k[name][:, None, :]

    share_segment = (rows("live_lo") <= cols("seg_hi")) & (cols("live_lo") <= rows("seg_hi"))
    share_image = _share_image(q["images"], k["images"])
    keys_after = (cols("pos_lo") > rows("pos_hi")) | (cols("order_lo") > rows("order_hi"))
    one_conversation = ((rows("seg_lo") == rows("seg_hi")) & (cols("seg_lo") == cols("seg_hi"))
                        & (rows("seg_lo") == cols("seg_lo")) & (cols("seg_lo") > 0))
    present = share_segment & ~(keys_after & ~share_image)
    full = one_conversation & (cols("pos_hi") <= rows("pos_lo"))
    if window is not None:
        present &= ~((cols("pos_hi") <= rows("pos_lo") - window) | (cols("order_hi") <= rows("order_lo") - window))
        full &= cols("pos_lo") > rows("pos_hi") - window
    return present, full & present


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, query tiles, key tiles]`` bool as a BlockMask's (count ``[B, 1, qt]``, indices ``[B, 1, qt, kt]``):
    per query tile, how many key tiles are set and their indices first (in ascending order)."""
    counts = tiles.sum(-1, dtype=torch.int32)
    indices = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None], indices[:, None]


KERNEL_OPTIONS_ENV = "GEMMA3VL_FLEX_KERNEL_OPTIONS"


def kernel_options() -> dict | None:
    """FlexAttention's Triton ``kernel_options`` on CUDA, from ``GEMMA3VL_FLEX_KERNEL_OPTIONS`` (a JSON object such
    as ``{"BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32, "num_warps": 4, "num_stages": 2}``);
    None (inductor's defaults) when unset. ``benchmarks/flex_tune.py`` times candidates at the model's shapes."""
    return _parse_kernel_options(os.environ.get(KERNEL_OPTIONS_ENV, ""))


@functools.lru_cache(maxsize=8)
def _parse_kernel_options(text: str) -> dict | None:
    if not text.strip():
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Gemma3VLError(f"{KERNEL_OPTIONS_ENV}={text!r}: not JSON ({exc})") from None
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        raise Gemma3VLError(f"{KERNEL_OPTIONS_ENV}={text!r}: expected a JSON object of option names to values")
    return options


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
    return attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                     kernel_options=kernel_options() if device_type == "cuda" else None)
