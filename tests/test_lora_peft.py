"""LoRA / DoRA against HF PEFT. The oracle is peft 0.21.2 itself (PeftModel.from_pretrained on transformers'
Gemma3ForConditionalGeneration / Gemma3ForCausalLM, tiny random models with every weight random): our fused
model with the adapter, the adapter directory we write, and our merge must all agree with it."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

from gemma3vl import verify  # noqa: E402
from gemma3vl.bridge.layouts import get_layout  # noqa: E402
from gemma3vl.bridge.mapping import build_mappings  # noqa: E402
from gemma3vl.infer.loading import load_model  # noqa: E402
from gemma3vl.model.layers import FusedLinear  # noqa: E402
from gemma3vl.train.lora import LoraConfig, apply_lora, hf_module_layout, lora_modules, merge_lora  # noqa: E402
from gemma3vl.train.peft_export import (  # noqa: E402
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_named_parameters, peft_state_dict, write_peft_adapter,
)

CPU = torch.device("cpu")
GQA3 = {"num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 72}  # 3 query heads per KV group


def rel_diff(expected: torch.Tensor, got: torch.Tensor) -> float:
    return float(((expected - got).abs().max() / expected.abs().max()).detach())


def randomise_adapters(model, seed: int = 1) -> None:
    """Fresh adapters are a no-op (B = 0, m = ||W||); give B and m values so every adapter shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in lora_modules(model):
            for adapter in module.adapters.values():
                b = adapter.lora_B.weight
                b.copy_(torch.randn(b.shape, generator=generator) * 0.1)
                if adapter.magnitude is not None:
                    m = adapter.magnitude
                    m.mul_(1 + 0.2 * torch.randn(m.shape, generator=generator))


def setup(hf_checkpoint, tmp_path, lora: LoraConfig, text_only: bool = False, **overrides):
    """Our model with randomised adapters, the adapter written, and peft's model loaded from it."""
    directory, reference = hf_checkpoint(text_only=text_only, **overrides)
    ours, config = load_model(directory, device=CPU, dtype=torch.float32)
    apply_lora(ours, lora)
    randomise_adapters(ours)
    adapter_dir = write_peft_adapter(ours, lora, tmp_path / "adapter", str(directory))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(reference, adapter_dir, is_trainable=True)
    return ours, peft_model.eval(), config, adapter_dir


def hf_logits(model, batch, config):
    """transformers' logits as verify.reference_logits asks for them, but with autograd available."""
    mask = batch["attention_mask"]
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    if config.is_vision_language:
        kwargs["token_type_ids"] = (batch["input_ids"] == config.image_token_id).long()
        kwargs["pixel_values"] = batch["pixel_values"]
    return model(**kwargs).logits


def logits_pair(ours, peft_model, config, batch):
    expected = hf_logits(peft_model, batch, config)
    got = ours(batch["input_ids"], batch.get("pixel_values"), attention_mask=batch["attention_mask"])
    valid = batch["attention_mask"].bool()
    return expected[valid], got[valid]


def peft_key(name: str) -> str:
    """A PeftModel parameter name -> the key peft saves it under (drops the adapter name)."""
    name = name.replace(".default", "")
    return name.removesuffix(".weight") if name.endswith("lora_magnitude_vector.weight") else name


CASES = {
    "lora": (LoraConfig(rank=4, alpha=8), {}),
    "dora": (LoraConfig(rank=4, alpha=8, use_dora=True), {}),
    "lora-vision": (LoraConfig(rank=4, alpha=6, include_vision=True), {}),
    "dora-vision": (LoraConfig(rank=3, alpha=8, use_dora=True, include_vision=True), {}),
    # some parts of the fused QKV / gate-up without an adapter, and 3 query heads per group
    "dora-partial-gqa3": (
        LoraConfig(rank=4, alpha=8, use_dora=True, targets=("q_proj", "v_proj", "up_proj", "o_proj"),
                   include_vision=True, vision_targets=("k_proj", "fc2")),
        GQA3,
    ),
    "text-only-lora": (LoraConfig(rank=4, alpha=8), {"text_only": True}),
    "text-only-dora": (LoraConfig(rank=4, alpha=8, use_dora=True), {"text_only": True}),
}


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_adapter_logits_and_keys_match_peft(hf_checkpoint, tmp_path, case):
    """Oracle: peft. Our model with the adapter = PeftModel.from_pretrained(transformers model, our adapter
    dir), and peft holds exactly the tensors we wrote, under exactly our keys (none missing or extra)."""
    lora, overrides = CASES[case]
    ours, peft_model, config, _ = setup(hf_checkpoint, tmp_path, lora, **overrides)
    batch = verify.synthetic_batch(config)
    expected, got = logits_pair(ours, peft_model, config, batch)
    assert rel_diff(expected, got) <= 1e-5
    with peft_model.disable_adapter():  # the adapter really changes the answer
        base, _ = logits_pair(ours, peft_model, config, batch)
    assert rel_diff(expected, base) > 1e-2

    held = peft.get_peft_model_state_dict(peft_model)
    ours_state = peft_state_dict(ours)
    assert set(held) == set(ours_state)
    for key, tensor in ours_state.items():
        assert torch.equal(held[key], tensor), key
    # peft put adapters on exactly the modules we adapted: the vision tower only when asked
    wrapped = {name for name, module in peft_model.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)}
    assert {"base_model.model." + m for _, w in lora_modules(ours) for m, p in zip(w.hf_modules, w.projections)
            if p in w.adapters} == wrapped
    assert any("vision_tower" in name for name in wrapped) == lora.include_vision


