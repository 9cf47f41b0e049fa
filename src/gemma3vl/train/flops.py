"""Model FLOPs of a training step: the one count behind every MFU we report.

The trainer's ``metrics.jsonl`` (``mfu``) and ``benchmarks/train_step.py`` both divide these FLOPs by the step time
and the card's dense bf16 peak (``gemma3vl.train.metrics.peak_flops_per_second``), so the two agree as long as
both give the LM head the same rows (the trainer: its batches' targets; ``step_flops(..., targets=)``). Counted, 2
FLOPs per multiply-add:

* the text decoder's matmuls, per token;
* the LM head, per position that has a target: the loss projects only those onto the vocabulary
  (``gemma3vl.model.loss``; prompts, images and padding never reach the output matrix). Without a target count
  (``targets=None``) every token is counted, as transformers computes logits everywhere;
* attention over the keys each query actually attends to: ``QK^T`` and ``PV`` are ``4 x heads x head_dim`` per
  (query, key) pair. A conversation of ``L`` tokens is causal: ``L (L + 1) / 2`` pairs on a global layer, at most
  ``window`` keys a query on a sliding one. Packed conversations never attend to each other, so a packed row
  counts each conversation's pairs (its length comes from the segment ids of the mask description), not the
  row's. The image block's few bidirectional pairs are ignored (256 of 4,096+ tokens: ~1e-3 of the total);
* the SigLIP tower (bidirectional over its patches) and the projector, per image (pan & scan crops included).

Backward is twice the forward for what is trained (activation and weight gradients: 3 x forward in all). A frozen
part whose inputs still need gradients (the LoRA'd decoder, a frozen decoder under a trained tower) computes
activation gradients only: 2 x forward for its matmuls, but still 3 x for its attention, which has no weights
(``dQ``, ``dK``, ``dV`` and ``dP``: four matmuls against the forward's two). A frozen vision tower (its input is
pixels) runs forward only: 1 x. Recomputation by activation checkpointing is not counted (as usual for MFU: the
model's FLOPs, not the hardware's), nor the LoRA adapters' own matmuls (about 1% of a step at rank 16).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch

from gemma3vl.config import SLIDING, Gemma3Config
from gemma3vl.model.loss import IGNORE


def attended_pairs(length: int, window: int | None) -> float:
    """(query, key) pairs of one causal sequence of ``length`` tokens (sliding window: each query sees at most
    ``window`` keys, itself included)."""
    if window is None or window >= length:
        return length * (length + 1) / 2
    # positions 0..window-1 see i + 1 keys, the other length - window positions see window each
    return window * (window + 1) / 2 + (length - window) * window


def keys_per_query(seq: int, window: int | None) -> float:
    """Mean number of keys a causal query attends to in a sequence of ``seq`` tokens."""
    return attended_pairs(seq, window) / seq


def _lengths(seq: int | Sequence[int]) -> list[int]:
    return [int(seq)] if isinstance(seq, int) else [int(n) for n in seq if n > 0]


def _vision_per_image(config: Gemma3Config) -> tuple[float, float]:
    """Forward FLOPs of one image through the SigLIP tower and the projector: (matmuls, attention)."""
    v = config.vision
    patches = (v.image_size // v.patch_size) ** 2
    width = v.hidden_size
    matmuls = 2 * patches * (v.num_hidden_layers * (4 * width**2 + 2 * width * v.intermediate_size)
                             + 3 * v.patch_size**2 * width)
    matmuls += 2 * config.mm_tokens_per_image * width * config.text.hidden_size
    return matmuls, 4 * patches**2 * width * v.num_hidden_layers


def forward_flops(config: Gemma3Config, seq: int | Sequence[int], images: int,
                  targets: int | None = None) -> dict[str, float]:
    """Forward FLOPs by part, for one sequence of ``seq`` tokens or several (a list of conversation lengths:
    the packed conversations of a batch), with ``images`` images in all and ``targets`` positions projected onto
    the vocabulary (those with a target; default: every token).

    text matmuls:   2 T L (D (H + 2K) hd + H hd D + 3 D I) + 2 T_t D V   (QKV, output, gate/up/down; LM head)
    text attention: 4 H hd sum over layers and sequences of attended_pairs(length, window)
                    (QK^T and PV; sliding layers: at most window keys a query)
    vision:         per image, P = (S / patch)^2 patches: 2 P [L_v (4 d^2 + 2 d i) + 3 patch^2 d]
                    + 4 P^2 d L_v (bidirectional attention), plus the projector 2 m d D (m soft tokens)
    (T: all the tokens; T_t: those with a target; L: decoder layers; D, I: hidden and MLP widths; H, K: query and
    key/value heads; V: the vocabulary; d, i, L_v: the vision tower's widths and layers.)
    """
    lengths = _lengths(seq)
    tokens = sum(lengths)
    projected = tokens if targets is None else int(targets)
    text = config.text
    hd, heads, kv = text.head_dim, text.num_attention_heads, text.num_key_value_heads
    d, inter = text.hidden_size, text.intermediate_size
    per_layer = d * (heads + 2 * kv) * hd + heads * hd * d + 3 * d * inter
    text_matmul = 2 * tokens * text.num_hidden_layers * per_layer + 2 * projected * d * text.vocab_size
    windows = Counter(text.sliding_window if kind == SLIDING else None for kind in text.layer_types)
    attention = 0.0
    for window, layers in windows.items():
        attention += 4 * heads * hd * layers * sum(attended_pairs(n, window) for n in lengths)
    vision = 0.0
    if images and config.vision is not None:
        vision = images * sum(_vision_per_image(config))
    return {"text_matmul": text_matmul, "text_attention": attention, "vision": vision}


def step_flops(config: Gemma3Config, seq: int | Sequence[int], images: int, mode: str = "sft", *,
               vision_trained: bool | None = None, vision_adapted: bool = False,
               targets: int | None = None) -> float:
    """Model FLOPs of one training step (forward + backward; recomputation not counted).

    Full fine-tuning (``sft``): 3 x forward everywhere (backward: activation and weight gradients). LoRA
    (``peft``): the text decoder's matmuls and the LM head compute activation gradients only (2 x forward; the
    adapters' own FLOPs, about 1% at rank 16, are ignored); its attention, which has no weights, still 3 x. The
    vision tower and projector: 3 x when trained (``vision_trained``; default: with ``sft``); with adapters on the
    frozen tower (``vision_adapted``: ``peft.include_vision``) 2 x for its matmuls and 3 x for its attention; else
    forward only (1 x: nothing upstream needs their gradients). ``targets``: positions with a target (the LM
    head's rows), default every token."""
    if mode not in ("sft", "peft"):
        raise ValueError(f"mode={mode!r}: expected 'sft' or 'peft'")
    parts = forward_flops(config, seq, images, targets)
    text = (3 if mode == "sft" else 2) * parts["text_matmul"] + 3 * parts["text_attention"]
    if vision_trained is None:
        vision_trained = mode == "sft"
    if vision_trained:
        vision = 3 * parts["vision"]
    elif vision_adapted and parts["vision"]:
        matmuls, attention = _vision_per_image(config)
        vision = images * (2 * matmuls + 3 * attention)
    else:
        vision = parts["vision"]
    return text + vision


def segment_lengths(segment_ids: torch.Tensor) -> list[int]:
    """Token counts of every conversation of a batch, from its ``[B, T]`` segment ids (0 = padding; a row's
    conversations are numbered from 1). One ``bincount`` over the batch: microseconds on the host."""
    segment_ids = segment_ids.detach().to("cpu", torch.long)
    if segment_ids.numel() == 0:
        return []
    width = int(segment_ids.max()) + 1
    rows = torch.arange(segment_ids.shape[0])[:, None] * width
    counts = torch.bincount((segment_ids + rows).flatten(), minlength=segment_ids.shape[0] * width)
    counts = counts.view(segment_ids.shape[0], width)[:, 1:].flatten()
    return counts[counts > 0].tolist()


def batch_step_flops(config: Gemma3Config, batches: Iterable, mode: str = "sft", *,
                     vision_trained: bool | None = None, vision_adapted: bool = False) -> float:
    """``step_flops`` of a step's micro-batches (``gemma3vl.data.batch.Batch``), each conversation counted at its
    own length and the LM head at the positions that have a target. A context-parallel rank's batch
    (``parallel.context.ContextParallelBatch``: the whole batch and this rank's slice) counts ``1 / degree`` of the
    whole batch, so that the sum over the context-parallel ranks counts every conversation once."""
    lengths: list[int] = []
    images = 0
    targets = 0
    share = 1.0
    for batch in batches:
        whole = getattr(batch, "whole", batch)
        shard = getattr(batch, "shard", None)
        if shard is not None:
            share = 1.0 / shard.degree
        lengths += segment_lengths(whole.info.segment_ids)
        images += 0 if whole.pixel_values is None else int(whole.pixel_values.shape[0])
        targets += int((whole.targets != IGNORE).sum())
    if not lengths:
        return 0.0
    return share * step_flops(config, lengths, images, mode, vision_trained=vision_trained,
                              vision_adapted=vision_adapted, targets=targets)
