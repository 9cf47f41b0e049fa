"""LoRA and DoRA for our fused-weight Gemma 3, numerically the same as HF PEFT on transformers' model.

PEFT puts one adapter on each HF projection (``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``, ...). Our
model fuses q/k/v into one ``[K, (G+2)*hd, D]`` weight and gate/up into ``[2, I, D]``, so a wrapped fused
module carries one adapter per HF projection it holds. Each adapter works in its projection's own (HF)
row order, exactly as PEFT's does, and its output is placed into the fused output with the very op the
checkpoint bridge uses to fuse the weights (``gemma3vl.bridge.mapping``): an output feature is a weight
row, so the placement cannot disagree with the weights. The adapter tensors are therefore PEFT's tensors
as they are, and exporting them is only a renaming (``gemma3vl.train.peft_export``).

The base parameters keep their names (``text.layers.3.attn.qkv.weight``): the wrapper owns the base
module's Parameter objects itself instead of nesting the base module, so the bridge, checkpoints and
optimisers keep seeing the same names and the same tensors. Adapter parameters appear beside them, e.g.
``text.layers.3.attn.qkv.adapters.q_proj.lora_A.weight``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gemma3vl.bridge.layouts import get_layout
from gemma3vl.bridge.mapping import build_mappings
from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError
from gemma3vl.model.layers import FusedLinear

# Projection names as in transformers' Gemma 3 decoder and SigLIP tower (and so in PEFT configs).
TEXT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def hf_module_layout(config: Gemma3Config) -> str:
    """The bridge layout that spells module names as transformers' model holds them in memory, which is how
    PEFT names adapters: ``memory`` for Gemma3ForConditionalGeneration, ``text`` for Gemma3ForCausalLM."""
    return "memory" if config.is_vision_language else "text"


@dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how. Defaults are the usual recipe: every text attention and MLP projection.

    ``targets`` names text projections and ``vision_targets`` SigLIP ones (used only with
    ``include_vision``); both are HF names, since the adapters are per HF projection even where our weights
    are fused (a string is read as a comma list, as ``peft.targets=q_proj,v_proj`` on the command line).
    ``alpha / rank`` scales the update (PEFT with ``use_rslora=False``); ``alpha`` is any finite number.
    """

    rank: int = 16
    alpha: float = 32
    dropout: float = 0.0
    use_dora: bool = False
    targets: tuple[str, ...] = TEXT_PROJECTIONS
    include_vision: bool = False
    vision_targets: tuple[str, ...] = VISION_PROJECTIONS

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise Gemma3VLError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        # A non-finite alpha makes every adapter output inf * 0 = NaN from the first step, and a merge of it a
        # checkpoint of NaNs: refuse it before anything is built.
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not math.isfinite(self.alpha):
            raise Gemma3VLError(f"LoRA alpha must be a finite number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise Gemma3VLError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        # Accept lists (from JSON or a CLI) but keep the config hashable and immutable. A string is a comma list
        # (tuple("q_proj") would be its letters).
        for name in ("targets", "vision_targets"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [part.strip() for part in value.split(",") if part.strip()]
            object.__setattr__(self, name, tuple(value))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


# ------------------------------------------------------------------------------------------------ sites
@dataclass(frozen=True)
class Site:
    """One linear map of a decoder or vision layer, as the bridge's table describes it."""

    module: str  # native module path, e.g. "text.layers.0.attn.qkv"
    projections: tuple[str, ...]  # the HF projection of each part, in the op's order
    hf_modules: tuple[str, ...]  # each part's module name in transformers' model (PEFT's names)
    out_features: tuple[int, ...]
    op: object  # the bridge op: HF weights (rows) of the parts <-> the native weight

    @property
    def component(self) -> str:
        return self.module.split(".", 1)[0]  # "text" or "vision"


def adaptable_sites(config: Gemma3Config) -> list[Site]:
    """Every per-layer weight matrix of the model, read from the bridge's table (no second name table)."""
    sites = []
    for m in build_mappings(config, get_layout(hf_module_layout(config))):
        if ".layers." not in m.native or not m.native.endswith(".weight") or len(m.hf_shapes[0]) != 2:
            continue  # norms, embeddings, the head, the projector: not LoRA targets
        hf_modules = tuple(key.removesuffix(".weight") for key in m.hf)
        sites.append(
            Site(
                module=m.native.removesuffix(".weight"),
                projections=tuple(name.rsplit(".", 1)[1] for name in hf_modules),
                hf_modules=hf_modules,
                out_features=tuple(shape[0] for shape in m.hf_shapes),
                op=m.op,
            )
        )
    return sites


# ------------------------------------------------------------------------------------------------ modules
class LoraAdapter(nn.Module):
    """The adapter of one HF projection: PEFT's ``lora_A``/``lora_B`` (and DoRA magnitude), same maths.

    Works on that projection's rows in HF order; the wrapper does the fused placement.
    """

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, base_weight: torch.Tensor):
        super().__init__()
        # On a meta base (sharded loading builds the model there) the adapters are still made for real on the
        # CPU, with the same random draws as a single process makes; sharded loading then keeps each rank's box.
        device = base_weight.device if base_weight.device.type != "meta" else torch.device("cpu")
        factory = dict(device=device, dtype=base_weight.dtype)
        self.scaling = config.scaling
        self.lora_A = nn.Linear(in_features, config.rank, bias=False, **factory)
        self.lora_B = nn.Linear(config.rank, out_features, bias=False, **factory)
        # PEFT's init_lora_weights=True: A as nn.Linear's default, B zero, so the adapted model starts
        # exactly at the base model.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.magnitude: nn.Parameter | None = None
        if config.use_dora:
            # DoRA starts with m = ||W + s·BA|| row-wise (= ||W|| while B is zero): again the base model. A meta
            # base has no rows to measure: an empty magnitude there (the export's skeleton, given its tensors).
            self.magnitude = nn.Parameter(
                torch.empty(out_features, device="meta", dtype=base_weight.dtype) if base_weight.is_meta
                else self.weight_norm(base_weight))

    @property
    def reuses_base_result(self) -> bool:
        """Whether DoRA takes its ``x W^T`` from the base output: PEFT does unless dropout is active, in
        which case the base term must see the same dropped input as the adapter and is recomputed."""
        return self.magnitude is not None and (isinstance(self.dropout, nn.Identity) or not self.training)

    def lora_weight(self) -> torch.Tensor:
        """``B A`` [out, in], unscaled."""
        return self.lora_B.weight @ self.lora_A.weight

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W + s·BA||`` of each output row (PEFT's ``DoraLinearLayer.get_weight_norm``). Detached: DoRA
        (§4.3 of the paper) and PEFT treat it as a constant in backprop."""
        combined = weight + self.scaling * self.lora_weight().to(weight.dtype)
        return torch.linalg.norm(combined, dim=1).to(weight.dtype)

    def forward(
        self, x: torch.Tensor, base_result: torch.Tensor | None = None, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What this adapter adds to its projection's output ``x W^T + b`` (PEFT's ``Linear.forward``).

        DoRA needs the projection's base weight ``weight`` [out, in], and ``base_result`` = ``x W^T``
        without bias when ``reuses_base_result``. Its total is ``(m/||W + s·BA||) (x W^T + s·x A^T B^T) + b``;
        the bias is not rescaled.
        """
        x = x.to(self.lora_A.weight.dtype)
        if self.magnitude is None:
            return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        assert weight is not None, "DoRA needs the base weight"
        weight = weight.to(x.dtype)
        if not self.reuses_base_result:
            x = self.dropout(x)
            base_result = F.linear(x, weight)
        scale = (self.magnitude / self.weight_norm(weight)).view(1, -1)
        lora_result = self.lora_B(self.lora_A(x))
        return (scale - 1) * base_result + scale * lora_result * self.scaling

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The projection's weight with this adapter folded in, as PEFT's merge: ``W + s·BA``; for DoRA
        ``(m / ||W + s·BA||) (W + s·BA)`` row-wise. Computed in float32 (PEFT too computes ``BA`` in float32
        for bf16/fp16 weights on CPU) and rounded once to ``weight``'s dtype."""
        merged = weight.float() + self.lora_weight().float() * self.scaling
        if self.magnitude is not None:
            merged = (self.magnitude.float() / torch.linalg.norm(merged, dim=1)).view(-1, 1) * merged
        return merged.to(weight.dtype)


class LoraLinear(nn.Module):
    """An ``nn.Linear`` or ``FusedLinear`` carrying adapters on some of the HF projections it holds.

    It owns the base module's ``weight`` and ``bias`` Parameters (same objects, same names) and computes
    the base output exactly as the base module does, then adds each adapter's output at its projection's
    place in the fused layout.
    """

    def __init__(self, base: nn.Module, site: Site, chosen: set[str], config: LoraConfig):
        super().__init__()
        if type(base) not in (nn.Linear, FusedLinear):
            raise Gemma3VLError(f"{site.module}: cannot put LoRA on a {type(base).__name__}")
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.fused = isinstance(base, FusedLinear)
        self.projections = site.projections
        self.hf_modules = site.hf_modules
        self.out_features = site.out_features
        self.op = site.op
        in_features = base.weight.shape[-1]
        weights = self.weight_parts()
        self.adapters = nn.ModuleDict(
            {
                name: LoraAdapter(in_features, out, config, weight)
                for name, out, weight in zip(self.projections, self.out_features, weights)
                if name in chosen
            }
        )

    def weight_parts(self) -> tuple[torch.Tensor, ...]:
        """The base weight as the HF projections' weights [out_p, in], in ``projections`` order."""
        return tuple(self.op.to_hf(self.weight))

    # Outputs are laid out like weight rows, so the bridge's weight op moves them too: treat the N flattened
    # tokens as the "in" dimension of a weight.
    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """[..., out_total] in native order -> per projection [..., out_p] in HF order."""
        lead = flat.shape[:-1]
        rows = flat.reshape(-1, flat.shape[-1]).T.reshape(*self.weight.shape[:-1], -1)
        return [part.T.reshape(*lead, part.shape[0]) for part in self.op.to_hf(rows)]

    def _join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of ``_split``."""
        lead = parts[0].shape[:-1]
        rows = self.op.to_native([part.reshape(-1, part.shape[-1]).T for part in parts])
        return rows.reshape(-1, rows.shape[-1]).T.reshape(*lead, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        bias = None if self.bias is None else self.bias.reshape(-1)
        result = F.linear(x, weight.reshape(-1, weight.shape[-1]), bias)  # the base module's own computation
        adapters = [self.adapters[name] if name in self.adapters else None for name in self.projections]
        dora = any(a is not None and a.magnitude is not None for a in adapters)
        weights = self.weight_parts() if dora else [None] * len(adapters)
        base_parts = [None] * len(adapters)
        if any(a is not None and a.reuses_base_result for a in adapters):
            base_parts = self._split(result if bias is None else result - bias)  # PEFT subtracts the bias too
        deltas = [
            result.new_zeros(*result.shape[:-1], out) if adapter is None else adapter(x, base, w)
            for adapter, out, base, w in zip(adapters, self.out_features, base_parts, weights)
        ]
        out = (result + self._join(deltas)).to(result.dtype)
        return out.unflatten(-1, weight.shape[:-1]) if self.fused else out

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold the adapters into ``weight`` (in place, same Parameter) and return the plain base module."""
        parts = list(self.weight_parts())
        for i, name in enumerate(self.projections):
            if name in self.adapters:
                parts[i] = self.adapters[name].merged_weight(parts[i])
        self.weight.copy_(self.op.to_native(parts))
        with torch.device("meta"):
            if self.fused:
                plain = FusedLinear(*self.weight.shape, bias=self.bias is not None)
            else:
                plain = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None)
        plain.weight = self.weight
        if self.bias is not None:
            plain.bias = self.bias
        return plain.train(self.training)


# ------------------------------------------------------------------------------------------------ API
def lora_modules(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    """The wrapped modules of ``model`` with their native paths."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLinear)]


def apply_lora(model: nn.Module, config: LoraConfig, *, modules: Callable[[str], bool] | None = None) -> nn.Module:
    """Put adapters on ``config``'s targets of ``model`` (a ``Gemma3Model``), in place; returns ``model``.

    Every base parameter is frozen; only the adapters train. Base parameter names do not change. Apply it
    to a model whose weights are loaded: DoRA's magnitudes start from the base weights' row norms.
    ``modules``: of the targeted projections, only those whose HF module name (peft's, e.g.
    ``model.language_model.layers.3.self_attn.q_proj``) it accepts; default: the targets in every layer.
    """
    if lora_modules(model):
        raise Gemma3VLError("this model already has LoRA adapters (merge_lora them first)")
    if config.include_vision and getattr(model, "vision", None) is None:
        raise Gemma3VLError("include_vision is set, but this is a text-only model")
    sites = adaptable_sites(model.config)
    wanted = {"text": set(config.targets), "vision": set(config.vision_targets) if config.include_vision else set()}
    for component, names in wanted.items():
        known = list(dict.fromkeys(p for s in sites if s.component == component for p in s.projections))
        unknown = sorted(names - set(known))
        if unknown:
            raise Gemma3VLError(
                f"unknown {component} LoRA target(s) {', '.join(unknown)} (the {component} projections are "
                f"{', '.join(known)})"
            )
    if not any(wanted.values()):
        raise Gemma3VLError("no LoRA targets given")
    for param in model.parameters():
        param.requires_grad_(False)
    for site in sites:
        chosen = {projection for projection, module in zip(site.projections, site.hf_modules)
                  if projection in wanted[site.component] and (modules is None or modules(module))}
        if chosen:
            parent_name, _, child = site.module.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, LoraLinear(getattr(parent, child), site, chosen, config))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain modules back, in place; returns ``model``.

    The merged model computes what the adapted one did (up to rounding) with the original architecture and
    parameter names, so the bridge can write it as an ordinary checkpoint. Parameters stay frozen.
    """
    for name, module in lora_modules(model):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.merge())
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, adapters included in the total (as PEFT reports them); of the whole model
    under pipeline stages (a collective: every pipeline rank calls it)."""
    pipeline = getattr(model, "pipeline", None)
    if pipeline is not None:
        return pipeline.parameter_counts()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def parameter_summary(model: nn.Module) -> str:
    """One line for the training log: ``trainable: X of Y (Z%)``."""
    trainable, total = count_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    return f"trainable: {trainable:,} of {total:,} ({percent:.4f}%)"
