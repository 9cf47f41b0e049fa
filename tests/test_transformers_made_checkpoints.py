"""Gemma 3 checkpoints that transformers itself builds, saves and runs, but that are not the hub's: other MLP
activations, a config key transformers keeps but never reads, the soft-token id past the embedding, a bare
``Gemma3TextModel`` save; and the configs transformers cannot run, which must be one clear error naming the key.

transformers is the oracle: it builds each tiny random model, saves it, loads the directory back and computes
the logits (on verify's synthetic batch) that ours must equal; conversion must give the files back byte for
byte. Tiny models, CPU, no network; the whole file takes a few seconds.
"""

from __future__ import annotations

import filecmp
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gemma3vl import bridge, verify
from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.loading import load_model

transformers = pytest.importorskip("transformers")

VOCAB = 96
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=10, sliding_window=6,
            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128)
# transformers' own test tester's SigLIP sizes (image 20, patch 5: 4 patches a side, 4 soft tokens per image).
VISION = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=24, num_hidden_layers=1,
              num_attention_heads=2, image_size=20, patch_size=5, vision_use_head=False)


def randomized(model):
    """Every weight random (transformers zeroes the RMSNorm offsets and the projector, which would hide bugs)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.3 if "norm" in name or "mm_input_projection" in name else 0.1)
    return model.eval()


def saved(model, directory: Path, config_edit=None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory)
    if config_edit is not None:
        raw = json.loads((directory / "config.json").read_text())
        config_edit(raw)
        (directory / "config.json").write_text(json.dumps(raw, indent=2))
    return directory


def assert_transformers_logits(directory: Path, tolerance: float = 1e-5) -> None:
    """Our model of ``directory`` computes transformers' logits for it (as loaded by transformers)."""
    config = bridge.read_config(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = verify.load_reference(directory, config, torch.float32, torch.device("cpu"))
    ours, _ = load_model(directory, device="cpu", dtype=torch.float32)
    report = verify.compare(ours, reference, config, dtype=torch.float32, device=torch.device("cpu"),
                            greedy_tokens=0, text_length=20)
    assert report.max_rel_diff < tolerance, report


def assert_round_trip(source: Path, tmp_path: Path) -> None:
    native = bridge.import_checkpoint(source, tmp_path / f"{source.name}-native", progress=False)
    back = bridge.export_checkpoint(native, tmp_path / f"{source.name}-back", progress=False)
    for name in ("model.safetensors", "config.json"):
        assert filecmp.cmp(source / name, back / name, shallow=False), name


# ------------------------------------------------------------------------------------------------ run alike
def test_gelu_activations_and_a_soft_token_past_the_vocabulary(tmp_path):
    """Text MLP on the exact GELU (``hidden_activation: gelu``, as MaxText's Gemma 3 configs name it), SigLIP on
    ``gelu_new``, and ``image_token_index`` past the embedding (a vocabulary without the soft token's row; transformers
    embeds row 0 for those ids, overwritten by the image): transformers runs all three, so must we, with its logits."""
    config = transformers.Gemma3Config(
        text_config={**TEXT, "hidden_activation": "gelu"}, vision_config={**VISION, "hidden_act": "gelu_new"},
        mm_tokens_per_image=4, image_token_index=VOCAB + 10, boi_token_index=90, eoi_token_index=91)
    source = saved(randomized(transformers.Gemma3ForConditionalGeneration(config)), tmp_path / "vl")
    ours = bridge.read_config(source)
    assert (ours.text.hidden_activation, ours.vision.hidden_act, ours.image_token_id) == ("gelu", "gelu_new", 106)
    assert_transformers_logits(source)
    assert_round_trip(source, tmp_path)


def test_a_bare_text_model_save_with_an_inert_hidden_act(tmp_path):
    """``Gemma3TextModel.save_pretrained`` (``AutoModel`` of a gemma3_text config) writes the decoder's names with no
    prefix and no head; transformers' Gemma3ForCausalLM loads it whole, head tied. Its config.json here also carries
    ``hidden_act: gelu`` without ``hidden_activation``: Gemma3TextConfig keeps that key but never reads it (the MLP
    runs gelu_pytorch_tanh), so reading it would part from transformers by ~3e-4 of the logits."""

    def gemma2_style_activation_key(raw):
        del raw["hidden_activation"]
        raw["hidden_act"] = "gelu"

    config = transformers.Gemma3TextConfig(**TEXT)
    source = saved(randomized(transformers.Gemma3TextModel(config)), tmp_path / "text", gemma2_style_activation_key)
    with safe_open(str(source / "model.safetensors"), "pt") as stored:
        assert "embed_tokens.weight" in stored.keys() and not any(k.startswith("model.") for k in stored.keys())
    theirs = transformers.AutoConfig.from_pretrained(str(source))
    assert bridge.read_config(source).text.hidden_activation == theirs.hidden_activation == "gelu_pytorch_tanh"
    assert_transformers_logits(source)
    assert_round_trip(source, tmp_path)
    assert bridge.detect_layout(["embed_tokens.weight", "layers.0.mlp.up_proj.weight", "norm.weight"], False,
                                "x").name == "textmodel"


def test_a_causal_lm_exports_as_a_bare_text_model_transformers_loads(tmp_path, capsys):
    """``convert export --layout textmodel`` (the command line now takes it, as the Python API did): a
    ``Gemma3ForCausalLM`` checkpoint written as a bare ``Gemma3TextModel`` saves it; the oracle is transformers,
    whose ``Gemma3TextModel`` loaded from the export gives the causal LM's own hidden states."""
    from gemma3vl.cli import main

    causal = randomized(transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**TEXT)))
    source = saved(causal, tmp_path / "causal")
    native = bridge.import_checkpoint(source, tmp_path / "native", progress=False)
    assert main(["convert", "export", str(native), str(tmp_path / "bare"), "--layout", "textmodel"]) == 0
    bare = transformers.Gemma3TextModel.from_pretrained(str(tmp_path / "bare")).eval()
    ids = torch.tensor([[2, 5, 9, 4, 7, 3, 8, 6, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(bare(ids).last_hidden_state, causal.model(ids).last_hidden_state,
                                   rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ refusals
def text_only(**changes) -> dict:
    return {"model_type": "gemma3_text", **TEXT, **changes}


def test_a_partial_rotary_factor_transformers_cannot_run_is_named():
    """A linear RoPE table rotating only part of each head: transformers builds the model but its forward fails
    (cos/sin do not fit the head). We say so at load, naming the key, instead of silently rotating whole heads."""
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6, "partial_rotary_factor": 0.5}}
    raw = text_only(rope_parameters=rope)
    config = {k: v for k, v in raw.items() if k != "model_type"}
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**json.loads(json.dumps(config)))).eval()
    with pytest.raises(RuntimeError):
        model(input_ids=torch.tensor([[5, 6, 7]]))
    with pytest.raises(Gemma3VLError, match=r"rope_parameters.full_attention: partial_rotary_factor=0.5 with "
                                            r"rope_type='linear' is not supported"):
        Gemma3Config.from_hf_dict(raw)
    # On a "default" table transformers' Gemma 3 ignores it, and so do we.
    rope["full_attention"] = {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}
    assert Gemma3Config.from_hf_dict(text_only(rope_parameters=rope)).text.rope_global.rope_type == "default"


