"""The model ``gemma3vl eval`` scores: an HF or native checkpoint, optionally with a PEFT LoRA/DoRA adapter.

An adapter directory is what ``gemma3vl train`` writes to ``OUT/adapter`` (and what
``PeftModel.save_pretrained`` writes for transformers' Gemma 3): ``adapter_config.json`` and
``adapter_model.safetensors``. It is the inverse of ``gemma3vl.train.peft_export``: the config says which
projections carry adapters, ``apply_lora`` puts ours there, and every tensor is copied onto the parameter
that export would have written under the same key, every key consumed and every shape checked. The adapter
is then merged, so generation runs the plain model at full speed.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from gemma3vl.errors import Gemma3VLError
from gemma3vl.train.lora import LoraConfig, adaptable_sites, apply_lora, lora_modules, merge_lora
from gemma3vl.train.peft_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, peft_named_parameters

# Module names of transformers 4.x models in memory, which adapters trained with it carry, and what
# transformers 5 calls the same modules: up to 4.51 the bridge's "hub" layout; 4.52 to 4.57 already
# ``model.language_model`` but still the SigLIP tower's ``vision_model.`` (``model.vision_tower.vision_model``).
_LEGACY_MODULE_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("model.vision_tower.vision_model.", "model.vision_tower."),
)
_LEGACY_PREFIXES = tuple((PEFT_PREFIX + old, PEFT_PREFIX + new) for old, new in _LEGACY_MODULE_PREFIXES)


# peft LoraConfig fields that describe something other than one rank and alpha on every adapted projection of
# this base (or an adapter that cannot be merged): refused when set, naming them
UNSUPPORTED_ADAPTER_FIELDS = (
    "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save", "lora_bias",
    "alora_invocation_tokens", "layer_replication", "use_bdlora", "arrow_config", "kasa_config",
    "monteclora_config", "velora_config", "target_parameters", "trainable_token_indices",
)
PEFT_DEFAULT_ALPHA = 8  # peft's LoraConfig.lora_alpha when the file names none


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG
    if not adapter_dir.exists():
        raise Gemma3VLError(f"{adapter_dir}: no such adapter directory")
    if not adapter_dir.is_dir():
        raise Gemma3VLError(f"{adapter_dir}: a file, not a PEFT adapter directory")
    if not path.is_file():
        raise Gemma3VLError(f"{adapter_dir}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise Gemma3VLError(f"{path}: cannot read ({exc})") from None
    if not isinstance(config, dict):
        raise Gemma3VLError(f"{path}: expected a JSON object (peft's LoraConfig), found {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise Gemma3VLError(f"{path}: peft_type {config.get('peft_type')!r}; only LoRA / DoRA adapters load")
    given = {key: config[key] for key in UNSUPPORTED_ADAPTER_FIELDS if config.get(key)}
    if given:
        raise Gemma3VLError(f"{path}: {', '.join(f'{k}={v!r}' for k, v in given.items())} is not supported "
                            "(one rank and alpha for every adapted projection of every layer, no trained biases)")
    if config.get("bias", "none") != "none":
        raise Gemma3VLError(f"{path}: bias={config['bias']!r} is not supported (only 'none')")
    alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise Gemma3VLError(f"{path}: lora_alpha={alpha!r} must be a finite number")
    for key in ("target_modules", "exclude_modules"):
        patterns = config.get(key)
        if isinstance(patterns, str):
            try:
                re.compile(patterns)
            except re.error as exc:
                raise Gemma3VLError(f"{path}: {key}={patterns!r} is not a regular expression ({exc})") from None
        elif patterns is not None and (not isinstance(patterns, list)
                                       or not all(isinstance(p, str) for p in patterns)):
            raise Gemma3VLError(f"{path}: {key}={patterns!r} must be a regular expression or a list of module "
                                "names")
    return config


def _matches(module: str, patterns: Any) -> bool:
    """PEFT's rule: a string is a regex matched against the whole name; a list holds name suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module) is not None
    return any(module == target or module.endswith("." + target) for target in patterns or ())


def _module_names(module: str) -> list[str]:
    """``module`` (as transformers 5 names it) and what the transformers 4.x versions called it: an adapter
    config written with those names in its patterns still means the same modules."""
    return [module] + [old + module[len(new):] for old, new in _LEGACY_MODULE_PREFIXES if module.startswith(new)]


def _targeted(module: str, config: dict[str, Any]) -> bool:
    """Whether PEFT puts an adapter on ``module``: ``target_modules`` matches it and ``exclude_modules``
    does not (PEFT's ``check_target_module_exists``)."""
    names = _module_names(module)
    if any(_matches(name, config.get("exclude_modules")) for name in names):
        return False
    return any(_matches(name, config.get("target_modules")) for name in names)


def adapter_lora_config(model: torch.nn.Module, config: dict[str, Any], where: Path) -> LoraConfig:
    """Our :class:`LoraConfig` for the projections the PEFT config targets."""
    chosen: dict[str, set[str]] = {"text": set(), "vision": set()}
    for site in adaptable_sites(model.config):
        for projection, module in zip(site.projections, site.hf_modules):
            if _targeted(module, config):
                chosen[site.component].add(projection)
    if not chosen["text"] and not chosen["vision"]:
        raise Gemma3VLError(f"{where}: target_modules {config.get('target_modules')!r} matches no projection of "
                            "this model")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise Gemma3VLError(f"{where}: r={rank!r} must be a positive integer")
    return LoraConfig(
        rank=rank,
        alpha=float(config.get("lora_alpha", PEFT_DEFAULT_ALPHA)),
        use_dora=bool(config.get("use_dora", False)),
        targets=tuple(sorted(chosen["text"])),
        include_vision=bool(chosen["vision"]),
        vision_targets=tuple(sorted(chosen["vision"])) or LoraConfig.vision_targets,
    )


