"""Checkpoint variants users point the bridge and the loaders at: other writers' key names, dtypes, config
forms, look-alike models, and directories that are not models at all.

The oracle is transformers itself: it writes (or loads) the same files, and its logits, parameters and parsed
config are what ours must equal. Where transformers refuses or we refuse, the error must name the file, key
or setting. Tiny models only.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma3vl import bridge, verify
from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.loading import load_model
from gemma3vl.tiny import tiny_hf_config

from conftest import build_reference

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------------ helpers
def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def write_checkpoint(directory: Path, config: dict, weights: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def transformers_logits(directory: Path) -> tuple[torch.Tensor, dict, dict]:
    """transformers' own logits for the directory on verify's synthetic batch, and its loading info."""
    config = bridge.read_config(directory)
    cls = (transformers.Gemma3ForConditionalGeneration if config.is_vision_language
           else transformers.Gemma3ForCausalLM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(str(directory), dtype=torch.float32, attn_implementation="sdpa",
                                          output_loading_info=True)
    batch = verify.synthetic_batch(config)
    return verify.reference_logits(model.eval(), batch, config), batch, info


def assert_same_logits_as_transformers(directory: Path) -> None:
    expected, batch, info = transformers_logits(directory)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours, _ = load_model(directory, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        got = ours(batch["input_ids"], batch.get("pixel_values"), attention_mask=batch["attention_mask"])
    valid = batch["attention_mask"].bool()
    assert (expected[valid] - got[valid]).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------------ layouts
def test_transformers4_state_dict_names_load_and_round_trip(tmp_path):
    """transformers (the oracle) 4.52-4.57 keep SigLIP's ``vision_model.`` in memory, so their full state dicts
    (accelerate, FSDP, DeepSpeed) hold ``model.vision_tower.vision_model.*`` beside ``model.language_model.*``
    and ``lm_head.weight``. transformers 5 loads that; so must we: same logits, a source export in the names
    4.5x save_pretrained writes (hub), and the file itself back byte for byte on request."""
    raw = tiny_hf_config()
    model = build_reference(raw)
    state = {k.replace("model.vision_tower.", "model.vision_tower.vision_model."): v.clone()
             for k, v in model.state_dict().items()}
    source = write_checkpoint(tmp_path / "hf", raw, state)
    assert_same_logits_as_transformers(source)

    native = bridge.import_checkpoint(source, tmp_path / "native", progress=False)
    assert json.loads((native / "gemma3vl.json").read_text())["source"]["layout"] == "memory4"
    exported = bridge.export_checkpoint(native, tmp_path / "out", progress=False)
    config = bridge.read_config(source)
    assert set(tensors(exported)) == set(bridge.hf_tensor_specs(config, "hub", lm_head=True))
    assert_same_logits_as_transformers(exported)
    again = bridge.export_checkpoint(native, tmp_path / "again", layout="memory4", progress=False)
    assert filecmp.cmp(source / "model.safetensors", again / "model.safetensors", shallow=False)


def test_vision_language_tie_follows_the_top_level_flag(tmp_path):
    """transformers (the oracle) ties a VL model's output matrix by the top-level ``tie_word_embeddings`` and
    saves no lm_head even when text_config says false; our model must then be tied too, not ask for a head."""
    raw = tiny_hf_config()
    raw["text_config"]["tie_word_embeddings"] = False
    source = tmp_path / "hf"
    build_reference(raw).save_pretrained(source)
    assert not any("lm_head" in k for k in tensors(source))
    assert not bridge.has_untied_head(source)
    assert_same_logits_as_transformers(source)


# ------------------------------------------------------------------------------------------------ configs
def transformers_text_config(directory: Path):
    config = transformers.AutoConfig.from_pretrained(str(directory))
    return getattr(config, "text_config", config)


def skip_unless_transformers_reads_flat_rope() -> None:
    """Older transformers (5.17, the GPU image's) fail in their own RoPE validation on a flat ``rope_parameters``
    beside ``layer_types``: there the oracle has no answer for these forms."""
    import transformers
    from transformers import Gemma3TextConfig

    try:
        Gemma3TextConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    except Exception as exc:  # (the probe: whatever the older version raises)
        pytest.skip(f"transformers {transformers.__version__} cannot read a flat rope_parameters ({exc})")


@pytest.mark.parametrize("case", ["nested-without-thetas", "nested-and-legacy-scaling", "only-private-pattern",
                                  "flat-default"])
def test_config_variants_parse_as_transformers_does(tmp_path, case):
    """transformers (the oracle) parses these text_config forms; our layer types and RoPE tables must be its.

    nested-without-thetas: per-layer-type rope_parameters that leave rope_theta out, beside the legacy
    rope_theta / rope_local_base_freq (transformers fills the entries from those); nested-and-legacy-scaling:
    per-layer-type entries beside a legacy rope_scaling (merged into the global entry). only-private-pattern: a
    ``_sliding_window_pattern`` (which transformers writes but never reads) and no layer_types: pattern 6.
    flat-default: a flat rope_parameters (transformers ignores it) that says what transformers takes anyway."""
    raw = tiny_hf_config()
    text = raw["text_config"]
    for key in ("sliding_window_pattern", "rope_scaling"):
        text.pop(key)
    if case == "nested-without-thetas":
        text.update(layer_types=["sliding_attention", "full_attention"] * 2, rope_theta=500_000.0,
                    rope_local_base_freq=20_000.0,
                    rope_parameters={"sliding_attention": {"rope_type": "default"},
                                     "full_attention": {"rope_type": "linear", "factor": 8.0}})
    elif case == "nested-and-legacy-scaling":
        text.update(layer_types=["sliding_attention", "full_attention"] * 2,
                    rope_scaling={"rope_type": "linear", "factor": 4.0},
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                     "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}})
    elif case == "flat-default":
        skip_unless_transformers_reads_flat_rope()
        text.update(layer_types=["sliding_attention", "full_attention"] * 2,
                    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    else:
        text.update(_sliding_window_pattern=2, num_hidden_layers=7)
    form = json.dumps(raw, indent=2)  # before transformers fills the nested dicts in place
    source = tmp_path / "hf"
    build_reference(raw).save_pretrained(source)
    (source / "config.json").write_text(form)  # the form under test, as a file has it

    theirs = transformers_text_config(source)
    ours = bridge.read_config(source).text
    assert list(ours.layer_types) == theirs.layer_types
    for kind, rope in (("sliding_attention", ours.rope_local), ("full_attention", ours.rope_global)):
        expected = theirs.rope_parameters[kind]
        assert rope.theta == expected["rope_theta"] and rope.rope_type == expected["rope_type"], kind
        assert rope.factor == expected.get("factor", 1.0), kind
    if case == "nested-without-thetas":  # same weights, same config: same logits
        assert_same_logits_as_transformers(source)


@pytest.mark.parametrize("flat", [{"rope_type": "linear", "factor": 8.0},
                                  {"rope_type": "default", "rope_theta": 500_000.0}])
def test_flat_rope_parameters_that_transformers_would_ignore_are_refused(tmp_path, flat):
    """transformers (the oracle) reads only per-layer-type rope_parameters for Gemma 3 and ignores a flat dict
    (no scaling, thetas from the legacy keys): a flat dict that says otherwise is one clear error, not a model
    whose logits part from transformers'."""
    skip_unless_transformers_reads_flat_rope()
    raw = tiny_hf_config()
    text = raw["text_config"]
    for key in ("sliding_window_pattern", "rope_scaling"):
        text.pop(key)
    text.update(layer_types=["sliding_attention", "full_attention"] * 2, rope_parameters=flat)
    source = tmp_path / "hf"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(raw, indent=2))
    theirs = transformers_text_config(source)
    assert theirs.rope_parameters["full_attention"] == {"rope_type": "default", "rope_theta": 1_000_000.0}
    with pytest.raises(Gemma3VLError, match="rope_parameters .* is flat; Gemma 3 needs one entry per layer type"):
        bridge.read_config(source)


