"""HF <-> native bridge: round trips, layouts and tensor semantics.

The oracle is transformers 5.24 itself: checkpoints written by its save_pretrained, loaded by its
from_pretrained, and its modules' own parameters. Tiny configs only.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from gemma3vl import bridge
from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError
from gemma3vl.tiny import tiny_hf_config

transformers = pytest.importorskip("transformers")

SIDE_FILES = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}\n',
    "tokenizer_config.json": '{"model_max_length": 2048}\n',
    "special_tokens_map.json": '{"bos_token": "<bos>"}\n',
    "chat_template.jinja": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}\n",
    "processor_config.json": '{"image_seq_length": 4}\n',
    "README.md": "# tiny\n",
    "extra/notes.txt": "nested side files travel too\n",
}


# ------------------------------------------------------------------------------------------------ helpers
def hf_model(text_only: bool = False, *, untied: bool = False, dtype=torch.float32, seed: int = 0):
    """A tiny transformers model with every tensor random (transformers zeroes norms and the projector)."""
    torch.manual_seed(seed)
    raw = tiny_hf_config(text_only=text_only)
    if untied:
        raw["tie_word_embeddings"] = False
    if text_only:
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**raw))
    else:
        model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(**raw))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model.to(dtype).eval()


def save_hf(model, directory: Path, max_shard_size=None) -> Path:
    """transformers' own writer (the transformers5 / text layout), plus side files."""
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    add_side_files(directory)
    return directory


def add_side_files(directory: Path) -> None:
    for name, text in SIDE_FILES.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)


def weight_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.safetensors"))


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in weight_files(directory):
        out.update(tensors_of(directory / name))
    return out


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def assert_same_checkpoint(source: Path, exported: Path) -> None:
    """Same weight files, same key set in each, every tensor bit for bit; config and side files verbatim."""
    assert weight_files(exported) == weight_files(source)
    for name in weight_files(source):
        a, b = tensors_of(source / name), tensors_of(exported / name)
        assert set(a) == set(b), name
        for key in a:
            assert bitwise_equal(a[key], b[key]), key
        # The writer reproduces the file itself (header, data order, metadata), not only its tensors.
        assert filecmp.cmp(source / name, exported / name, shallow=False), name
    assert (exported / "config.json").read_text() == (source / "config.json").read_text()
    index = source / "model.safetensors.index.json"
    assert (exported / index.name).exists() == index.exists()
    if index.exists():
        assert json.loads((exported / index.name).read_text()) == json.loads(index.read_text())
    for name in SIDE_FILES:
        if (source / name).exists():
            assert (exported / name).read_bytes() == (source / name).read_bytes(), name


# ------------------------------------------------------------------------------------------------ layouts
def test_layout_specs_match_what_transformers_saves(tmp_path):
    # Oracle: the keys and shapes transformers 5.24 save_pretrained writes are our transformers5/text layouts.
    for text_only, untied, layout in [(False, False, "transformers5"), (False, True, "transformers5"),
                                      (True, False, "text"), (True, True, "text")]:
        directory = tmp_path / f"{layout}-{untied}"
        hf_model(text_only, untied=untied).save_pretrained(directory)
        saved = {k: tuple(v.shape) for k, v in all_tensors(directory).items()}
        config = bridge.read_config(directory)
        assert bridge.hf_tensor_specs(config, layout) == saved, (layout, untied)


def test_memory_layout_is_transformers_state_dict():
    # Oracle: transformers' in-memory module names (lm_head is tied to the embedding, so not stored).
    model = hf_model()
    config = Gemma3Config.from_hf_dict(tiny_hf_config())
    state = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert bridge.hf_tensor_specs(config, "memory") == state


