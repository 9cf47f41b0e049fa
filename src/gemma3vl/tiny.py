"""Tiny Gemma 3 configs: real structure (sliding + global layers, GQA, images), toy sizes.

Used by ``gemma3vl demo`` and by the tests. Token ids of the tiny tokenizer (see ``tiny_tokenizer``):
0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <mask>, 5 <start_of_turn>, 6 <end_of_turn>,
7 <start_of_image>, 8 <end_of_image>, 9 <image_soft_token>; the rest is a small byte-level BPE.
"""

from __future__ import annotations

import copy
from typing import Any

TINY_VOCAB_SIZE = 512
TINY_SPECIAL_TOKENS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "<start_of_turn>": 5,
    "<end_of_turn>": 6,
    "<start_of_image>": 7,
    "<end_of_image>": 8,
    "<image_soft_token>": 9,
}

_TINY_VL = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 7,
    "eoi_token_index": 8,
    "eos_token_id": [1, 6],
    "image_token_index": 9,
    "initializer_range": 0.02,
    "mm_tokens_per_image": 4,
    "model_type": "gemma3",
    "text_config": {
        "model_type": "gemma3_text",
        "vocab_size": TINY_VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 24,  # != hidden/heads (16)
        "query_pre_attn_scalar": 20,  # != head_dim
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "max_position_embeddings": 2048,
    },
    "torch_dtype": "float32",
    "vision_config": {
        "hidden_size": 32,
        "image_size": 56,
        "intermediate_size": 48,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "patch_size": 14,
        "vision_use_head": False,
    },
}


def tiny_hf_config(text_only: bool = False, **text_overrides: Any) -> dict[str, Any]:
    """A legacy-form (hub-style) HF config.json dict for a tiny random Gemma 3 model.

    ``text_overrides`` replace keys of ``text_config`` (e.g. ``num_key_value_heads=4`` for GQA ratio 1).
    ``text_only`` gives a ``gemma3_text`` config (``Gemma3ForCausalLM``) with the same decoder.
    """
    cfg = copy.deepcopy(_TINY_VL)
    cfg["text_config"].update(text_overrides)
    if not text_only:
        return cfg
    text = dict(cfg["text_config"])
    text.update(
        {
            "architectures": ["Gemma3ForCausalLM"],
            "eos_token_id": [1, 6],
            "bos_token_id": 2,
            "pad_token_id": 0,
            "torch_dtype": "float32",
        }
    )
    text.setdefault("final_logit_softcapping", 30.0)
    return text


def write_tiny_checkpoint(
    out_dir,
    *,
    text_only: bool = False,
    layout: str | None = None,
    dtype=None,
    max_shard_bytes: int | None = None,
    seed: int = 0,
    pan_and_scan: bool = False,
    **text_overrides: Any,
):
    """A complete tiny HF checkpoint directory: config, random weights (norms randomised too), tokenizer,
    chat template, processor and generation configs. Returns the directory as a Path."""
    from pathlib import Path

    import torch

    from gemma3vl.bridge import write_random_hf_checkpoint
    from gemma3vl.tiny_tokenizer import write_tokenizer_and_processor

    out_dir = Path(out_dir)
    config = tiny_hf_config(text_only=text_only, **text_overrides)
    layout = layout or ("text" if text_only else "hub")
    write_random_hf_checkpoint(
        config,
        out_dir,
        layout=layout,
        dtype=dtype or torch.float32,
        max_shard_bytes=max_shard_bytes,
        seed=seed,
    )
    write_tokenizer_and_processor(out_dir, config, pan_and_scan=pan_and_scan)
    return out_dir
