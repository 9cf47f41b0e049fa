"""LoRA / DoRA on our model without peft: parameter names and freezing, counts, gradients, merge, errors.
Numerical agreement with peft itself is in test_lora_peft.py; here the oracle of each test is named in it
(transformers' model for logits, or the defining property of LoRA being checked)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gemma3vl import verify
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.loading import load_model
from gemma3vl.model.layers import FusedLinear
from gemma3vl.train.lora import (
    LoraConfig, LoraLinear, apply_lora, count_parameters, lora_modules, merge_lora, parameter_summary,
)

CPU = torch.device("cpu")


def logits(model, batch):
    return model(batch["input_ids"], batch.get("pixel_values"), attention_mask=batch["attention_mask"])


def rel_diff(expected: torch.Tensor, got: torch.Tensor) -> float:
    return float((expected - got).abs().max() / expected.abs().max())


@pytest.fixture
def tiny(hf_checkpoint):
    """Factory: our model loaded from a tiny random transformers checkpoint, and its config."""

    def make(text_only: bool = False):
        directory, reference = hf_checkpoint(text_only=text_only)
        return load_model(directory, device=CPU, dtype=torch.float32)

    return make


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_names_kept_base_frozen_and_counts(tiny, use_dora, capsys):
    """Oracle: the base model's own state dict and the LoRA parameter formula r * (in + out) (+ out for the
    DoRA magnitude) per HF projection."""
    model, config = tiny()
    before = {name: param for name, param in model.named_parameters()}
    lora = LoraConfig(rank=4, alpha=8, use_dora=use_dora, include_vision=True)
    apply_lora(model, lora)
    after = dict(model.named_parameters())
    # every base parameter is still there, under its name, the same tensor, frozen
    for name, param in before.items():
        assert after[name] is param and not param.requires_grad, name
    assert "text.layers.3.attn.qkv.weight" in after and "vision.layers.1.attn.qkv.bias" in after
    adapter_names = set(after) - set(before)
    assert all(after[n].requires_grad for n in adapter_names)
    assert "text.layers.0.attn.qkv.adapters.k_proj.lora_A.weight" in adapter_names

    t, v = config.text, config.vision
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    d, i = t.hidden_size, t.intermediate_size
    text_shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]  # (in, out) of q k v o gate up down
    dv, iv = v.hidden_size, v.intermediate_size
    vision_shapes = [(dv, dv)] * 4 + [(dv, iv), (iv, dv)]  # q k v out fc1 fc2

    def per_layer(shapes):
        return sum(4 * (fan_in + fan_out) + (fan_out if use_dora else 0) for fan_in, fan_out in shapes)

    expected = t.num_hidden_layers * per_layer(text_shapes) + v.num_hidden_layers * per_layer(vision_shapes)
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert total == sum(p.numel() for p in before.values()) + expected
    summary = parameter_summary(model)
    print(summary)
    assert summary == f"trainable: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)"
    assert summary in capsys.readouterr().out


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@torch.no_grad()
def test_fresh_adapters_leave_the_model_unchanged(hf_checkpoint, use_dora):
    """Oracle: transformers' model without adapters. Fresh adapters (B = 0, m = ||W||, as peft inits them)
    give the base model's logits."""
    directory, reference = hf_checkpoint()
    model, config = load_model(directory, device=CPU, dtype=torch.float32)
    apply_lora(model, LoraConfig(rank=4, alpha=8, use_dora=use_dora, include_vision=True))
    batch = verify.synthetic_batch(config)
    valid = batch["attention_mask"].bool()
    expected = verify.reference_logits(reference, batch, config)[valid]
    assert rel_diff(expected, logits(model, batch)[valid]) <= 1e-5
    for _, module in lora_modules(model):
        for adapter in module.adapters.values():
            assert torch.count_nonzero(adapter.lora_B.weight) == 0
            assert torch.count_nonzero(adapter.lora_A.weight) == adapter.lora_A.weight.numel()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_gradients_reach_adapters_only(tiny, use_dora):
    """Oracle: LoRA's definition. With B = 0 the first backward gives B (and DoRA's m) a gradient and A
    exactly none; after one optimiser step A gets one too; base weights never do and never change."""
    model, config = tiny(text_only=True)
    apply_lora(model, LoraConfig(rank=4, alpha=8, use_dora=use_dora))
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=0.1)
    batch = verify.synthetic_batch(config)
    adapters = [a for _, m in lora_modules(model) for a in m.adapters.values()]
    a_before = [a.lora_A.weight.detach().clone() for a in adapters]

    def step():
        optimiser.zero_grad()
        out = logits(model, batch)
        nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten()).backward()

    step()
    for adapter in adapters:
        assert adapter.lora_B.weight.grad.abs().max() > 0
        assert torch.count_nonzero(adapter.lora_A.weight.grad) == 0
        if use_dora:
            assert adapter.magnitude.grad.abs().max() > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    optimiser.step()
    step()
    for adapter in adapters:
        assert adapter.lora_A.weight.grad.abs().max() > 0
    optimiser.step()
    for adapter, before in zip(adapters, a_before):
        assert not torch.equal(adapter.lora_A.weight, before)
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@torch.no_grad()
def test_merge_restores_plain_model_with_same_logits(tiny, use_dora):
    """Oracle: the adapted model itself (and the untouched state dict names of the base model). peft's own
    merge is compared in test_lora_peft.py."""
    model, config = tiny()
    names = list(model.state_dict())
    weight = model.text.layers[1].attn.qkv.weight
    apply_lora(model, LoraConfig(rank=4, alpha=8, use_dora=use_dora, include_vision=True))
    generator = torch.Generator().manual_seed(0)
    for _, module in lora_modules(model):
        for adapter in module.adapters.values():
            adapter.lora_B.weight.copy_(torch.randn(adapter.lora_B.weight.shape, generator=generator) * 0.1)
    batch = verify.synthetic_batch(config)
    adapted = logits(model, batch)
    before = weight.detach().clone()
    merge_lora(model)
    assert list(model.state_dict()) == names
    assert model.text.layers[1].attn.qkv.weight is weight and not torch.equal(weight, before)
    assert type(model.text.layers[1].attn.qkv) is FusedLinear
    assert type(model.vision.layers[0].mlp.fc1) is nn.Linear
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert rel_diff(adapted, logits(model, batch)) <= 1e-5


