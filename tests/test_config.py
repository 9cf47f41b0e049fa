"""Config parsing in both HF forms. The oracle is transformers' own config classes (Gemma3Config)."""

import json
from pathlib import Path

import pytest
from transformers import Gemma3Config as HFGemma3Config

from gemma3vl.config import FULL, SLIDING, Gemma3Config
from gemma3vl.errors import Gemma3VLError
from gemma3vl.tiny import tiny_hf_config

PRESETS = Path(__file__).resolve().parents[1] / "src" / "gemma3vl" / "presets"
SIZES = ["4b", "12b", "27b"]


def preset(size: str) -> dict:
    return json.loads((PRESETS / f"gemma-3-{size}-it.json").read_text())


@pytest.mark.parametrize("size", SIZES)
def test_hub_configs_match_transformers(size):
    raw = preset(size)
    ours = Gemma3Config.from_hf_dict(raw)
    reference = HFGemma3Config(**raw).text_config
    assert ours.source_form == "legacy"
    assert list(ours.text.layer_types) == reference.layer_types
    assert ours.text.head_dim == reference.head_dim
    assert ours.text.num_attention_heads == reference.num_attention_heads
    assert ours.text.num_key_value_heads == reference.num_key_value_heads
    assert ours.text.query_pre_attn_scalar == reference.query_pre_attn_scalar
    assert ours.text.vocab_size == reference.vocab_size
    rope = reference.rope_parameters
    assert ours.text.rope_global.theta == rope[FULL]["rope_theta"]
    assert ours.text.rope_global.factor == rope[FULL]["factor"]
    assert ours.text.rope_local.theta == rope[SLIDING]["rope_theta"]
    assert ours.text.rope_local.rope_type == "default"


def test_real_shapes():
    c4, c12, c27 = (Gemma3Config.from_hf_dict(preset(s)) for s in SIZES)
    assert (c4.text.num_attention_heads, c4.text.num_key_value_heads, c4.text.head_dim) == (8, 4, 256)
    assert (c12.text.num_attention_heads, c12.text.num_key_value_heads) == (16, 8)
    assert (c27.text.head_dim, c27.text.query_pre_attn_scalar) == (128, 168)
    assert [i for i, t in enumerate(c27.text.layer_types) if t == FULL][-1] == 59
    assert c4.vision.num_patches == 4096 and c4.pool_kernel == 4
    assert c4.stop_token_ids == (1, 106)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("form", ["legacy", "v5"])
def test_round_trip_both_forms(size, form):
    ours = Gemma3Config.from_hf_dict(preset(size))
    written = ours.to_hf_dict(form)
    if form == "v5":
        assert "layer_types" in written["text_config"] and "rope_parameters" in written["text_config"]
        assert "rope_scaling" not in written["text_config"]
    else:
        assert "rope_scaling" in written["text_config"] and "rope_local_base_freq" in written["text_config"]
    again = Gemma3Config.from_hf_dict(written)
    assert again == ours.replace(source_form=form)
    # transformers reads what we write to the same model
    reference = HFGemma3Config(**written).text_config
    assert list(ours.text.layer_types) == reference.layer_types


def test_v5_form_from_transformers_itself():
    written = HFGemma3Config(**preset("27b")).to_dict()
    ours = Gemma3Config.from_hf_dict(written)
    assert ours.source_form == "v5"
    assert ours == Gemma3Config.from_hf_dict(preset("27b")).replace(source_form="v5", torch_dtype=ours.torch_dtype)


def test_text_only_config():
    ours = Gemma3Config.from_hf_dict(tiny_hf_config(text_only=True))
    assert not ours.is_vision_language
    assert ours.text.final_logit_softcapping == 30.0
    assert Gemma3Config.from_hf_dict(ours.to_hf_dict()) == ours


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(model_type="llava"), "model_type='llava'"),
        (lambda c: c["text_config"].update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
        (lambda c: c["text_config"].update(hidden_activation="relu"), "hidden_activation='relu'"),
        (lambda c: c["vision_config"].update(vision_use_head="yes"), "vision_use_head='yes' must be true or false"),
        (lambda c: c["text_config"].update(num_key_value_heads=3), "num_key_value_heads=3"),
        (lambda c: c.update(mm_tokens_per_image=5), "mm_tokens_per_image=5"),
        (lambda c: c["text_config"].update(layer_types=["full_attention"]), "layer_types has 1"),
        (lambda c: c["vision_config"].update(patch_size=15), "patch_size=15"),
        (lambda c: c["vision_config"].update(patch_size=0), "vision_config: patch_size=0 must be >= 1"),
        (lambda c: c["text_config"].update(num_attention_heads=0), "text_config: num_attention_heads=0 must be >= 1"),
        (lambda c: c["text_config"].update(hidden_size="64"), "text_config: hidden_size='64' is not an integer"),
        (lambda c: c["text_config"].update(rope_scaling="linear"), "rope_scaling='linear' must be an object"),
        (lambda c: c["text_config"].update(sliding_window=None), "text_config: sliding_window is null; expected an int"),
        (lambda c: c["text_config"].update(rms_norm_eps=None), "text_config: rms_norm_eps is null; expected a number"),
        (lambda c: c["text_config"].update(hidden_size="wide"), "text_config: hidden_size='wide' is not an integer"),
        (lambda c: c["vision_config"].update(image_size=None), "vision_config: image_size is null"),
        (lambda c: c.update(image_token_index=True), "image_token_index=True is not an integer"),
    ],
)
def test_bad_configs_are_clear_errors(mutate, message):
    raw = tiny_hf_config()
    mutate(raw)
    with pytest.raises(Gemma3VLError, match=message.replace("[", r"\[")):
        Gemma3Config.from_hf_dict(raw)


def test_missing_and_broken_config_file(tmp_path):
    with pytest.raises(Gemma3VLError, match="config.json"):
        Gemma3Config.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(Gemma3VLError, match="not valid JSON"):
        Gemma3Config.from_file(tmp_path)
    from gemma3vl.bridge import read_config  # a model path naming a file, not the checkpoint's directory
    with pytest.raises(Gemma3VLError, match="config.json: a file, not a checkpoint directory"):
        read_config(tmp_path / "config.json")


def test_null_token_ids_mean_unset_as_in_transformers():
    """transformers loads ``"bos_token_id": null`` (and pad, eos) as unset; so do we: the defaults apply."""
    raw = tiny_hf_config()
    raw["eos_token_id"] = None
    raw["text_config"].update(bos_token_id=None, pad_token_id=None, eos_token_id=None)
    HFGemma3Config(**raw)  # the oracle accepts it
    ours = Gemma3Config.from_hf_dict(raw)
    plain = Gemma3Config.from_hf_dict(tiny_hf_config())
    assert ours.text.pad_token_id == 0 and ours.text.bos_token_id == 2
    assert ours.stop_token_ids == (1, 106)
    assert ours.text.hidden_size == plain.text.hidden_size
