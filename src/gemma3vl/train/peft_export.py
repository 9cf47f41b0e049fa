"""A LoRA'd model's adapters as an HF PEFT adapter directory for transformers' Gemma 3.

What ``PeftModel.save_pretrained`` writes with peft 0.21.2 (checked on the tiny transformers models, and
pinned by tests/test_lora_peft.py), per adapted projection, in ``adapter_model.safetensors``:

* ``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r];
* with DoRA also ``base_model.model.<module>.lora_magnitude_vector`` [out] (no adapter name, no ``.weight``),

where ``<module>`` is the module's name in transformers' model in memory:
``model.language_model.layers.0.self_attn.q_proj``, ``model.vision_tower.encoder.layers.0.mlp.fc1`` for
Gemma3ForConditionalGeneration, ``model.layers.0.mlp.up_proj`` for Gemma3ForCausalLM. Those names come from
the bridge's table (see ``lora.hf_module_layout``). Our adapters are already per HF projection, so their
tensors go out as they are. ``adapter_config.json`` is written by peft's own ``LoraConfig``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from gemma3vl.bridge.fsutil import staged_output
from gemma3vl.errors import Gemma3VLError
from gemma3vl.train.lora import LoraAdapter, LoraConfig, adaptable_sites, lora_modules

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _adapted(model) -> list[tuple[str, LoraAdapter]]:
    """(HF module name, adapter) for every adapter of ``model``, in module order."""
    pairs = [
        (hf_module, module.adapters[name])
        for _, module in lora_modules(model)
        for name, hf_module in zip(module.projections, module.hf_modules)
        if name in module.adapters
    ]
    if not pairs:
        raise Gemma3VLError("this model has no LoRA adapters (apply_lora first)")
    return pairs


def peft_named_parameters(model) -> dict[str, nn.Parameter]:
    """The adapter Parameters themselves under the keys PEFT saves them with (see the module docstring);
    live, so that tests and tools can line up values and gradients with a PeftModel's."""
    params = {}
    for hf_module, adapter in _adapted(model):
        key = PEFT_PREFIX + hf_module
        params[f"{key}.lora_A.weight"] = adapter.lora_A.weight
        params[f"{key}.lora_B.weight"] = adapter.lora_B.weight
        if adapter.magnitude is not None:
            params[f"{key}.lora_magnitude_vector"] = adapter.magnitude
    return params


def peft_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter tensors (detached) under the keys PEFT saves for transformers' Gemma 3."""
    return {key: param.detach() for key, param in peft_named_parameters(model).items()}


def peft_target_modules(model) -> str:
    """PEFT's ``target_modules`` for the adapted modules, as a regex (PEFT full-matches a string against
    module names). Not the usual list of suffixes: transformers' SigLIP tower has ``q_proj``/``k_proj``/
    ``v_proj`` too, and a suffix list would put adapters on the vision tower whenever the text has them."""
    adapted = {hf_module for hf_module, _ in _adapted(model)}
    patterns = set()
    for name in adapted:
        head, index, tail = re.fullmatch(r"(.*\.layers\.)(\d+)(\..*)", name).groups()
        patterns.add(re.escape(head) + r"\d+" + re.escape(tail))
    regex = "|".join(sorted(patterns))
    # The layer index is generalised; that is exact only because apply_lora adapts every layer alike.
    every_module = {m for site in adaptable_sites(model.config) for m in site.hf_modules}
    matched = {m for m in every_module if re.fullmatch(regex, m)}
    if matched != adapted:
        raise Gemma3VLError(f"the adapters cannot be described by layer-independent target_modules ({regex})")
    return regex


def _architecture(model) -> type:
    from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration if model.config.is_vision_language else Gemma3ForCausalLM


def peft_lora_config(model, lora_config: LoraConfig, base_model_name_or_path: str | None = None):
    """``peft.LoraConfig`` describing ``model``'s adapters, so that peft writes (and later reads) its own
    ``adapter_config.json``. Checks that ``lora_config`` is what the adapters were built with."""
    try:
        import peft
    except ImportError:
        raise Gemma3VLError("writing a PEFT adapter needs the peft package (pip install peft)") from None
    for hf_module, adapter in _adapted(model):
        built = (adapter.lora_A.weight.shape[0], adapter.scaling, adapter.magnitude is not None)
        asked = (lora_config.rank, lora_config.scaling, lora_config.use_dora)
        if built != asked:
            raise Gemma3VLError(
                f"{hf_module}: the adapter has rank {built[0]}, scaling {built[1]:g}, DoRA {built[2]}, but the "
                f"LoraConfig says rank {asked[0]}, scaling {asked[1]:g}, DoRA {asked[2]}"
            )
    return peft.LoraConfig(
        r=lora_config.rank,
        lora_alpha=lora_config.alpha,
        lora_dropout=lora_config.dropout,
        use_dora=lora_config.use_dora,
        use_rslora=False,
        target_modules=peft_target_modules(model),
        bias="none",
        init_lora_weights=True,
        inference_mode=True,  # as PeftModel.save_pretrained writes it
        base_model_name_or_path=base_model_name_or_path,
    )


def write_peft_adapter(
    model,
    lora_config: LoraConfig,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for
    ``peft.PeftModel.from_pretrained(transformers_model, out_dir)``. The directory appears under its name
    only once complete (written in a temporary sibling, then renamed)."""
    out_dir = Path(out_dir)
    peft_config = peft_lora_config(model, lora_config, base_model_name_or_path)
    architecture = _architecture(model)
    # What PeftModel.save_pretrained adds when task_type is None (AutoPeftModel reads it).
    auto_mapping = {"base_model_class": architecture.__name__, "parent_library": architecture.__module__}
    tensors = {key: tensor.cpu().contiguous() for key, tensor in peft_state_dict(model).items()}
    with staged_output(out_dir, overwrite) as staging:
        peft_config.save_pretrained(str(staging), auto_mapping_dict=auto_mapping)
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out_dir