def test_config_and_target_errors(tiny):
    """Oracle: the bridge's table of projections; bad requests fail before the model is touched."""
    with pytest.raises(Gemma3VLError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(Gemma3VLError, match="dropout"):
        LoraConfig(dropout=1.0)
    assert LoraConfig(targets=["q_proj"]).targets == ("q_proj",)
    # a string is a comma list, as peft.targets=q_proj,v_proj on the command line (not its letters)
    assert LoraConfig(targets="q_proj, v_proj", vision_targets="fc1").targets == ("q_proj", "v_proj")
    assert LoraConfig(vision_targets="fc1").vision_targets == ("fc1",)
    # a non-finite alpha would make every adapter output inf * 0 = NaN (and a merged export of NaNs)
    for alpha in (float("inf"), float("nan"), "16", True, None):
        with pytest.raises(Gemma3VLError, match="alpha must be a finite number"):
            LoraConfig(alpha=alpha)
    assert LoraConfig(rank=2, alpha=-1.5).scaling == -0.75  # peft takes any finite alpha
    model, _ = tiny()
    with pytest.raises(Gemma3VLError, match="unknown text LoRA target.*qkv_proj"):
        apply_lora(model, LoraConfig(targets=("qkv_proj",)))
    with pytest.raises(Gemma3VLError, match="unknown vision LoRA target.*o_proj"):
        apply_lora(model, LoraConfig(include_vision=True, vision_targets=("o_proj",)))
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())
    apply_lora(model, LoraConfig(targets=("v_proj",)))
    assert [name for name, _ in lora_modules(model)] == [f"text.layers.{i}.attn.qkv" for i in range(4)]
    with pytest.raises(Gemma3VLError, match="already has LoRA"):
        apply_lora(model, LoraConfig())
    text_model, _ = tiny(text_only=True)
    with pytest.raises(Gemma3VLError, match="text-only"):
        apply_lora(text_model, LoraConfig(include_vision=True))


def test_adapter_export_refuses_a_non_empty_directory(tiny, tmp_path):
    """Oracle: the directory contract shared with the bridge (nothing overwritten unless asked)."""
    pytest.importorskip("peft")
    from gemma3vl.train.peft_export import write_peft_adapter

    model, _ = tiny(text_only=True)
    lora = LoraConfig(rank=2, alpha=4)
    apply_lora(model, lora)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(Gemma3VLError, match="not empty"):
        write_peft_adapter(model, lora, out)
    assert (out / "keep.txt").exists()
    with pytest.raises(Gemma3VLError, match="rank 2.*rank 3"):
        write_peft_adapter(model, LoraConfig(rank=3, alpha=4), tmp_path / "other")
    write_peft_adapter(model, lora, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_keeps_adapter_dropout(tiny, mode):
    """Oracle: the same model without activation checkpointing. With peft.dropout > 0 the adapters' gradients must
    not change when blocks are recomputed in backward (the recomputation must see the forward's dropout masks)."""
    from gemma3vl.parallel.activation import apply_activation_checkpointing
    from gemma3vl.train.peft_export import peft_named_parameters

    def gradients(checkpointing: str | None):
        torch.manual_seed(0)
        model, config = tiny(text_only=True)
        apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.3, use_dora=True))
        with torch.no_grad():
            generator = torch.Generator().manual_seed(1)
            for _, module in lora_modules(model):
                for adapter in module.adapters.values():
                    adapter.lora_B.weight.copy_(torch.randn(adapter.lora_B.weight.shape, generator=generator) * 0.1)
        if checkpointing:
            apply_activation_checkpointing(model, checkpointing)
        model.train()
        batch = verify.synthetic_batch(config)
        torch.manual_seed(3)
        logits(model, batch).pow(2).mean().backward()
        return {key: param.grad for key, param in peft_named_parameters(model).items()}

    expected, got = gradients(None), gradients(mode)
    for key, grad in expected.items():
        assert rel_diff(grad, got[key]) <= 1e-5, key