def test_configs_transformers_cannot_use_are_one_clear_line():
    """transformers' own test config (image 20, patch 5, ``mm_tokens_per_image: 2``) pools to 1 soft token per image,
    not 2: every processor-built image input fails there; the error says what transformers would make. A null
    ``query_pre_attn_scalar`` fails transformers' config validation; ours names it too (not a TypeError later)."""
    vl = {"model_type": "gemma3", "text_config": text_only(), "vision_config": VISION, "mm_tokens_per_image": 2,
          "image_token_index": 4, "boi_token_index": 5, "eoi_token_index": 6}
    theirs = transformers.Gemma3Config(**json.loads(json.dumps({k: v for k, v in vl.items() if k != "model_type"})))
    projector = transformers.models.gemma3.modeling_gemma3.Gemma3MultiModalProjector(theirs)
    assert projector(torch.zeros(1, 16, VISION["hidden_size"])).shape[1] == 1
    with pytest.raises(Gemma3VLError, match=r"mm_tokens_per_image=2 must be a perfect square .* transformers' "
                                            r"pooling would give 1 soft token\(s\) per image instead"):
        Gemma3Config.from_hf_dict(vl, where="x/config.json")
    with pytest.raises(Gemma3VLError, match=r"text_config: query_pre_attn_scalar=None must be a positive number"):
        Gemma3Config.from_hf_dict({**vl, "mm_tokens_per_image": 4, "text_config": text_only(query_pre_attn_scalar=None)})


def test_every_activation_the_config_accepts_is_computed():
    """config.SUPPORTED_ACTIVATIONS (what a config may name) and model.layers.ACTIVATIONS (what computes each) are
    two lists kept in two modules (the config cannot import the model): they must name the same activations."""
    from gemma3vl.config import SUPPORTED_ACTIVATIONS
    from gemma3vl.model.layers import ACTIVATIONS

    assert set(ACTIVATIONS) == set(SUPPORTED_ACTIVATIONS)