@pytest.mark.parametrize("layout", ["hub", "transformers5", "memory", "text"])
def test_every_layout_loads_in_transformers(tmp_path, layout):
    # Oracle: transformers 5.24 from_pretrained loads each layout with nothing missing, unexpected or
    # mismatched, and its parameters are exactly the tensors in the files.
    text_only = layout == "text"
    directory = tmp_path / layout
    bridge.write_random_hf_checkpoint(tiny_hf_config(text_only=text_only), directory, layout=layout,
                                      dtype=torch.float32, max_shard_bytes=100_000)
    cls = transformers.Gemma3ForCausalLM if text_only else transformers.Gemma3ForConditionalGeneration
    model, info = cls.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    loaded = model.state_dict()
    config = bridge.read_config(directory)
    memory = "text" if text_only else "memory"
    in_memory = {f: m for f, m in zip(bridge.hf_tensor_specs(config, layout), bridge.hf_tensor_specs(config, memory))}
    files = all_tensors(directory)
    assert set(files) == set(in_memory)
    for key, tensor in files.items():
        assert bitwise_equal(loaded[in_memory[key]], tensor), key
    # Nothing stayed zero-initialised: every norm and the projector carry random values.
    assert all(t.abs().sum() > 0 for t in files.values())


def test_detect_layout_from_keys():
    assert bridge.detect_layout(["vision_tower.vision_model.post_layernorm.weight",
                                 "language_model.model.norm.weight"], True, "x").name == "hub"
    assert bridge.detect_layout(["vision_tower.post_layernorm.weight",
                                 "language_model.model.norm.weight"], True, "x").name == "transformers5"
    assert bridge.detect_layout(["model.language_model.norm.weight", "lm_head.weight"], True, "x").name == "memory"
    assert bridge.detect_layout(["model.norm.weight", "lm_head.weight"], False, "x").name == "text"
    with pytest.raises(Gemma3VLError, match="mixed key layouts.*vision_tower.vision_model"):
        bridge.detect_layout(["vision_tower.vision_model.post_layernorm.weight",
                              "vision_tower.post_layernorm.weight"], True, "x")
    with pytest.raises(Gemma3VLError, match="text-only model"):
        bridge.detect_layout(["language_model.model.norm.weight"], False, "x")
    with pytest.raises(Gemma3VLError, match="no Gemma 3 key layout"):
        bridge.detect_layout(["encoder.weight"], True, "x")


# ------------------------------------------------------------------------------------------------ round trips
ROUND_TRIPS = [
    (layout, shards, dtype)
    for layout in ("hub", "transformers5", "text")
    for shards in ("single", "sharded")
    for dtype in (torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize("layout,shards,dtype", ROUND_TRIPS, ids=lambda v: str(v).replace("torch.", ""))
def test_round_trip_is_bitwise(tmp_path, layout, shards, dtype):
    # Oracle: transformers writes the transformers5 and text sources; the hub source (which transformers 5
    # no longer writes) comes from our writer and is proven loadable by test_every_layout_loads_in_transformers.
    source = tmp_path / "hf"
    if layout == "hub":
        bridge.write_random_hf_checkpoint(tiny_hf_config(), source, layout="hub", dtype=dtype,
                                          max_shard_bytes=60_000 if shards == "sharded" else None)
        add_side_files(source)
    else:
        save_hf(hf_model(layout == "text", dtype=dtype), source, 60_000 if shards == "sharded" else None)
    assert (len(weight_files(source)) >= 3) == (shards == "sharded")

    native = bridge.import_checkpoint(source, tmp_path / "native", max_shard_bytes=50_000, progress=False)
    assert bridge.is_native_dir(native) and not bridge.is_native_dir(source)
    assert len(weight_files(native)) >= 3
    manifest = json.loads((native / "gemma3vl.json").read_text())
    assert manifest["source"]["layout"] == layout
    assert manifest["config_json"] == (source / "config.json").read_text()
    for name in SIDE_FILES:
        assert (native / "hf" / name).read_text() == SIDE_FILES[name]
    stored = all_tensors(native)
    assert set(stored) == set(bridge.native_tensor_specs(bridge.read_config(native)))
    assert {t.dtype for t in stored.values()} == {dtype}

    exported = bridge.export_checkpoint(native, tmp_path / "exported", progress=False)
    assert_same_checkpoint(source, exported)


def test_untied_head_round_trips_and_is_kept(tmp_path):
    # Oracle: transformers writes a separate language_model.lm_head.weight when tie_word_embeddings is false.
    model = hf_model(untied=True)
    source = save_hf(model, tmp_path / "hf")
    native = bridge.import_checkpoint(source, tmp_path / "native", progress=False)
    assert bridge.has_untied_head(native) and bridge.has_untied_head(source)
    head = all_tensors(native)["text.lm_head.weight"]
    assert bitwise_equal(head, model.lm_head.weight.detach())
    assert_same_checkpoint(source, bridge.export_checkpoint(native, tmp_path / "out", progress=False))


@pytest.mark.parametrize("source_layout,target_layout", [("hub", "transformers5"), ("transformers5", "hub"),
                                                         ("hub", "memory")])
def test_export_to_another_layout_loads_in_transformers(tmp_path, source_layout, target_layout):
    # Oracle: transformers 5.24 loads the converted checkpoint with no missing/unexpected keys and the very
    # same parameters as the source checkpoint.
    source = tmp_path / "hf"
    bridge.write_random_hf_checkpoint(tiny_hf_config(), source, layout=source_layout, dtype=torch.float32,
                                      max_shard_bytes=80_000)
    add_side_files(source)
    native = bridge.import_checkpoint(source, tmp_path / "native", progress=False)
    exported = bridge.export_checkpoint(native, tmp_path / "out", layout=target_layout, max_shard_bytes=100_000,
                                        progress=False)
    keys = set(all_tensors(exported))
    assert keys == set(bridge.hf_tensor_specs(bridge.read_config(source), target_layout))
    reference = transformers.Gemma3ForConditionalGeneration.from_pretrained(source).state_dict()
    model, info = transformers.Gemma3ForConditionalGeneration.from_pretrained(exported, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    for key, tensor in model.state_dict().items():
        assert bitwise_equal(tensor, reference[key]), key
    theirs, ours = bridge.read_config(source), bridge.read_config(exported)
    assert ours.replace(source_form=theirs.source_form) == theirs
    assert (exported / "tokenizer.json").read_text() == SIDE_FILES["tokenizer.json"]


def test_export_single_file_when_it_fits_and_text_layout_errors(tmp_path):
    source = tmp_path / "hf"
    bridge.write_random_hf_checkpoint(tiny_hf_config(), source, dtype=torch.float32, max_shard_bytes=100_000)
    native = bridge.import_checkpoint(source, tmp_path / "native", progress=False)
    out = bridge.export_checkpoint(native, tmp_path / "one", layout="transformers5", progress=False)
    assert weight_files(out) == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
    with pytest.raises(Gemma3VLError, match="layout 'text' is text-only, but the model is vision-language"):
        bridge.export_checkpoint(native, tmp_path / "text", layout="text", progress=False)
    with pytest.raises(Gemma3VLError, match="unknown layout 'fancy'"):
        bridge.export_checkpoint(native, tmp_path / "fancy", layout="fancy", progress=False)
    assert not (tmp_path / "text").exists() and not (tmp_path / "fancy").exists()


# ------------------------------------------------------------------------------------------------ semantics
def test_native_tensors_follow_transformers_parameters(tmp_path):
    # Oracle: the parameters of transformers' own modules. q head j*G+g must sit in KV group j (repeat_kv).
    model = hf_model(seed=3)
    native = bridge.import_checkpoint(save_hf(model, tmp_path / "hf"), tmp_path / "native", progress=False)
    ours = all_tensors(native)
    text = model.model.language_model
    cfg = model.config.text_config
    H, K, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    G = H // K
    for i, layer in enumerate(text.layers):
        qkv = ours[f"text.layers.{i}.attn.qkv.weight"]
        assert qkv.shape == (K, (G + 2) * hd, cfg.hidden_size)
        for j in range(K):
            for g in range(G):
                head = j * G + g
                assert torch.equal(qkv[j, g * hd:(g + 1) * hd], layer.self_attn.q_proj.weight[head * hd:(head + 1) * hd])
            assert torch.equal(qkv[j, G * hd:(G + 1) * hd], layer.self_attn.k_proj.weight[j * hd:(j + 1) * hd])
            assert torch.equal(qkv[j, (G + 1) * hd:], layer.self_attn.v_proj.weight[j * hd:(j + 1) * hd])
        gate_up = ours[f"text.layers.{i}.mlp.gate_up.weight"]
        assert torch.equal(gate_up[0], layer.mlp.gate_proj.weight) and torch.equal(gate_up[1], layer.mlp.up_proj.weight)
        assert torch.equal(ours[f"text.layers.{i}.attn.o.weight"], layer.self_attn.o_proj.weight)
        assert torch.equal(ours[f"text.layers.{i}.mlp_norm.weight"], layer.pre_feedforward_layernorm.weight)
    vision = model.model.vision_tower
    for i, layer in enumerate(vision.encoder.layers):
        attn = layer.self_attn
        assert torch.equal(ours[f"vision.layers.{i}.attn.qkv.weight"],
                           torch.stack([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        assert torch.equal(ours[f"vision.layers.{i}.attn.qkv.bias"],
                           torch.stack([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
    projector = model.model.multi_modal_projector
    assert torch.equal(ours["projector.proj"], projector.mm_input_projection_weight)  # [Dv, D], not transposed
    assert torch.equal(ours["projector.norm.weight"], projector.mm_soft_emb_norm.weight)
    assert torch.equal(ours["vision.patch_embed.weight"], vision.embeddings.patch_embedding.weight)


def test_specs_match_our_model():
    from gemma3vl.model import Gemma3Model

    for text_only in (False, True):
        config = Gemma3Config.from_hf_dict(tiny_hf_config(text_only=text_only))
        with torch.device("meta"):
            model = Gemma3Model(config)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == bridge.native_tensor_specs(config)


# ------------------------------------------------------------------------------------------------ load_weights
class NativeShaped(nn.Module):
    """A bare module whose state_dict is exactly ``specs`` (dotted names become nested modules)."""

    def __init__(self, specs: dict[str, tuple[int, ...]], dtype=torch.float32):
        super().__init__()
        for name, shape in specs.items():
            owner: nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, nn.Parameter(torch.zeros(shape, dtype=dtype)))


@pytest.mark.parametrize("kind", ["hf", "native"])
def test_load_weights_streams_into_a_model(tmp_path, kind):
    source = tmp_path / "hf"
    bridge.write_random_hf_checkpoint(tiny_hf_config(), source, dtype=torch.bfloat16, max_shard_bytes=50_000)
    native = bridge.import_checkpoint(source, tmp_path / "native", progress=False)
    expected = all_tensors(native)
    config = bridge.read_config(source if kind == "hf" else native)
    model = NativeShaped(bridge.native_tensor_specs(config))
    bridge.load_weights(source if kind == "hf" else native, model)
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32  # cast to the parameter's dtype
        assert torch.equal(tensor, expected[name].float()), name

    with torch.device("meta"):
        on_meta = NativeShaped(bridge.native_tensor_specs(config))
    bridge.load_weights(native, on_meta, device="cpu", dtype=torch.bfloat16)
    for name, tensor in on_meta.state_dict().items():
        assert tensor.device.type == "cpu" and bitwise_equal(tensor, expected[name]), name


def test_load_weights_is_strict(tmp_path):
    source = tmp_path / "hf"
    bridge.write_random_hf_checkpoint(tiny_hf_config(), source, dtype=torch.float32)
    config = bridge.read_config(source)
    specs = bridge.native_tensor_specs(config)
    fewer = NativeShaped({k: v for k, v in specs.items() if k != "projector.proj"})
    with pytest.raises(Gemma3VLError, match="checkpoint tensor 'projector.proj' has no place in the model"):
        bridge.load_weights(source, fewer)
    more = NativeShaped({**specs, "text.lm_head.weight": specs["text.embed.weight"]})
    with pytest.raises(Gemma3VLError, match="model tensor 'text.lm_head.weight' is not in the checkpoint"):
        bridge.load_weights(source, more)
    wrong = NativeShaped({**specs, "text.norm.weight": (3,)})
    with pytest.raises(Gemma3VLError, match=r"text.norm.weight \(from language_model.model.norm.weight in .*model"
                                            r".safetensors\): checkpoint shape \[64\], model shape \[3\]"):
        bridge.load_weights(source, wrong)


def test_random_checkpoint_is_deterministic_and_norms_are_not_zero(tmp_path):
    config = tiny_hf_config()
    a = bridge.write_random_hf_checkpoint(config, tmp_path / "a", dtype=torch.float32, seed=7)
    b = bridge.write_random_hf_checkpoint(config, tmp_path / "b", dtype=torch.float32, seed=7)
    c = bridge.write_random_hf_checkpoint(config, tmp_path / "c", dtype=torch.float32, seed=8)
    assert filecmp.cmp(a / "model.safetensors", b / "model.safetensors", shallow=False)
    assert not filecmp.cmp(a / "model.safetensors", c / "model.safetensors", shallow=False)
    assert json.loads((a / "config.json").read_text()) == config
    tensors = all_tensors(a)
    rms = tensors["language_model.model.layers.0.input_layernorm.weight"]
    assert 0.15 < rms.std() < 0.5 and abs(rms.mean()) < 0.15  # offsets around 0: the scale is (1 + w)
    ln = tensors["vision_tower.vision_model.encoder.layers.0.layer_norm1.weight"]
    assert abs(ln.mean() - 1) < 0.1 and 0.03 < ln.std() < 0.2
    assert 0.01 < tensors["multi_modal_projector.mm_input_projection_weight"].std() < 0.03


def test_writer_matches_safetensors_save_file(tmp_path):
    # Oracle: safetensors' own save_file, byte for byte (header layout, data order, padding).
    from safetensors.torch import save_file

    from gemma3vl.bridge.safetensors_io import PlannedTensor, dtype_name, write_in_canonical_order

    torch.manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5).to(torch.bfloat16), "a.weight": torch.randn(7), "c": torch.randn(2, 2),
        "scalar": torch.tensor(1.5, dtype=torch.float16), "ids": torch.arange(5), "empty": torch.zeros(0, 4),
        "flags": torch.tensor([True, False]),
    }
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    planned = [PlannedTensor(k, dtype_name(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
    write_in_canonical_order(tmp_path / "ours.safetensors", planned, tensors.__getitem__)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


def test_overwrite_replaces_a_non_empty_output(tmp_path):
    source = tmp_path / "hf"
    bridge.write_random_hf_checkpoint(tiny_hf_config(text_only=True), source, layout="text", dtype=torch.float32)
    out = tmp_path / "native"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(Gemma3VLError, match="exists and is not empty"):
        bridge.import_checkpoint(source, out, progress=False)
    assert (out / "stale.txt").exists()
    bridge.import_checkpoint(source, out, progress=False, overwrite=True)
    assert not (out / "stale.txt").exists() and bridge.is_native_dir(out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_fused_parts_in_different_shards_round_trip(tmp_path, monkeypatch):
    # q, k and v of one layer in three different source files; then the same with no room to keep split
    # parts waiting, so every part is read and split again.
    from gemma3vl.bridge import convert

    source = tmp_path / "hf"
    bridge.write_random_hf_checkpoint(tiny_hf_config(), source, dtype=torch.float32, max_shard_bytes=20_000)
    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    files = {weight_map[f"language_model.model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"}
    assert len(files) == 3
    native = bridge.import_checkpoint(source, tmp_path / "native", progress=False)
    assert_same_checkpoint(source, bridge.export_checkpoint(native, tmp_path / "out", progress=False))
    monkeypatch.setattr(convert, "SPLIT_CACHE_BYTES", 1)
    assert_same_checkpoint(source, bridge.export_checkpoint(native, tmp_path / "out2", progress=False))


def test_memory_layout_is_read_and_exported_as_transformers5(tmp_path):
    # Oracle: transformers 5.24 loads the exported checkpoint with nothing missing or unexpected.
    source = tmp_path / "hf"
    bridge.write_random_hf_checkpoint(tiny_hf_config(), source, layout="memory", dtype=torch.float32,
                                      max_shard_bytes=150_000)
    native = bridge.import_checkpoint(source, tmp_path / "native", progress=False)
    exported = bridge.export_checkpoint(native, tmp_path / "out", progress=False)
    assert weight_files(exported) == weight_files(source)  # the source's file split, transformers5 names
    config = bridge.read_config(source)
    renamed = dict(zip(bridge.hf_tensor_specs(config, "memory"), bridge.hf_tensor_specs(config, "transformers5")))
    for name in weight_files(source):
        theirs, ours = tensors_of(source / name), tensors_of(exported / name)
        assert {renamed[k] for k in theirs} == set(ours)
        assert all(bitwise_equal(theirs[k], ours[renamed[k]]) for k in theirs)
    _, info = transformers.Gemma3ForConditionalGeneration.from_pretrained(exported, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_text_model_refuses_vision_layouts(tmp_path):
    source = tmp_path / "hf"
    bridge.write_random_hf_checkpoint(tiny_hf_config(text_only=True), source, layout="text", dtype=torch.float32)
    native = bridge.import_checkpoint(source, tmp_path / "native", progress=False)
    for layout in ("hub", "transformers5", "memory"):
        with pytest.raises(Gemma3VLError, match=f"layout '{layout}' is vision-language, but the model is text-only"):
            bridge.export_checkpoint(native, tmp_path / layout, layout=layout, progress=False)
        assert not (tmp_path / layout).exists()
    with pytest.raises(Gemma3VLError, match="layout 'hub' is vision-language"):
        bridge.write_random_hf_checkpoint(tiny_hf_config(text_only=True), tmp_path / "w", layout="hub")


def test_load_weights_keeps_tied_parameters_tied(tmp_path):
    source = tmp_path / "hf"
    bridge.write_random_hf_checkpoint(tiny_hf_config(), source, dtype=torch.float32)
    config = bridge.read_config(source)
    with torch.device("meta"):
        model = NativeShaped(bridge.native_tensor_specs(config))
    model.text.add_module("lm_head", nn.Module())
    model.text.lm_head.weight = model.text.embed.weight  # one tensor under two names, as a tied model has
    bridge.load_weights(source, model, device="cpu", dtype=torch.float32)
    assert model.text.lm_head.weight is model.text.embed.weight and model.text.embed.weight.device.type == "cpu"
    assert torch.equal(model.text.embed.weight, all_tensors(source)["language_model.model.embed_tokens.weight"])


def test_source_data_order_and_metadata_are_reproduced(tmp_path):
    # A writer other than safetensors' may order data differently and add metadata; export gives it back.
    from gemma3vl.bridge.safetensors_io import PlannedTensor, dtype_name, write_safetensors

    source = tmp_path / "hf"
    bridge.write_random_hf_checkpoint(tiny_hf_config(), source, dtype=torch.bfloat16)
    tensors = {k: v.clone() for k, v in tensors_of(source / "model.safetensors").items()}  # not the mmap we rewrite
    planned = [PlannedTensor(k, dtype_name(v.dtype), tuple(v.shape)) for k, v in sorted(tensors.items(), reverse=True)]
    write_safetensors(source / "model.safetensors", planned, tensors.__getitem__,
                      {"format": "pt", "written_by": "someone else"})
    native = bridge.import_checkpoint(source, tmp_path / "native", progress=False)
    assert_same_checkpoint(source, bridge.export_checkpoint(native, tmp_path / "out", progress=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ops_are_exact_inverses_and_slots_agree(dtype):
    from gemma3vl.bridge.mapping import FuseQKV, Rename, Stack

    torch.manual_seed(0)
    K, G, hd, D = 3, 2, 4, 5
    cases = [
        (FuseQKV(K, G, hd), [torch.randn(K * G * hd, D), torch.randn(K * hd, D), torch.randn(K * hd, D)]),
        (Stack(), [torch.randn(6, D), torch.randn(6, D)]),
        (Stack(), [torch.randn(D), torch.randn(D), torch.randn(D)]),
        (Rename(), [torch.randn(2, 3, 4, 4)]),
    ]
    for op, parts in cases:
        parts = [p.to(dtype) for p in parts]
        native = op.to_native(parts)
        assert native.dtype == dtype and tuple(native.shape) == op.native_shape([tuple(p.shape) for p in parts])
        back = op.to_hf(native)
        assert len(back) == len(parts) and all(bitwise_equal(a, b) for a, b in zip(back, parts))
        slots = op.slots(native)
        assert all(bitwise_equal(s.reshape(p.shape), p) for s, p in zip(slots, parts))
        assert all(s.data_ptr() >= native.data_ptr() for s in slots)  # views, not copies
        assert bitwise_equal(op.to_native(op.to_hf(native)), native)


def test_round_trip_gives_back_config_and_index_text_byte_for_byte(tmp_path):
    # A config.json with Windows line endings (a Windows checkout, Notepad) and an index in another tool's JSON
    # style (huggingface_hub's save_torch_state_dict: indent 2, unsorted, no final newline; mergekit: one line)
    # come back as they were, not re-serialised.
    source = tmp_path / "hf"
    bridge.write_random_hf_checkpoint(tiny_hf_config(), source, dtype=torch.float32, max_shard_bytes=300_000)
    config = (source / "config.json").read_bytes().replace(b"\n", b"\r\n")
    (source / "config.json").write_bytes(config)
    index_path = source / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = dict(reversed(list(index["weight_map"].items())))
    index_text = json.dumps({"weight_map": weight_map, "metadata": {"total_size": index["metadata"]["total_size"],
                                                                    "mergekit_version": "0.1.0"}}, indent=4)
    index_path.write_bytes(index_text.encode())
    native = bridge.import_checkpoint(source, tmp_path / "native", progress=False)
    exported = bridge.export_checkpoint(native, tmp_path / "exported", progress=False)
    assert (exported / "config.json").read_bytes() == config
    assert (exported / index_path.name).read_bytes() == index_text.encode()
    assert_same_checkpoint(source, exported)
    # resharded, the index is ours (the source's no longer describes the files)
    resharded = bridge.export_checkpoint(native, tmp_path / "resharded", max_shard_bytes=200_000, progress=False)
    assert (resharded / index_path.name).read_text().endswith("}\n")


def test_index_total_size_counted_otherwise_comes_back_unless_dtypes_changed(tmp_path):
    # Another tool's index may count total_size its own way (here 12 bytes over the tensors' sum): with the
    # dtypes as imported, export gives the index back as it was; only a changed dtype rewrites total_size.
    from safetensors.torch import load_file, save_file

    source = tmp_path / "hf"
    bridge.write_random_hf_checkpoint(tiny_hf_config(), source, dtype=torch.float32, max_shard_bytes=300_000)
    index_path = source / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    true_total = index["metadata"]["total_size"]
    index["metadata"]["total_size"] = true_total + 12
    index_text = json.dumps(index, indent=2)
    index_path.write_text(index_text)
    native = bridge.import_checkpoint(source, tmp_path / "native", progress=False)
    exported = bridge.export_checkpoint(native, tmp_path / "exported", progress=False)
    assert (exported / index_path.name).read_text() == index_text
    # cast one native tensor to bfloat16 by hand: the exported index must then give the new true total
    native_index = json.loads((native / index_path.name).read_text())["weight_map"]
    name = next(n for n in native_index if n.endswith("norm.weight"))
    file = native / native_index[name]
    with safe_open(file, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(file)
    halved = tensors[name].numel() * 2
    tensors[name] = tensors[name].to(torch.bfloat16)
    save_file(tensors, file, metadata=metadata)
    recast = bridge.export_checkpoint(native, tmp_path / "recast", progress=False)
    assert json.loads((recast / index_path.name).read_text())["metadata"]["total_size"] == true_total - halved
