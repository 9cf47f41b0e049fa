"""Model configs: native dataclasses built from a Hugging Face ``config.json`` and written back to it.

Two forms of the HF config exist in the wild (reference §1):

* ``legacy`` — what the hub checkpoints carry (written by transformers 4.50): only non-default fields,
  ``rope_scaling`` (global layers only), ``rope_theta``, ``rope_local_base_freq``, ``sliding_window_pattern``.
* ``v5`` — what transformers 5 writes: explicit ``layer_types`` and ``rope_parameters`` per layer type.

Both parse into the same :class:`TextConfig` / :class:`VisionConfig` / :class:`Gemma3Config`; ``to_hf``
writes either form. Defaults are the transformers class defaults, because legacy files omit them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma3vl.errors import Gemma3VLError

SLIDING = "sliding_attention"
FULL = "full_attention"
# The MLP activations (text ``hidden_activation``, SigLIP ``hidden_act``) computed as transformers' ACT2FN entries of
# the same names compute them (gemma3vl.model.layers.activation): Gemma 3's own gelu_pytorch_tanh, and the other
# GELU forms a converted or hand-written config may name (MaxText's Gemma 3 configs say "gelu", the exact GELU).
# "gelu_tanh" (no ACT2FN entry) is an older alias of gelu_pytorch_tanh, kept.
SUPPORTED_ACTIVATIONS = (
    "gelu_pytorch_tanh", "gelu_tanh", "gelu", "gelu_python", "gelu_new", "gelu_python_tanh", "gelu_accurate",
    "gelu_fast", "quick_gelu", "gelu_10",
)
SUPPORTED_ROPE_TYPES = ("default", "linear")
VL_MODEL_TYPE = "gemma3"
TEXT_MODEL_TYPE = "gemma3_text"
VISION_MODEL_TYPE = "siglip_vision_model"


@dataclass(frozen=True)
class RopeConfig:
    """One RoPE table: ``inv_freq = 1 / theta ** (2j / head_dim) / factor`` (factor 1 unless linear)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type}
        if self.rope_type == "linear":
            out["factor"] = self.factor
        out["rope_theta"] = self.theta
        return out


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 262208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    layer_types: tuple[str, ...] = ()
    rope_local: RopeConfig = RopeConfig(theta=10_000.0)
    rope_global: RopeConfig = RopeConfig(theta=1_000_000.0)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int | tuple[int, ...] = 1
    tie_word_embeddings: bool = True
    # Dropout on the attention weights in training (transformers applies it; gemma3vl does not: training says so)
    attention_dropout: float = 0.0

    @property
    def queries_per_kv_head(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def attention_scale(self) -> float:
        return float(self.query_pre_attn_scalar) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def validate(self, where: str = "text_config") -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise Gemma3VLError(f"{where}: {name}={getattr(self, name)} must be >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise Gemma3VLError(
                f"{where}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise Gemma3VLError(f"{where}: head_dim={self.head_dim} must be even for RoPE")
        if len(self.layer_types) != self.num_hidden_layers:
            raise Gemma3VLError(
                f"{where}: layer_types has {len(self.layer_types)} entries, "
                f"num_hidden_layers is {self.num_hidden_layers}"
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in (SLIDING, FULL):
                raise Gemma3VLError(f"{where}: layer_types[{i}]={kind!r} is not {SLIDING!r} or {FULL!r}")
        if self.hidden_activation not in SUPPORTED_ACTIVATIONS:
            raise Gemma3VLError(
                f"{where}: hidden_activation={self.hidden_activation!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)}; Gemma 3 uses gelu_pytorch_tanh)"
            )
        for name, rope in (("sliding_attention", self.rope_local), ("full_attention", self.rope_global)):
            if rope.rope_type not in SUPPORTED_ROPE_TYPES:
                raise Gemma3VLError(
                    f"{where}: rope type {rope.rope_type!r} for {name} is not supported "
                    f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
                )
            if rope.factor <= 0:
                raise Gemma3VLError(f"{where}: rope factor {rope.factor} for {name} must be positive")
        if self.sliding_window < 1:
            raise Gemma3VLError(f"{where}: sliding_window={self.sliding_window} must be >= 1")


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower. Defaults are transformers' SiglipVisionConfig defaults (not Gemma's values)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    # SigLIP's attention-pooling head (``vision_use_head``; transformers' default true, the hub's Gemma 3 false).
    # Gemma 3 never runs it (it takes the tower's last hidden states), but a checkpoint that has it stores its
    # weights: they are kept, frozen, and written back.
    use_head: bool = False
    attention_dropout: float = 0.0  # (as TextConfig's: not applied)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, where: str = "vision_config") -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                     "image_size", "patch_size"):
            if getattr(self, name) < 1:
                raise Gemma3VLError(f"{where}: {name}={getattr(self, name)} must be >= 1")
        if self.image_size % self.patch_size:
            raise Gemma3VLError(
                f"{where}: image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise Gemma3VLError(
                f"{where}: hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise Gemma3VLError(
                f"{where}: hidden_act={self.hidden_act!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)}; Gemma 3 uses gelu_pytorch_tanh)"
            )


@dataclass(frozen=True)
class Gemma3Config:
    """A whole checkpoint: the VL model (``vision`` set) or a text-only Gemma 3 (``vision`` is None)."""

    text: TextConfig
    vision: VisionConfig | None = None
    mm_tokens_per_image: int = 256
    boi_token_id: int = 255999
    eoi_token_id: int = 256000
    image_token_id: int = 262144
    eos_token_id: int | tuple[int, ...] = (1, 106)
    torch_dtype: str | None = None
    source_form: str = "legacy"  # "legacy" or "v5": the form to_hf writes by default
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # top-level keys we pass through

    @property
    def is_vision_language(self) -> bool:
        return self.vision is not None

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.mm_tokens_per_image)

    @property
    def pool_kernel(self) -> int:
        assert self.vision is not None
        return self.vision.patches_per_side // self.tokens_per_side

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        ids = self.eos_token_id if self.is_vision_language else self.text.eos_token_id
        return tuple(ids) if isinstance(ids, (tuple, list)) else (int(ids),)

    def validate(self, where: str = "config") -> None:
        self.text.validate()
        if self.vision is None:
            return
        self.vision.validate()
        per_side = self.vision.patches_per_side
        side = self.tokens_per_side if self.mm_tokens_per_image > 0 else 0
        if side == 0 or side * side != self.mm_tokens_per_image or per_side % side:
            # transformers pools with kernel patches_per_side // isqrt(mm_tokens_per_image) and so gives another
            # number of soft tokens per image than the config (and its processor) says: every image input fails.
            made = (f"transformers' pooling would give {(per_side // (per_side // side)) ** 2} soft token(s) per "
                    "image instead" if 0 < side <= per_side else "transformers cannot pool to it")
            raise Gemma3VLError(
                f"{where}: mm_tokens_per_image={self.mm_tokens_per_image} must be a perfect square whose root "
                f"divides the {per_side} patches per side (image_size/patch_size); {made}"
            )
        for name in ("boi_token_id", "eoi_token_id"):
            if not 0 <= getattr(self, name) < self.text.vocab_size:
                raise Gemma3VLError(f"{where}: {name}={getattr(self, name)} is outside the vocabulary")
        # image_token_index may lie past the embedding (a vocabulary without the soft token's row, as Gemma 3
        # before its 64 extra rows): transformers then looks up row 0 for those ids, overwritten by the image
        # features anyway, and so does TextDecoder.embed_tokens.
        if self.image_token_id < 0:
            raise Gemma3VLError(f"{where}: image_token_index={self.image_token_id} must not be negative")

    # ------------------------------------------------------------------ HF in
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], where: str = "config.json") -> "Gemma3Config":
        if not isinstance(raw, dict):
            raise Gemma3VLError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        for key in ("quantization_config", "compression_config"):
            if raw.get(key):
                method = raw[key].get("quant_method") if isinstance(raw[key], dict) else None
                raise Gemma3VLError(
                    f"{where}: {key} is set{f' (quant_method {method!r})' if method else ''}: quantized "
                    "checkpoints are not supported; use the unquantized (bfloat16/float32) checkpoint"
                )
        model_type = raw.get("model_type")
        if model_type == VL_MODEL_TYPE:
            text_raw = raw.get("text_config") or {}
            vision_raw = raw.get("vision_config")
            if vision_raw is None:
                raise Gemma3VLError(f"{where}: model_type 'gemma3' needs a vision_config")
            text, text_form = _text_from_hf(text_raw, f"{where}: text_config")
            # transformers 5 ties the VL model's output matrix by the top-level flag and ignores text_config's
            # (a text_config saying false under a tied model stores no lm_head): the decoder follows the top.
            text = dataclasses.replace(text, tie_word_embeddings=raw.get("tie_word_embeddings", True) is not False)
            vision = _vision_from_hf(vision_raw, f"{where}: vision_config")
            known = {
                "model_type", "text_config", "vision_config", "mm_tokens_per_image", "boi_token_index",
                "eoi_token_index", "image_token_index", "eos_token_id", "torch_dtype", "dtype",
                "boi_token_id", "eoi_token_id", "image_token_id",
            }
            cfg = cls(
                text=text,
                vision=vision,
                mm_tokens_per_image=_number(raw, "mm_tokens_per_image", 256, where),
                boi_token_id=_number(raw, "boi_token_index", 255999, where, int, "boi_token_id"),
                eoi_token_id=_number(raw, "eoi_token_index", 256000, where, int, "eoi_token_id"),
                image_token_id=_number(raw, "image_token_index", 262144, where, int, "image_token_id"),
                eos_token_id=_ids((1, 106) if raw.get("eos_token_id") is None else raw["eos_token_id"]),
                torch_dtype=raw.get("torch_dtype", raw.get("dtype")),
                source_form=text_form,
                extra={k: v for k, v in raw.items() if k not in known},
            )
        elif model_type == TEXT_MODEL_TYPE:
            text, text_form = _text_from_hf(raw, where)
            known = set(_TEXT_KEYS) | {"model_type", "torch_dtype", "dtype"}
            cfg = cls(
                text=text,
                vision=None,
                eos_token_id=text.eos_token_id,
                torch_dtype=raw.get("torch_dtype", raw.get("dtype")),
                source_form=text_form,
                extra={k: v for k, v in raw.items() if k not in known},
            )
        else:
            architectures = raw.get("architectures")
            named = (f"architectures {', '.join(map(str, architectures))}; "
                     if isinstance(architectures, list) and architectures else "")
            raise Gemma3VLError(
                f"{where}: model_type={model_type!r} is not a Gemma 3 checkpoint ({named}expected "
                f"{VL_MODEL_TYPE!r}, Gemma3ForConditionalGeneration, or {TEXT_MODEL_TYPE!r}, Gemma3ForCausalLM)"
            )
        cfg.validate(where)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "Gemma3Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            adapter = path.parent / "adapter_config.json"
            if adapter.is_file():
                try:
                    base = json.loads(adapter.read_text()).get("base_model_name_or_path")
                except (ValueError, OSError, AttributeError):
                    base = None
                raise Gemma3VLError(
                    f"{path.parent}: this is a PEFT adapter ({adapter.name}"
                    f"{f', base model {base!r}' if base else ''}), not a model checkpoint: use its base model "
                    "(gemma3vl eval takes the adapter with --adapter) or merge the adapter into it first"
                )
            if path.parent.is_file():  # a model path that names a file (config.json itself, a .safetensors file)
                raise Gemma3VLError(f"{path.parent}: a file, not a checkpoint directory (the directory that holds "
                                    "config.json and the weights)")
            raise Gemma3VLError(f"{path}: no such file (a Gemma 3 checkpoint directory holds config.json)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Gemma3VLError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_hf_dict(raw, where=str(path))

    # ------------------------------------------------------------------ HF out
    def to_hf_dict(self, form: str | None = None) -> dict[str, Any]:
        form = form or self.source_form
        if form not in ("legacy", "v5"):
            raise Gemma3VLError(f"unknown config form {form!r} (legacy or v5)")
        dtype_key = "torch_dtype" if form == "legacy" else "dtype"
        if self.vision is None:
            out = dict(self.extra)
            out.update(_text_to_hf(self.text, form))
            out["model_type"] = TEXT_MODEL_TYPE
            if self.torch_dtype is not None:
                out[dtype_key] = self.torch_dtype
            return out
        out = dict(self.extra)
        text = _text_to_hf(self.text, form)
        text["model_type"] = TEXT_MODEL_TYPE
        out.update(
            {
                "boi_token_index": self.boi_token_id,
                "eoi_token_index": self.eoi_token_id,
                "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
                "image_token_index": self.image_token_id,
                "mm_tokens_per_image": self.mm_tokens_per_image,
                "model_type": VL_MODEL_TYPE,
                "text_config": text,
                "vision_config": _vision_to_hf(self.vision),
            }
        )
        if self.torch_dtype is not None:
            out[dtype_key] = self.torch_dtype
        return out

    def replace(self, **changes: Any) -> "Gemma3Config":
        return dataclasses.replace(self, **changes)


_TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window", "layer_types",
    "sliding_window_pattern", "_sliding_window_pattern", "rope_parameters", "rope_scaling", "rope_theta",
    "rope_local_base_freq", "rms_norm_eps", "max_position_embeddings", "final_logit_softcapping",
    "attn_logit_softcapping", "hidden_activation", "pad_token_id", "bos_token_id",
    "eos_token_id", "tie_word_embeddings", "use_bidirectional_attention", "attention_bias",
    "attention_dropout",
)