@pytest.mark.parametrize("text_only", [False, True], ids=["vl", "text-only"])
def test_peft_key_names_as_peft_writes_them(hf_checkpoint, tmp_path, text_only):
    """Oracle: peft's own save_pretrained on transformers' model with the same targets (no file of ours
    involved) writes the key names and shapes our adapter file has, DoRA magnitudes included."""
    from safetensors.torch import load_file

    directory, reference = hf_checkpoint(text_only=text_only)
    ours, _ = load_model(directory, device=CPU, dtype=torch.float32)
    # Every text projection, and on the VL model every vision one: then peft's plain suffix list (which
    # matches q/k/v in both towers) targets exactly the same modules.
    lora = LoraConfig(rank=4, alpha=8, use_dora=True, include_vision=not text_only)
    apply_lora(ours, lora)
    names = list(lora.targets) + ([] if text_only else list(lora.vision_targets))
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=sorted(set(names)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(reference, peft_config).save_pretrained(tmp_path / "peft")
    theirs = load_file(tmp_path / "peft" / ADAPTER_WEIGHTS)
    written = load_file(write_peft_adapter(ours, lora, tmp_path / "ours") / ADAPTER_WEIGHTS)
    assert {k: tuple(v.shape) for k, v in written.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert any(k.endswith(".lora_magnitude_vector") for k in written)


def test_adapter_config_is_peft_format(hf_checkpoint, tmp_path):
    """Oracle: peft's config loader. The config round-trips through peft.PeftConfig with our values, the
    targets are a regex that keeps the vision tower out, and nothing but the two files is written."""
    lora = LoraConfig(rank=8, alpha=16, dropout=0.1, use_dora=True)
    _, _, _, adapter_dir = setup(hf_checkpoint, tmp_path, lora)
    assert sorted(p.name for p in adapter_dir.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter")) == []
    loaded = peft.PeftConfig.from_pretrained(adapter_dir)
    assert (loaded.r, loaded.lora_alpha, loaded.lora_dropout, loaded.use_dora, loaded.use_rslora) == (
        8, 16, 0.1, True, False)
    assert isinstance(loaded.target_modules, str)
    raw = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    assert raw["auto_mapping"]["base_model_class"] == "Gemma3ForConditionalGeneration"
    assert raw["base_model_name_or_path"]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_training_dropout_and_gradients_match_peft(hf_checkpoint, tmp_path, use_dora):
    """Oracle: peft in training mode. With dropout 0.3 and the same RNG seed the logits agree (so dropout
    hits the adapter input per projection as peft's does, DoRA's recomputed base term included), and one
    backward gives the same gradient for every A, B and magnitude (DoRA's norm detached as peft has it)."""
    lora = LoraConfig(rank=4, alpha=8, dropout=0.3, use_dora=use_dora, include_vision=True)
    ours, peft_model, config, _ = setup(hf_checkpoint, tmp_path, lora)
    ours.train()
    peft_model.train()
    batch = verify.synthetic_batch(config)
    torch.manual_seed(7)
    expected = hf_logits(peft_model, batch, config)
    torch.manual_seed(7)
    got = ours(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"])
    valid = batch["attention_mask"].bool()
    assert rel_diff(expected[valid], got[valid]) <= 1e-5
    torch.manual_seed(8)
    other = ours(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"])
    assert rel_diff(got[valid], other[valid]) > 1e-2  # dropout is really on

    target = torch.randn(expected[valid].shape, generator=torch.Generator().manual_seed(0))
    (expected[valid] * target).sum().backward()
    (got[valid] * target).sum().backward()
    theirs = {peft_key(n): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    mine = {k: p.grad for k, p in peft_named_parameters(ours).items()}
    assert set(theirs) == set(mine)
    for key, grad in mine.items():
        assert grad is not None and grad.abs().max() > 0, key
        assert rel_diff(theirs[key], grad) <= 1e-4, key


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@torch.no_grad()
def test_merge_matches_peft_merge_and_unload(hf_checkpoint, tmp_path, use_dora):
    """Oracle: peft's merge_and_unload. After merge_lora our plain model gives the adapted logits, and its
    weights, split back to HF tensors by the bridge's table, are the weights peft's merge produces."""
    lora = LoraConfig(rank=4, alpha=8, use_dora=use_dora, include_vision=True)
    ours, peft_model, config, _ = setup(hf_checkpoint, tmp_path, lora, **GQA3)
    batch = verify.synthetic_batch(config)
    _, adapted = logits_pair(ours, peft_model, config, batch)
    merge_lora(ours)
    assert not lora_modules(ours)
    assert type(ours.text.layers[0].attn.qkv) is FusedLinear and type(ours.text.layers[0].attn.o) is torch.nn.Linear
    merged_reference = peft_model.merge_and_unload()
    expected, got = logits_pair(ours, merged_reference, config, batch)
    assert rel_diff(adapted, got) <= 1e-5
    assert rel_diff(expected, got) <= 1e-5

    theirs = merged_reference.state_dict()
    native = ours.state_dict()
    for m in build_mappings(config, get_layout(hf_module_layout(config))):
        for key, tensor in zip(m.hf, m.op.to_hf(native[m.native])):
            assert torch.allclose(tensor, theirs[key], rtol=1e-5, atol=1e-6), key


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_convert_merge_into_a_bf16_base_is_peft_merge(hf_checkpoint, tmp_path, use_dora):
    """Oracle: peft's merge_and_unload on transformers' bf16 model (tiny, random), with our adapter directory. peft
    merges the float32 adapter into each bf16 weight rounding once; `gemma3vl convert merge` must give the same bf16
    tensors, bit for bit (as the hub models are bf16, this is the merge users run)."""
    from transformers import Gemma3ForConditionalGeneration

    from gemma3vl.cli import main

    directory, reference = hf_checkpoint(dtype=torch.bfloat16)
    ours, _ = load_model(directory, device=CPU, dtype=torch.float32)  # as training holds it: float32 master weights
    lora = LoraConfig(rank=4, alpha=8, use_dora=use_dora, include_vision=True)
    apply_lora(ours, lora)
    randomise_adapters(ours)
    adapter_dir = write_peft_adapter(ours, lora, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft.PeftModel.from_pretrained(reference, adapter_dir).merge_and_unload().state_dict()
    assert main(["convert", "merge", str(directory), str(adapter_dir), str(tmp_path / "merged")]) == 0
    got = Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).state_dict()
    assert got.keys() == expected.keys()
    differ = [key for key, tensor in expected.items() if not torch.equal(got[key], tensor)]
    assert not differ, f"{len(differ)} tensors differ from peft's merge, e.g. {differ[0]}"


@torch.no_grad()
def test_peft_adapter_on_some_layers_loads_as_peft(hf_checkpoint, tmp_path):
    """Oracle: peft itself. An adapter made by peft (get_peft_model on transformers' tiny random model, B drawn,
    save_pretrained) on only some layers, by a target regex and by exclude_modules, loads into our model with the
    logits of PeftModel.from_pretrained."""
    from gemma3vl.evaluation.loading import load_peft_adapter

    directory, reference = hf_checkpoint()
    config = peft.LoraConfig(r=4, lora_alpha=6, use_dora=True,
                             target_modules=r".*language_model\.layers\.(1|3)\.self_attn\.(q|v)_proj|.*\.fc1",
                             exclude_modules=["vision_tower.encoder.layers.0.mlp.fc1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = peft.get_peft_model(reference, config)
    generator = torch.Generator().manual_seed(0)
    for name, param in made.named_parameters():
        if "lora_B" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    made.save_pretrained(tmp_path / "adapter")
    peft_model = made.eval()

    ours, model_config = load_model(directory, device=CPU, dtype=torch.float32)
    load_peft_adapter(ours, tmp_path / "adapter", merge=False)
    batch = verify.synthetic_batch(model_config)
    expected, got = logits_pair(ours, peft_model, model_config, batch)
    assert rel_diff(expected, got) <= 1e-5
    adapted = {m for _, w in lora_modules(ours) for m, p in zip(w.hf_modules, w.projections) if p in w.adapters}
    assert len(adapted) == 2 * 2 + 1  # q and v of layers 1 and 3; fc1 of vision layer 1