def check_adapter_base(model_dir: str | Path, adapter_dir: str | Path) -> None:
    """Refuse ``model_dir`` when it is the merged export (``OUT/hf``) of the training run that wrote the adapter
    ``adapter_dir`` (``OUT/adapter``): that adapter is already in its weights and would count twice."""
    adapter_dir = Path(adapter_dir).resolve()
    run = adapter_dir.parent
    if not (run / "train_config.json").is_file() or Path(model_dir).resolve() != (run / "hf").resolve():
        return
    try:
        base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (ValueError, OSError):
        base = None
    raise Gemma3VLError(
        f"{model_dir} is the merged export of the training run that wrote the adapter {adapter_dir}: the adapter "
        f"is already in its weights. Use {model_dir} without --adapter, or the base model "
        f"({base or 'model.path of the run'}) with --adapter")


UNADAPTED_MODULES = ("lm_head", "embed_tokens")  # adapted by some PEFT configs; never by gemma3vl


def _mismatch(missing: list[str], unexpected: list[str]) -> str:
    """Why an adapter's tensors are not the ones its config gives this model, as precisely as the names tell: a
    module gemma3vl does not adapt, another kind of model's names (a text-only adapter on a vision-language base),
    or else the counts and an example of each."""
    odd = sorted({name for key in unexpected for name in UNADAPTED_MODULES if f".{name}." in key})
    if odd:
        return (f"the adapter adapts {', '.join(odd)} (its target_modules name it), which gemma3vl does not adapt: "
                "only the decoder's and the vision tower's attention and MLP projections")

    def stem(key: str) -> str:  # the module path before the layers
        return key.split(".layers.", 1)[0] if ".layers." in key else key

    if missing and unexpected and not {stem(k) for k in unexpected} & {stem(k) for k in missing}:
        return (f"the adapter's modules are another model's: its tensors are under {stem(unexpected[0])}.layers, "
                f"this model's under {stem(missing[0])}.layers (an adapter of a text-only Gemma3ForCausalLM on a "
                "vision-language base, or the other way round?)")
    detail = (f"missing {len(missing)} (e.g. {missing[0]})" if missing else "") + \
             ("; " if missing and unexpected else "") + \
             (f"unexpected {len(unexpected)} (e.g. {unexpected[0]})" if unexpected else "")
    return f"the tensors do not match the adapters its config describes: {detail}"


def load_peft_adapter(model: torch.nn.Module, adapter_dir: str | Path, *, merge: bool = True) -> LoraConfig:
    """Put the adapter of ``adapter_dir`` on ``model`` (in place) and, with ``merge``, fold it in."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise Gemma3VLError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise Gemma3VLError(f"{weights_path}: cannot read ({exc})") from None
    tensors = {_modern_key(key): value for key, value in tensors.items()}
    lora = adapter_lora_config(model, config, adapter_dir)
    apply_lora(model, lora, modules=lambda module: _targeted(module, config))  # (a regex may pick some layers)
    for _, wrapped in lora_modules(model):
        # held in float32, as peft does (autocast_adapter_dtype): the file's values reach the merge unrounded,
        # which is then rounded once to the base's dtype (bf16 for the hub models)
        wrapped.adapters.float()
    params = peft_named_parameters(model)
    missing = sorted(params.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - params.keys())
    if missing or unexpected:
        raise Gemma3VLError(f"{weights_path}: {_mismatch(missing, unexpected)}")
    with torch.no_grad():
        for key, param in params.items():
            value = tensors[key]
            if tuple(value.shape) != tuple(param.shape):
                raise Gemma3VLError(f"{weights_path}: {key} has shape {tuple(value.shape)}, expected "
                                    f"{tuple(param.shape)}")
            param.copy_(value.to(param.dtype))
    if merge:
        merge_lora(model)
    return lora


def check_adapter(model_dir: str | Path, adapter_dir: str | Path) -> None:
    """What can be checked of ``--adapter`` before the model loads: a PEFT adapter directory with its weights, and
    not the adapter of ``model_dir``'s own training run (:func:`check_adapter_base`)."""
    adapter_dir = Path(adapter_dir)
    read_adapter_config(adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise Gemma3VLError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    check_adapter_base(model_dir, adapter_dir)


def merge_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> str:
    """Put the PEFT adapter of ``adapter_dir`` on ``model`` and fold it into the weights (callers run
    :func:`check_adapter` before loading the model); returns a line saying what was merged."""
    lora = load_peft_adapter(model, adapter_dir)
    targets = lora.targets + (lora.vision_targets if lora.include_vision else ())
    return f"adapter {adapter_dir}: LoRA{' (DoRA)' if lora.use_dora else ''} r{lora.rank} on {', '.join(targets)}, merged"


def _modern_key(key: str) -> str:
    for old, new in _LEGACY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key