def _number(raw: dict[str, Any], key: str, default: Any, where: str, kind: type = int, *alternatives: str) -> Any:
    """``raw[key]`` (or the first of ``alternatives`` present) as ``kind``; absent: ``default``. ``null`` means
    unset for token ids (transformers leaves them None and uses them only to tokenize and generate) and is an
    error naming the key for a shape or a constant, as is a value that is not a number."""
    value = default
    for name in (key, *alternatives):
        if name in raw:
            key, value = name, raw[name]
            break
    if value is None:
        if key in _NULL_IS_UNSET:
            return default
        raise Gemma3VLError(f"{where}: {key} is null; expected {'an integer' if kind is int else 'a number'}")
    try:
        # (a number written as text, "64", is refused as transformers 5 refuses it, not converted)
        if isinstance(value, (bool, str)) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise Gemma3VLError(
            f"{where}: {key}={value!r} is not {'an integer' if kind is int else 'a number'}"
        ) from None


_NULL_IS_UNSET = {"bos_token_id", "pad_token_id", "eos_token_id"}


def _scalar(raw: dict[str, Any], key: str, default: float, where: str) -> float:
    """A positive number kept as written (an int stays an int, so the config writes back the same)."""
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise Gemma3VLError(f"{where}: {key}={value!r} must be a positive number")
    return value


def _ids(value: Any) -> int | tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return int(value)


def _theta(raw: dict[str, Any], key: str, default: float, where: str) -> float:
    """A RoPE base frequency; absent or null means ``default`` (transformers' default theta)."""
    return default if raw.get(key) is None else _number(raw, key, default, where, float)


def _rope_from_dict(entry: dict[str, Any], default_theta: float, where: str,
                    partial_default: Any = None) -> RopeConfig:
    if not isinstance(entry, dict):
        raise Gemma3VLError(f"{where}: expected an object, got {entry!r}")
    rope_type = entry.get("rope_type", entry.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise Gemma3VLError(
            f"{where}: rope_type={rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    factor = float(entry.get("factor", 1.0)) if rope_type == "linear" else 1.0
    partial = entry.get("partial_rotary_factor", partial_default)
    if rope_type != "default" and partial is not None and partial != 1:
        # transformers' Gemma 3 ignores it for "default" tables and rotates only part of each head for the others,
        # whose cos/sin then do not fit the head: its forward fails.
        raise Gemma3VLError(
            f"{where}: partial_rotary_factor={partial!r} with rope_type={rope_type!r} is not supported (Gemma 3 "
            "rotates whole heads; transformers cannot run it either)"
        )
    return RopeConfig(theta=_theta(entry, "rope_theta", default_theta, where), rope_type=rope_type, factor=factor)


def _text_from_hf(raw: dict[str, Any], where: str) -> tuple[TextConfig, str]:
    if not isinstance(raw, dict):
        raise Gemma3VLError(f"{where}: expected an object")
    model_type = raw.get("model_type", TEXT_MODEL_TYPE)
    if model_type != TEXT_MODEL_TYPE:
        raise Gemma3VLError(f"{where}: model_type={model_type!r}, expected {TEXT_MODEL_TYPE!r}")
    if raw.get("use_bidirectional_attention"):
        raise Gemma3VLError(f"{where}: use_bidirectional_attention=true (EmbeddingGemma) is not supported")
    if raw.get("attention_bias"):
        raise Gemma3VLError(f"{where}: attention_bias=true is not supported (Gemma 3 has no attention biases)")
    defaults = TextConfig()
    form = "v5" if ("rope_parameters" in raw or "layer_types" in raw) else "legacy"
    layers = _number(raw, "num_hidden_layers", defaults.num_hidden_layers, where)

    layer_types = raw.get("layer_types")
    if layer_types is None:
        # Only ``sliding_window_pattern``: transformers (4.53+ and 5) ignores a ``_sliding_window_pattern`` key,
        # which it writes beside ``layer_types`` (that one is what counts), so a file with only it means 6.
        pattern = raw.get("sliding_window_pattern", 6)
        if not isinstance(pattern, int) or pattern < 1:
            raise Gemma3VLError(f"{where}: sliding_window_pattern={pattern!r} must be a positive integer")
        layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    elif not isinstance(layer_types, list):
        raise Gemma3VLError(f"{where}: layer_types must be a list")

    rope_parameters = raw.get("rope_parameters")
    # transformers fills what a layer type's entry leaves out from the legacy keys (rope_theta for global
    # layers, rope_local_base_freq for sliding ones) and merges a legacy rope_scaling into the global entry.
    global_theta = _theta(raw, "rope_theta", 1_000_000.0, where)
    partial = raw.get("partial_rotary_factor")  # transformers copies a top-level one into each entry
    local_theta = _theta(raw, "rope_local_base_freq", 10_000.0, where)
    if isinstance(rope_parameters, dict) and (SLIDING in rope_parameters or FULL in rope_parameters):
        global_entry = rope_parameters.get(FULL) or {}
        if isinstance(global_entry, dict) and isinstance(raw.get("rope_scaling"), dict):
            global_entry = {**global_entry, **raw["rope_scaling"]}
        rope_local = _rope_from_dict(rope_parameters.get(SLIDING) or {}, local_theta,
                                     f"{where}: rope_parameters.{SLIDING}", partial)
        rope_global = _rope_from_dict(global_entry, global_theta, f"{where}: rope_parameters.{FULL}", partial)
    else:
        if isinstance(rope_parameters, dict) and rope_parameters and raw.get("rope_scaling") is None:
            # A flat dict (the form most models use in transformers 5): for Gemma 3, transformers reads only
            # per-layer-type entries and silently ignores it. Accept it only where that changes nothing.
            flat = _rope_from_dict({"rope_theta": global_theta, **rope_parameters}, global_theta,
                                   f"{where}: rope_parameters")
            if flat != RopeConfig(theta=global_theta):
                raise Gemma3VLError(
                    f"{where}: rope_parameters {rope_parameters!r} is flat; Gemma 3 needs one entry per layer type "
                    f"({{{SLIDING!r}: {{...}}, {FULL!r}: {{...}}}}); transformers ignores a flat one (no scaling, "
                    "thetas from rope_theta / rope_local_base_freq)"
                )
            rope_parameters = None
        # Legacy: rope_scaling applies to global layers only (reference §1.1).
        scaling = raw.get("rope_scaling") or rope_parameters or {}
        if not isinstance(scaling, dict):
            raise Gemma3VLError(f"{where}: rope_scaling={scaling!r} must be an object (e.g. "
                                '{"rope_type": "linear", "factor": 8.0}) or null')
        global_entry = dict(scaling)
        global_entry.setdefault("rope_theta", global_theta)
        rope_global = _rope_from_dict(global_entry, global_theta, f"{where}: rope_scaling", partial)
        rope_local = RopeConfig(theta=local_theta)

    # Only ``hidden_activation``: Gemma3TextConfig keeps a ``hidden_act`` key (Gemma 1/2's name) as an inert
    # attribute and runs its default, gelu_pytorch_tanh, so reading it would part from transformers.
    activation = raw.get("hidden_activation", defaults.hidden_activation)
    softcap = raw.get("final_logit_softcapping")
    eos = raw.get("eos_token_id")
    eos = defaults.eos_token_id if eos is None else eos
    text = TextConfig(
        vocab_size=_number(raw, "vocab_size", defaults.vocab_size, where),
        hidden_size=_number(raw, "hidden_size", defaults.hidden_size, where),
        intermediate_size=_number(raw, "intermediate_size", defaults.intermediate_size, where),
        num_hidden_layers=layers,
        num_attention_heads=_number(raw, "num_attention_heads", defaults.num_attention_heads, where),
        num_key_value_heads=_number(raw, "num_key_value_heads", defaults.num_key_value_heads, where),
        head_dim=_number(raw, "head_dim", defaults.head_dim, where),
        query_pre_attn_scalar=_scalar(raw, "query_pre_attn_scalar", defaults.query_pre_attn_scalar, where),
        sliding_window=_number(raw, "sliding_window", defaults.sliding_window, where),
        layer_types=tuple(layer_types),
        rope_local=rope_local,
        rope_global=rope_global,
        rms_norm_eps=_number(raw, "rms_norm_eps", defaults.rms_norm_eps, where, float),
        max_position_embeddings=_number(raw, "max_position_embeddings", defaults.max_position_embeddings, where),
        final_logit_softcapping=None if softcap is None else float(softcap),
        hidden_activation=activation,
        pad_token_id=_number(raw, "pad_token_id", defaults.pad_token_id or 0, where),
        bos_token_id=_number(raw, "bos_token_id", defaults.bos_token_id, where),
        eos_token_id=_ids(eos),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        attention_dropout=_number(raw, "attention_dropout", 0.0, where, float),
    )
    text.validate(where)
    return text, form


def _text_to_hf(text: TextConfig, form: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "head_dim": text.head_dim,
        "query_pre_attn_scalar": text.query_pre_attn_scalar,
        "sliding_window": text.sliding_window,
        "rms_norm_eps": text.rms_norm_eps,
        "max_position_embeddings": text.max_position_embeddings,
        "final_logit_softcapping": text.final_logit_softcapping,
        "attn_logit_softcapping": None,
        "hidden_activation": text.hidden_activation,
        "pad_token_id": text.pad_token_id,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": list(text.eos_token_id) if isinstance(text.eos_token_id, tuple) else text.eos_token_id,
        "tie_word_embeddings": text.tie_word_embeddings,
    }
    if text.attention_dropout:
        out["attention_dropout"] = text.attention_dropout
    if form == "v5":
        out["layer_types"] = list(text.layer_types)
        out["rope_parameters"] = {SLIDING: text.rope_local.to_hf(), FULL: text.rope_global.to_hf()}
        return out
    pattern = _pattern_of(text.layer_types)
    if pattern is None:
        out["layer_types"] = list(text.layer_types)  # no pattern reproduces it; transformers reads this too
    else:
        out["sliding_window_pattern"] = pattern
    out["rope_theta"] = text.rope_global.theta
    out["rope_local_base_freq"] = text.rope_local.theta
    if text.rope_global.rope_type != "default":
        out["rope_scaling"] = {"factor": text.rope_global.factor, "rope_type": text.rope_global.rope_type}
    if text.rope_local.rope_type != "default":
        raise Gemma3VLError("the legacy config form cannot express RoPE scaling on sliding layers; use form v5")
    return out


def _pattern_of(layer_types: tuple[str, ...]) -> int | None:
    for pattern in range(1, len(layer_types) + 2):
        if all((t == FULL) == ((i + 1) % pattern == 0) for i, t in enumerate(layer_types)):
            return pattern
    return None


def _vision_from_hf(raw: dict[str, Any], where: str) -> VisionConfig:
    if not isinstance(raw, dict):
        raise Gemma3VLError(f"{where}: expected an object")
    model_type = raw.get("model_type", VISION_MODEL_TYPE)
    if model_type != VISION_MODEL_TYPE:
        raise Gemma3VLError(f"{where}: model_type={model_type!r}, expected {VISION_MODEL_TYPE!r}")
    use_head = raw.get("vision_use_head", True)  # transformers' SiglipVisionConfig default
    if not isinstance(use_head, bool):
        raise Gemma3VLError(f"{where}: vision_use_head={use_head!r} must be true or false")
    d = VisionConfig()
    vision = VisionConfig(
        hidden_size=_number(raw, "hidden_size", d.hidden_size, where),
        intermediate_size=_number(raw, "intermediate_size", d.intermediate_size, where),
        num_hidden_layers=_number(raw, "num_hidden_layers", d.num_hidden_layers, where),
        num_attention_heads=_number(raw, "num_attention_heads", d.num_attention_heads, where),
        num_channels=_number(raw, "num_channels", d.num_channels, where),
        image_size=_number(raw, "image_size", d.image_size, where),
        patch_size=_number(raw, "patch_size", d.patch_size, where),
        layer_norm_eps=_number(raw, "layer_norm_eps", d.layer_norm_eps, where, float),
        hidden_act=raw.get("hidden_act", d.hidden_act),
        use_head=use_head,
        attention_dropout=_number(raw, "attention_dropout", 0.0, where, float),
    )
    vision.validate(where)
    return vision


def _vision_to_hf(vision: VisionConfig) -> dict[str, Any]:
    return {
        "hidden_size": vision.hidden_size,
        "image_size": vision.image_size,
        "intermediate_size": vision.intermediate_size,
        "model_type": VISION_MODEL_TYPE,
        "num_attention_heads": vision.num_attention_heads,
        "num_channels": vision.num_channels,
        "num_hidden_layers": vision.num_hidden_layers,
        "patch_size": vision.patch_size,
        "layer_norm_eps": vision.layer_norm_eps,
        "hidden_act": vision.hidden_act,
        "vision_use_head": vision.use_head,
        **({"attention_dropout": vision.attention_dropout} if vision.attention_dropout else {}),
    }


def preset_path(name: str) -> Path | None:
    """The shipped hub config for ``4b``/``12b``/``27b`` (used by planners and benchmarks)."""
    here = Path(__file__).parent / "presets" / f"gemma-3-{name}-it.json"
    return here if here.is_file() else None
