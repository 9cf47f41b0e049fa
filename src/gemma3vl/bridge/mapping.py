"""The whole HF <-> native correspondence of Gemma 3, as one table of rules.

A rule names one native tensor, the HF tensor(s) it is made of (relative to the layout's prefix, see
layouts.py), their shapes as a function of the config, the op between them and how a random checkpoint
initialises them. Every op is a pure cat/split/stack/view: ``op.to_hf(op.to_native(parts)) == parts``
bit for bit, dtype kept, in every direction. Native shapes are not written down in the table: each op
derives its native shape from the HF shapes (``native_shape``; a test holds it to what ``to_native`` makes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from gemma3vl.bridge.layouts import LAYOUTS, Layout, get_layout
from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError

Shape = tuple[int, ...]


# ------------------------------------------------------------------------------------------------ ops
class Op(Protocol):
    """``to_native`` and ``to_hf`` are exact inverses. ``slots(native)`` are views of a native tensor, one per
    HF part, each holding that part's elements in its row-major order: import reads the file bytes straight
    into them, with no intermediate copy to concatenate."""

    def to_native(self, parts: Sequence[torch.Tensor]) -> torch.Tensor: ...

    def to_hf(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def slots(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def native_shape(self, shapes: Sequence[Shape]) -> Shape: ...

    def region_reads(self, region: Region, shapes: Sequence[Shape]) -> list[RegionRead]:
        """How to fill ``region`` of the native tensor from the HF parts (see :class:`RegionRead`)."""
        ...


Region = tuple[slice, ...]  # one slice(start, stop) per dim, both given


@dataclass(frozen=True)
class RegionRead:
    """Read ``part_region`` of HF part ``part`` seen with shape ``view_shape`` (a reshape of its stored
    shape) into ``out_region`` of the region's buffer. Sharded loading reads only a rank's own shard this way."""

    part: int
    view_shape: Shape
    part_region: Region
    out_region: Region


def _whole(length: int) -> slice:
    return slice(0, length)


class Rename:
    """One HF tensor is one native tensor."""

    def to_native(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        (tensor,) = parts
        return tensor

    def to_hf(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (tensor,)

    def slots(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (tensor,)

    def native_shape(self, shapes: Sequence[Shape]) -> Shape:
        (shape,) = shapes
        return tuple(shape)

    def region_reads(self, region: Region, shapes: Sequence[Shape]) -> list[RegionRead]:
        return [RegionRead(0, tuple(shapes[0]), region, tuple(_whole(r.stop - r.start) for r in region))]


class Stack:
    """Same-shaped HF tensors stacked on a new leading dim: gate/up ``[2, I, D]``, SigLIP q/k/v ``[3, Dv, ...]``.
    Tensor parallelism then shards dim 1 and every rank keeps its gate rows next to its up rows."""

    def to_native(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(parts))

    def to_hf(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(tensor.unbind(0))

    def slots(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(tensor.unbind(0))

    def native_shape(self, shapes: Sequence[Shape]) -> Shape:
        return (len(shapes), *shapes[0])

    def region_reads(self, region: Region, shapes: Sequence[Shape]) -> list[RegionRead]:
        rest = tuple(_whole(r.stop - r.start) for r in region[1:])
        return [RegionRead(i, (1, *shapes[i]), (slice(0, 1), *region[1:]),
                           (slice(i - region[0].start, i - region[0].start + 1), *rest))
                for i in range(region[0].start, region[0].stop)]


@dataclass(frozen=True)
class FuseQKV:
    """q/k/v projections grouped by KV head: ``[K, (G+2)*hd, D]``, group j = (q heads j*G .. j*G+G-1, k head j,
    v head j). That is the head pairing of HF's ``repeat_kv``, and ``Shard(0)`` gives each rank whole groups."""

    kv_heads: int
    queries_per_kv: int
    head_dim: int

    def to_native(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        q, k, v = parts
        K, G, hd = self.kv_heads, self.queries_per_kv, self.head_dim
        width = q.shape[-1]
        return torch.cat([q.reshape(K, G * hd, width), k.reshape(K, hd, width), v.reshape(K, hd, width)], dim=1)

    def to_hf(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        K, G, hd = self.kv_heads, self.queries_per_kv, self.head_dim
        width = tensor.shape[-1]
        q, k, v = self.slots(tensor)
        return q.reshape(K * G * hd, width), k.reshape(K * hd, width), v.reshape(K * hd, width)

    def slots(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # [K, G*hd, D], [K, hd, D], [K, hd, D]: row-major, exactly q_proj, k_proj, v_proj.
        G, hd = self.queries_per_kv, self.head_dim
        return tuple(tensor.split([G * hd, hd, hd], dim=1))

    def native_shape(self, shapes: Sequence[Shape]) -> Shape:
        return (self.kv_heads, (self.queries_per_kv + 2) * self.head_dim, shapes[0][-1])

    def region_reads(self, region: Region, shapes: Sequence[Shape]) -> list[RegionRead]:
        groups, rows, columns = region
        reads, first = [], 0
        for part, width in enumerate((self.queries_per_kv * self.head_dim, self.head_dim, self.head_dim)):
            lo, hi = max(rows.start, first), min(rows.stop, first + width)
            if lo < hi:  # this part's rows [first, first + width) of each group meet the region
                reads.append(RegionRead(
                    part, (self.kv_heads, width, shapes[part][-1]), (groups, slice(lo - first, hi - first), columns),
                    (_whole(groups.stop - groups.start), slice(lo - rows.start, hi - rows.start),
                     _whole(columns.stop - columns.start)),
                ))
            first += width
        return reads


# ------------------------------------------------------------------------------------------------ dims
@dataclass(frozen=True)
class Dims:
    """The sizes the table's shapes are written in (names as in the reference)."""

    V: int  # vocab
    D: int  # text hidden
    I: int  # text MLP
    H: int  # query heads
    K: int  # key/value heads
    hd: int  # head_dim
    Dv: int = 0  # vision hidden
    Iv: int = 0  # vision MLP
    C: int = 0  # image channels
    p: int = 0  # patch size
    Np: int = 0  # patches per image

    @classmethod
    def of(cls, config: Gemma3Config) -> "Dims":
        t, v = config.text, config.vision
        text = dict(V=t.vocab_size, D=t.hidden_size, I=t.intermediate_size, H=t.num_attention_heads,
                    K=t.num_key_value_heads, hd=t.head_dim)
        if v is None:
            return cls(**text)
        return cls(**text, Dv=v.hidden_size, Iv=v.intermediate_size, C=v.num_channels, p=v.patch_size,
                   Np=v.num_patches)


# ------------------------------------------------------------------------------------------------ table
@dataclass(frozen=True)
class Rule:
    native: str  # may contain {i}, the layer index
    hf: tuple[str, ...]  # relative to the component's prefix; may contain {i}
    hf_shapes: Callable[[Dims], Sequence[Shape]]
    op: Callable[[Dims], Op] = lambda d: Rename()
    init: str = "normal"  # normal | rms_norm (Gemma's (1+w) weight) | layer_norm (weight near 1) | bias


def _rms(native: str, hf: str, size: Callable[[Dims], int]) -> Rule:
    return Rule(native, (hf,), lambda d: [(size(d),)], init="rms_norm")


def _qkv(d: Dims) -> FuseQKV:
    return FuseQKV(d.K, d.H // d.K, d.hd)


TEXT_EMBED_RULES = (Rule("text.embed.weight", ("embed_tokens.weight",), lambda d: [(d.V, d.D)]),)
TEXT_LAYER_RULES = (
    _rms("text.layers.{i}.attn_norm.weight", "layers.{i}.input_layernorm.weight", lambda d: d.D),
    Rule("text.layers.{i}.attn.qkv.weight",
         ("layers.{i}.self_attn.q_proj.weight", "layers.{i}.self_attn.k_proj.weight",
          "layers.{i}.self_attn.v_proj.weight"),
         lambda d: [(d.H * d.hd, d.D), (d.K * d.hd, d.D), (d.K * d.hd, d.D)], op=_qkv),
    _rms("text.layers.{i}.attn.q_norm.weight", "layers.{i}.self_attn.q_norm.weight", lambda d: d.hd),
    _rms("text.layers.{i}.attn.k_norm.weight", "layers.{i}.self_attn.k_norm.weight", lambda d: d.hd),
    Rule("text.layers.{i}.attn.o.weight", ("layers.{i}.self_attn.o_proj.weight",), lambda d: [(d.D, d.H * d.hd)]),
    _rms("text.layers.{i}.post_attn_norm.weight", "layers.{i}.post_attention_layernorm.weight", lambda d: d.D),
    _rms("text.layers.{i}.mlp_norm.weight", "layers.{i}.pre_feedforward_layernorm.weight", lambda d: d.D),
    Rule("text.layers.{i}.mlp.gate_up.weight", ("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight"),
         lambda d: [(d.I, d.D), (d.I, d.D)], op=lambda d: Stack()),
    Rule("text.layers.{i}.mlp.down.weight", ("layers.{i}.mlp.down_proj.weight",), lambda d: [(d.D, d.I)]),
    _rms("text.layers.{i}.post_mlp_norm.weight", "layers.{i}.post_feedforward_layernorm.weight", lambda d: d.D),
)
TEXT_FINAL_RULES = (_rms("text.norm.weight", "norm.weight", lambda d: d.D),)
# The key is the layout's whole lm_head name (it is under the text prefix in no layout): prefix + "".
LM_HEAD_RULE = Rule("text.lm_head.weight", ("",), lambda d: [(d.V, d.D)])

VISION_EMBED_RULES = (
    Rule("vision.patch_embed.weight", ("embeddings.patch_embedding.weight",), lambda d: [(d.Dv, d.C, d.p, d.p)]),
    Rule("vision.patch_embed.bias", ("embeddings.patch_embedding.bias",), lambda d: [(d.Dv,)], init="bias"),
    Rule("vision.pos_embed.weight", ("embeddings.position_embedding.weight",), lambda d: [(d.Np, d.Dv)]),
)
_VL = "encoder.layers.{i}."
VISION_LAYER_RULES = (
    Rule("vision.layers.{i}.norm1.weight", (_VL + "layer_norm1.weight",), lambda d: [(d.Dv,)], init="layer_norm"),
    Rule("vision.layers.{i}.norm1.bias", (_VL + "layer_norm1.bias",), lambda d: [(d.Dv,)], init="bias"),
    Rule("vision.layers.{i}.attn.qkv.weight",
         tuple(_VL + f"self_attn.{x}_proj.weight" for x in "qkv"), lambda d: [(d.Dv, d.Dv)] * 3,
         op=lambda d: Stack()),
    Rule("vision.layers.{i}.attn.qkv.bias",
         tuple(_VL + f"self_attn.{x}_proj.bias" for x in "qkv"), lambda d: [(d.Dv,)] * 3,
         op=lambda d: Stack(), init="bias"),
    Rule("vision.layers.{i}.attn.out.weight", (_VL + "self_attn.out_proj.weight",), lambda d: [(d.Dv, d.Dv)]),
    Rule("vision.layers.{i}.attn.out.bias", (_VL + "self_attn.out_proj.bias",), lambda d: [(d.Dv,)], init="bias"),
    Rule("vision.layers.{i}.norm2.weight", (_VL + "layer_norm2.weight",), lambda d: [(d.Dv,)], init="layer_norm"),
    Rule("vision.layers.{i}.norm2.bias", (_VL + "layer_norm2.bias",), lambda d: [(d.Dv,)], init="bias"),
    Rule("vision.layers.{i}.mlp.fc1.weight", (_VL + "mlp.fc1.weight",), lambda d: [(d.Iv, d.Dv)]),
    Rule("vision.layers.{i}.mlp.fc1.bias", (_VL + "mlp.fc1.bias",), lambda d: [(d.Iv,)], init="bias"),
    Rule("vision.layers.{i}.mlp.fc2.weight", (_VL + "mlp.fc2.weight",), lambda d: [(d.Dv, d.Iv)]),
    Rule("vision.layers.{i}.mlp.fc2.bias", (_VL + "mlp.fc2.bias",), lambda d: [(d.Dv,)], init="bias"),
)
VISION_FINAL_RULES = (
    Rule("vision.post_norm.weight", ("post_layernorm.weight",), lambda d: [(d.Dv,)], init="layer_norm"),
    Rule("vision.post_norm.bias", ("post_layernorm.bias",), lambda d: [(d.Dv,)], init="bias"),
)
# SigLIP's pooling head, when the config has vision_use_head (kept, never run: see model/vision.py VisionHead).
VISION_HEAD_RULES = (
    Rule("vision.head.probe", ("head.probe",), lambda d: [(1, 1, d.Dv)]),
    Rule("vision.head.attention.in_proj_weight", ("head.attention.in_proj_weight",), lambda d: [(3 * d.Dv, d.Dv)]),
    Rule("vision.head.attention.in_proj_bias", ("head.attention.in_proj_bias",), lambda d: [(3 * d.Dv,)],
         init="bias"),
    Rule("vision.head.attention.out_proj.weight", ("head.attention.out_proj.weight",), lambda d: [(d.Dv, d.Dv)]),
    Rule("vision.head.attention.out_proj.bias", ("head.attention.out_proj.bias",), lambda d: [(d.Dv,)], init="bias"),
    Rule("vision.head.layernorm.weight", ("head.layernorm.weight",), lambda d: [(d.Dv,)], init="layer_norm"),
    Rule("vision.head.layernorm.bias", ("head.layernorm.bias",), lambda d: [(d.Dv,)], init="bias"),
    Rule("vision.head.mlp.fc1.weight", ("head.mlp.fc1.weight",), lambda d: [(d.Iv, d.Dv)]),
    Rule("vision.head.mlp.fc1.bias", ("head.mlp.fc1.bias",), lambda d: [(d.Iv,)], init="bias"),
    Rule("vision.head.mlp.fc2.weight", ("head.mlp.fc2.weight",), lambda d: [(d.Dv, d.Iv)]),
    Rule("vision.head.mlp.fc2.bias", ("head.mlp.fc2.bias",), lambda d: [(d.Dv,)], init="bias"),
)
PROJECTOR_RULES = (
    _rms("projector.norm.weight", "mm_soft_emb_norm.weight", lambda d: d.Dv),
    # A plain [Dv, D] parameter used as x @ W (not an nn.Linear): kept as is, not transposed.
    Rule("projector.proj", ("mm_input_projection_weight",), lambda d: [(d.Dv, d.D)]),
)


# ------------------------------------------------------------------------------------------------ expansion
@dataclass(frozen=True)
class Mapping:
    """A rule made concrete for one config, layout and layer: full key names and shapes."""

    native: str
    hf: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]
    op: Op
    init: str
    optional: bool = False  # a tied model may still store lm_head; keep it if it is there

    @property
    def native_shape(self) -> Shape:
        return self.op.native_shape(self.hf_shapes)


def stores_untied_head(config: Gemma3Config) -> bool:
    """Whether the config says the output matrix is its own tensor. transformers 5 reads the VL model's
    tie from the top-level ``tie_word_embeddings`` (text_config's is ignored there), a text model's from its own."""
    if config.is_vision_language:
        return config.extra.get("tie_word_embeddings", True) is False
    return not config.text.tie_word_embeddings


def build_mappings(config: Gemma3Config, layout: Layout, *, lm_head: bool | None = None) -> list[Mapping]:
    """Every tensor of ``config`` in ``layout``, in checkpoint order (text, lm_head, vision, projector).

    ``lm_head``: None follows the config (required if untied, absent if tied); True includes it (required
    if untied, optional if tied); False leaves it out even if untied (only for checks that want that)."""
    if layout.vision_language != config.is_vision_language:
        kind = "vision-language" if config.is_vision_language else "text-only"
        raise Gemma3VLError(
            f"layout {layout.name!r} is {'vision-language' if layout.vision_language else 'text-only'}, "
            f"but the model is {kind}"
        )
    dims = Dims.of(config)

    def concrete(rule: Rule, prefix: str, layer: int | None = None, optional: bool = False) -> Mapping:
        def name(template: str) -> str:
            return template if layer is None else template.format(i=layer)

        return Mapping(name(rule.native), tuple(prefix + name(h) for h in rule.hf),
                       tuple(tuple(s) for s in rule.hf_shapes(dims)), rule.op(dims), rule.init, optional)

    def section(rules: tuple[Rule, ...], prefix: str, layers: int | None = None) -> list[Mapping]:
        if layers is None:
            return [concrete(rule, prefix) for rule in rules]
        return [concrete(rule, prefix, i) for i in range(layers) for rule in rules]

    mappings = section(TEXT_EMBED_RULES, layout.text)
    mappings += section(TEXT_LAYER_RULES, layout.text, config.text.num_hidden_layers)
    mappings += section(TEXT_FINAL_RULES, layout.text)
    untied = stores_untied_head(config)
    if lm_head or (lm_head is None and untied):
        mappings.append(concrete(LM_HEAD_RULE, layout.lm_head, optional=not untied))
    if config.vision is not None:
        mappings += section(VISION_EMBED_RULES, layout.vision)
        mappings += section(VISION_LAYER_RULES, layout.vision, config.vision.num_hidden_layers)
        mappings += section(VISION_FINAL_RULES, layout.vision)
        if config.vision.use_head:
            mappings += section(VISION_HEAD_RULES, layout.vision)
        mappings += section(PROJECTOR_RULES, layout.projector)
    return mappings


def native_tensor_specs(config: Gemma3Config, *, lm_head: bool | None = None) -> dict[str, Shape]:
    """Native name -> shape for every tensor of ``config`` (``lm_head`` as in build_mappings)."""
    layout = LAYOUTS["hub" if config.is_vision_language else "text"]
    return {m.native: m.native_shape for m in build_mappings(config, layout, lm_head=lm_head)}


def hf_tensor_specs(config: Gemma3Config, layout: str, *, lm_head: bool | None = None) -> dict[str, Shape]:
    """HF key -> shape for every tensor of ``config`` in ``layout`` (``lm_head`` as in build_mappings)."""
    return {
        key: shape
        for m in build_mappings(config, get_layout(layout), lm_head=lm_head)
        for key, shape in zip(m.hf, m.hf_shapes)
    }