LOOK_ALIKES = {
    # Gemma 3 1B style (Gemma3ForCausalLM): rope_scaling null, one KV head, pattern 6, no softcap.
    "text-1b": (True, {"rope_scaling": None, "final_logit_softcapping": None, "sliding_window_pattern": 6,
                       "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 1,
                       "rope_theta": 1_000_000, "rope_local_base_freq": 10_000}, {}),
    # A fully expanded 4.51-style VL config (MedGemma 4B ships one), with transformers 5's "dtype" key.
    "vl-expanded": (False, {"rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "final_logit_softcapping": None,
                            "attn_logit_softcapping": None, "cache_implementation": "hybrid"},
                    {"dtype": "bfloat16"}),
    # Other image settings: a bigger image and more soft tokens per image, no RoPE scaling.
    "vl-image-112": (False, {"rope_scaling": None}, {"mm_tokens_per_image": 16, "vision_config": {"image_size": 112}}),
}


@pytest.mark.parametrize("name", sorted(LOOK_ALIKES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_look_alike_checkpoints_round_trip_and_match_transformers(tmp_path, name, dtype):
    """transformers (the oracle) saves each look-alike in half precision; the round trip is bit for bit and
    our logits are transformers' for the same files."""
    text_only, text_changes, top_changes = LOOK_ALIKES[name]
    raw = tiny_hf_config(text_only=text_only, **({} if text_only else text_changes))
    if text_only:
        raw.update(text_changes)
    for key, value in top_changes.items():
        if isinstance(value, dict):
            raw[key].update(value)
        else:
            raw[key] = value
    if "dtype" in raw:
        del raw["torch_dtype"]
    form = json.dumps(raw, indent=2)  # before transformers fills the nested dicts in place
    source = tmp_path / "hf"
    build_reference(raw).to(dtype).save_pretrained(source)
    (source / "config.json").write_text(form)
    native = bridge.import_checkpoint(source, tmp_path / "native", progress=False)
    exported = bridge.export_checkpoint(native, tmp_path / "out", progress=False)
    assert filecmp.cmp(source / "model.safetensors", exported / "model.safetensors", shallow=False)
    assert (exported / "config.json").read_bytes() == (source / "config.json").read_bytes()
    assert_same_logits_as_transformers(source)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.fixture
def tiny_source(tmp_path) -> Path:
    source = tmp_path / "source"
    bridge.write_random_hf_checkpoint(tiny_hf_config(), source, dtype=torch.float32)
    return source


def refused(directory: Path, tmp_path: Path) -> str:
    """The error both the converter and the loader give, checked to be the same and to write nothing."""
    with pytest.raises(Gemma3VLError) as converting:
        bridge.import_checkpoint(directory, tmp_path / "native", progress=False)
    assert not (tmp_path / "native").exists()
    with pytest.raises(Gemma3VLError) as loading:
        load_model(directory, device="cpu", dtype=torch.float32)
    assert str(converting.value) == str(loading.value)
    return str(converting.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_a_weight_that_is_not_floating_point_is_refused(tiny_source, tmp_path, dtype):
    # Casting an integer or boolean tensor into a float parameter gives garbage without a word.
    weights = tensors(tiny_source)
    key = "language_model.model.norm.weight"
    weights[key] = weights[key].to(dtype)
    (tiny_source / "model.safetensors").unlink()
    save_file(weights, tiny_source / "model.safetensors", metadata={"format": "pt"})
    message = refused(tiny_source, tmp_path)
    name = {torch.int64: "I64", torch.bool: "BOOL", torch.uint8: "U8"}[dtype]
    assert f"model.safetensors: tensor '{key}' has dtype {name}, expected a floating-point dtype" in message


@pytest.mark.parametrize("key,method", [("quantization_config", "bitsandbytes"), ("quantization_config", "fp8"),
                                        ("compression_config", "compressed-tensors")])
def test_a_quantized_checkpoint_is_refused_by_its_config(tiny_source, tmp_path, key, method):
    config = json.loads((tiny_source / "config.json").read_text())
    config[key] = {"quant_method": method}
    (tiny_source / "config.json").write_text(json.dumps(config))
    message = refused(tiny_source, tmp_path)
    assert f"config.json: {key} is set (quant_method {method!r}): quantized checkpoints are not supported" in message


def test_a_peft_adapter_directory_is_named_as_such(tiny_source, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                              "base_model_name_or_path": "google/gemma-3-4b-it"}))
    save_file({"base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)},
              adapter / "adapter_model.safetensors")
    message = refused(adapter, tmp_path)
    assert "this is a PEFT adapter (adapter_config.json, base model 'google/gemma-3-4b-it')" in message
    # A trainer's output directory with the base's config.json beside the adapter: still named.
    shutil.copy(tiny_source / "config.json", adapter / "config.json")
    assert "adapter_config.json is here: this is a PEFT adapter, not a model" in refused(adapter, tmp_path)


def test_shards_without_an_index_are_named(tiny_source, tmp_path):
    weights = tensors(tiny_source)
    (tiny_source / "model.safetensors").unlink()
    keys = sorted(weights)
    for i, part in enumerate((keys[:40], keys[40:])):
        save_file({k: weights[k] for k in part}, tiny_source / f"model-0000{i + 1}-of-00002.safetensors")
    message = refused(tiny_source, tmp_path)
    assert "found model-00001-of-00002.safetensors, model-00002-of-00002.safetensors but no " \
           "model.safetensors.index.json" in message


def test_look_alike_architectures_are_refused_by_name(tiny_source, tmp_path):
    # ShieldGemma 2 wraps the same Gemma 3 model in an image classifier with a model_type of its own.
    config = json.loads((tiny_source / "config.json").read_text())
    config.update(model_type="shieldgemma2", architectures=["ShieldGemma2ForImageClassification"])
    (tiny_source / "config.json").write_text(json.dumps(config))
    message = refused(tiny_source, tmp_path)
    assert "model_type='shieldgemma2' is not a Gemma 3 checkpoint (architectures " \
           "ShieldGemma2ForImageClassification; expected 'gemma3'" in message
    with pytest.raises(Gemma3VLError, match="model_type='gemma3n' is not a Gemma 3 checkpoint"):
        Gemma3Config.from_hf_dict({"model_type": "gemma3n"})


def test_a_siglip_pooling_head_is_kept_frozen_and_never_run(tmp_path):
    """A Gemma 3 config whose vision_config leaves ``vision_use_head`` out (transformers' default: true, as a
    ``Gemma3Config(vision_config={...})`` built by hand has it) stores SigLIP's pooling head, which Gemma 3 never
    runs. Oracle: transformers' logits on such a checkpoint; the head's tensors come back bit for bit."""
    raw = tiny_hf_config()
    del raw["vision_config"]["vision_use_head"]
    source = tmp_path / "hf"
    build_reference(raw, 0).save_pretrained(source)
    assert any(".head.probe" in key for key in tensors(source))
    assert_same_logits_as_transformers(source)
    model, config = load_model(source, device="cpu", dtype=torch.float32)
    assert config.vision.use_head
    head = dict(model.vision.head.named_parameters())
    assert len(head) == 11 and not any(p.requires_grad for p in head.values())  # frozen: nothing trains it
    bridge.import_checkpoint(source, tmp_path / "native", progress=False)
    bridge.export_checkpoint(tmp_path / "native", tmp_path / "back", progress=False)
    assert filecmp.cmp(source / "model.safetensors", tmp_path / "back" / "model.safetensors", shallow=False)
