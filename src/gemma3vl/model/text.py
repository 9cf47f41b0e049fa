"""The Gemma 3 text decoder (reference §2): scaled embedding, sandwich-normed blocks, tied head.

Weights are fused for tensor parallelism: QKV as ``[K, (G + 2) * hd, D]`` (each KV group: its G query heads,
one key head, one value head) and gate/up as ``[2, I, D]``. The module knows nothing of parallelism.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from gemma3vl.config import FULL, SLIDING, TextConfig
from gemma3vl.model.attention import TokenInfo, attend, dense_mask
from gemma3vl.model.flex import DEFAULT_BLOCK_SIZE, attend_flex, block_mask, use_flex
from gemma3vl.model.layers import FusedLinear, GemmaRMSNorm, Rotary, activation, apply_rotary


class Cache(Protocol):
    """What the decoder needs from a KV cache (see ``gemma3vl.infer.cache.KVCache``)."""

    def keys_info(self, layer_type: str, new: TokenInfo) -> TokenInfo: ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def end_step(self) -> None: ...


class Attention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.num_kv_heads = config.num_key_value_heads
        self.queries_per_kv = config.queries_per_kv_head
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.qkv = FusedLinear(self.num_kv_heads, (self.queries_per_kv + 2) * self.head_dim, config.hidden_size)
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.o = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | BlockMask,
        cache: Cache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        heads = self.qkv(x).unflatten(-1, (self.queries_per_kv + 2, self.head_dim))  # [B, T, K, G+2, hd]
        q = heads[:, :, :, : self.queries_per_kv].flatten(2, 3).transpose(1, 2)  # [B, H, T, hd]
        k = heads[:, :, :, self.queries_per_kv].transpose(1, 2)  # [B, K, T, hd]
        v = heads[:, :, :, self.queries_per_kv + 1].transpose(1, 2)
        q = apply_rotary(self.q_norm(q), cos, sin)
        k = apply_rotary(self.k_norm(k), cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if isinstance(mask, BlockMask):
            out = attend_flex(q, k, v, mask, self.scale)
        else:
            out = attend(q, k, v, mask, self.scale)
        return self.o(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    """GeGLU: ``down(act(gate(x)) * up(x))`` with gate/up fused as ``[2, I, D]``; ``act`` is the config's
    ``hidden_activation`` (Gemma 3: tanh-approximated GELU)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_up = FusedLinear(2, config.intermediate_size, config.hidden_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = activation(config.hidden_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).unbind(-2)
        return self.down(self.act(gate) * up)


class DecoderBlock(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.layer_type = config.layer_types[layer]
        eps = config.rms_norm_eps
        self.attn_norm = GemmaRMSNorm(config.hidden_size, eps)
        self.attn = Attention(config)
        self.post_attn_norm = GemmaRMSNorm(config.hidden_size, eps)
        self.mlp_norm = GemmaRMSNorm(config.hidden_size, eps)
        self.mlp = MLP(config)
        self.post_mlp_norm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, x, cos, sin, mask, cache: Cache | None = None) -> torch.Tensor:
        x = x + self.post_attn_norm(self.attn(self.attn_norm(x), cos, sin, mask, cache, self.layer))
        return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))


class TextDecoder(nn.Module):
    """Embedding, blocks, final norm and head.

    ``attention_backend`` picks the attention kernel for every forward (a plain attribute, set from outside):
    ``sdpa`` (dense boolean mask; the default, the reference the parity tests pin), ``flex`` (FlexAttention with
    a block-sparse ``BlockMask``; ``gemma3vl.model.flex``), or ``auto`` (flex on CUDA, sdpa on the CPU). Training
    sets it from ``model.attention`` (default auto); generation may set it for its prefill. Single-token decode
    steps always take the dense path (``attention.attend_one_query``). The masks are built once per forward, one
    per layer type, whatever the backend.
    """

    def __init__(self, config: TextConfig, softcap_logits: bool = False):
        super().__init__()
        self.config = config
        self.attention_backend = "sdpa"
        self.flex_block_size = DEFAULT_BLOCK_SIZE
        self.loss_compile_backend: str | None = None  # the training loss's softmax part compiled (apply_compile)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: nn.Linear | None = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Only Gemma3ForCausalLM caps logits; the VL model never does (reference §2.6).
        self.logit_softcap = config.final_logit_softcapping if softcap_logits else None
        self.rotary = {
            SLIDING: Rotary(config.head_dim, config.rope_local),
            FULL: Rotary(config.head_dim, config.rope_global),
        }

    def add_untied_head(self) -> None:
        """Give the model its own output matrix (a checkpoint that stores ``lm_head`` apart from the embedding)."""
        if self.lm_head is None:
            weight = self.embed.weight
            self.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``E[ids] * sqrt(D)`` with the scale rounded to the weight dtype first (bf16: 50.5 for the 4B)."""
        safe_ids = torch.where(input_ids < self.config.vocab_size, input_ids, torch.zeros_like(input_ids))
        weight = self.embed.weight
        scale = torch.tensor(self.config.hidden_size**0.5, dtype=torch.float32).to(weight.dtype)
        return self.embed(safe_ids) * scale.to(weight.device)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        info: TokenInfo,
        cache: Cache | None = None,
        *,
        attention_backend: str | None = None,
    ) -> torch.Tensor:
        """Run the blocks over ``inputs_embeds`` [B, T, D]; returns final-normed hidden states.
        ``attention_backend`` (sdpa, flex, auto) overrides ``self.attention_backend`` for this call."""
        x = inputs_embeds
        flex = use_flex(attention_backend or self.attention_backend, x.device, x.shape[1])
        tables = {}
        for layer_type, rotary in self.rotary.items():
            keys = cache.keys_info(layer_type, info) if cache is not None else info
            window = self.config.sliding_window if layer_type == SLIDING else None
            cos, sin = rotary.cos_sin(info.positions, x.dtype)
            mask = block_mask(info, keys, window, self.flex_block_size) if flex else dense_mask(info, keys, window)
            tables[layer_type] = (cos, sin, mask)
        for block in self.layers:
            cos, sin, mask = tables[block.layer_type]
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.end_step()
        return self.norm(x)

    @property
    def output_weight(self) -> torch.Tensor:
        """The output matrix: the embedding (tied, as in every Gemma 3 checkpoint) or a separate head."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.output_weight)
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits
