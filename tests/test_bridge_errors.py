"""Bad checkpoints: each gives a Gemma3VLError naming the file, key and shape, and leaves no output behind."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch

from gemma3vl import bridge
from gemma3vl.errors import Gemma3VLError
from gemma3vl.tiny import tiny_hf_config

SHARD = "model-00002-of-00003.safetensors"


@pytest.fixture
def sharded(tmp_path) -> Path:
    """A tiny hub-layout checkpoint in 3 shards (each test breaks it in one way)."""
    directory = tmp_path / "hf"
    bridge.write_random_hf_checkpoint(tiny_hf_config(), directory, dtype=torch.float32, max_shard_bytes=450_000)
    assert len(list(directory.glob("*.safetensors"))) == 3
    return directory


@pytest.fixture
def single(tmp_path) -> Path:
    directory = tmp_path / "single"
    bridge.write_random_hf_checkpoint(tiny_hf_config(), directory, dtype=torch.float32)
    return directory


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def rewrite(path: Path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def drop_tensor(path: Path, key: str) -> None:
    """Remove ``key`` from a file, keeping it a valid safetensors file (its bytes go, offsets shift)."""
    header, data = header_of(path)
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda e: e[1]["data_offsets"][0])
    out, kept = {"__metadata__": header["__metadata__"]}, b""
    for name, entry in entries:
        if name == key:
            continue
        begin, end = entry["data_offsets"]
        out[name] = {**entry, "data_offsets": [len(kept), len(kept) + end - begin]}
        kept += data[begin:end]
    rewrite(path, out, kept)


def add_tensor(path: Path, key: str, shape: list[int]) -> None:
    header, data = header_of(path)
    size = 4
    for dim in shape:
        size *= dim
    header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + size]}
    rewrite(path, header, data + bytes(size))


def assert_fails_cleanly(source: Path, out: Path, *patterns: str) -> str:
    with pytest.raises(Gemma3VLError) as caught:
        bridge.import_checkpoint(source, out, progress=False)
    message = str(caught.value)
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    assert not out.exists(), "nothing may be left in OUT_DIR"
    assert not list(out.parent.glob(f".{out.name}.*")), "no temporary directory may be left behind"
    return message


def key_in(directory: Path, fragment: str) -> tuple[str, str]:
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    return next((k, f) for k, f in sorted(weight_map.items()) if fragment in k)


def test_missing_tensor(sharded, tmp_path):
    key, file = key_in(sharded, "layers.1.self_attn.k_proj.weight")
    drop_tensor(sharded / file, key)
    assert_fails_cleanly(sharded, tmp_path / "out", re.escape(f"missing tensor '{key}'"),
                         re.escape(f"expected in {sharded / file}"))


def test_missing_tensor_single_file(single, tmp_path):
    key = "multi_modal_projector.mm_soft_emb_norm.weight"
    drop_tensor(single / "model.safetensors", key)
    assert_fails_cleanly(single, tmp_path / "out", re.escape(f"missing tensor '{key}' (expected in "
                                                             f"{single / 'model.safetensors'})"))


def test_extra_tensor(single, tmp_path):
    add_tensor(single / "model.safetensors", "language_model.model.layers.0.self_attn.rotary.inv_freq", [4])
    assert_fails_cleanly(single, tmp_path / "out", re.escape(
        f"{single / 'model.safetensors'}: unexpected tensor 'language_model.model.layers.0.self_attn.rotary.inv_freq'"))


def test_unknown_key_in_shard_not_in_index(sharded, tmp_path):
    add_tensor(sharded / SHARD, "vision_tower.vision_model.head.probe", [2])
    assert_fails_cleanly(sharded, tmp_path / "out", re.escape(f"{sharded / SHARD}: unexpected tensor "
                                                              "'vision_tower.vision_model.head.probe'"))


def test_index_entry_no_file_holds(sharded, tmp_path, caplog):
    """An index listing a tensor no shard stores (a tied lm_head some tools list anyway, or a name of no use):
    transformers ignores the entry (it loads such a checkpoint, the same logits), so the import leaves it out with a
    warning naming it (it refused the checkpoint), and the export's index lists what the files hold, as the README
    says; the oracle is transformers loading the export."""
    from transformers import Gemma3ForConditionalGeneration

    index = sharded / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    raw["weight_map"]["lm_head.weight"] = SHARD
    index.write_text(json.dumps(raw))
    with caplog.at_level("WARNING", logger="gemma3vl.bridge"):
        bridge.import_checkpoint(sharded, tmp_path / "native", progress=False)
    assert f"lists tensor 'lm_head.weight' in {SHARD}, but no file holds it: left out" in caplog.text
    bridge.export_checkpoint(tmp_path / "native", tmp_path / "out", progress=False)
    exported = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in exported and set(exported) == set(raw["weight_map"]) - {"lm_head.weight"}
    model = Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr() or \
        torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)


def test_wrong_shape(sharded, tmp_path):
    key, file = key_in(sharded, "layers.0.mlp.down_proj.weight")
    header, data = header_of(sharded / file)
    header[key]["shape"] = [128, 64]  # same byte count as the right [64, 128], so only the shape is wrong
    rewrite(sharded / file, header, data)
    assert_fails_cleanly(sharded, tmp_path / "out",
                         re.escape(f"{sharded / file}: tensor '{key}' has shape [128, 64], expected [64, 128]"))


def test_corrupt_header_garbage(sharded, tmp_path):
    path = sharded / SHARD
    raw = bytearray(path.read_bytes())
    raw[8:40] = b"\x00\xff garbage, not json at all \xfe\x01"[:32]
    path.write_bytes(bytes(raw))
    assert_fails_cleanly(sharded, tmp_path / "out", re.escape(str(path)), "corrupt safetensors header")


def test_header_length_past_end_of_file(sharded, tmp_path):
    path = sharded / SHARD
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) + 1000) + raw[8:])
    assert_fails_cleanly(sharded, tmp_path / "out", re.escape(str(path)),
                         rf"header length {len(raw) + 1000} points past the end of the file \({len(raw)} bytes")


def test_truncated_file(sharded, tmp_path):
    path = sharded / SHARD
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    assert_fails_cleanly(sharded, tmp_path / "out", re.escape(
        f"{path}: file is truncated: {len(raw) - 100} bytes, but the header says its data ends at byte {len(raw)}"))


def test_unknown_model_type(single, tmp_path):
    config = json.loads((single / "config.json").read_text())
    config["model_type"] = "llama"
    (single / "config.json").write_text(json.dumps(config))
    assert_fails_cleanly(single, tmp_path / "out", re.escape(str(single / "config.json")),
                         "model_type='llama' is not a Gemma 3 checkpoint")


def test_missing_shard_named_in_index(sharded, tmp_path):
    (sharded / SHARD).unlink()
    assert_fails_cleanly(sharded, tmp_path / "out", re.escape(f"{sharded / SHARD}: shard named in "
                                                              f"{sharded / 'model.safetensors.index.json'} is missing"))


def test_mixed_layouts(single, tmp_path):
    # A transformers5-style vision key in a hub checkpoint.
    add_tensor(single / "model.safetensors", "vision_tower.post_layernorm.weight", [32])
    assert_fails_cleanly(single, tmp_path / "out", "mixed key layouts", "vision_tower.post_layernorm.weight",
                         "vision_tower.vision_model")


def test_text_weights_under_a_vision_language_config(tmp_path):
    source = tmp_path / "hf"
    bridge.write_random_hf_checkpoint(tiny_hf_config(text_only=True), source, layout="text", dtype=torch.float32)
    (source / "config.json").write_text(json.dumps(tiny_hf_config()))
    assert_fails_cleanly(source, tmp_path / "out", r"key 'model\..*' is in the text layout, but config.json "
                                                   "describes a vision-language model")


def test_fused_parts_of_different_dtypes(single, tmp_path):
    path = single / "model.safetensors"
    key = "language_model.model.layers.0.self_attn.v_proj.weight"
    header, data = header_of(path)
    begin, end = header[key]["data_offsets"]
    halves = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.float32).to(torch.bfloat16)
    drop_tensor(path, key)
    header, data = header_of(path)
    header[key] = {"dtype": "BF16", "shape": [48, 64], "data_offsets": [len(data), len(data) + halves.numel() * 2]}
    rewrite(path, header, data + halves.view(torch.uint8).numpy().tobytes())
    assert_fails_cleanly(single, tmp_path / "out", "text.layers.0.attn.qkv.weight is fused from tensors of "
                                                   "different dtypes", re.escape(f"{key} (BF16 in {path})"))


def test_refuses_non_empty_output_and_output_inside_input(single, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Gemma3VLError, match=re.escape(f"{out}: exists and is not empty")):
        bridge.import_checkpoint(single, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    with pytest.raises(Gemma3VLError, match="cannot be inside the input directory"):
        bridge.import_checkpoint(single, single / "native", progress=False)
    assert not (single / "native").exists()


def test_export_checks_the_native_weights(single, tmp_path):
    native = bridge.import_checkpoint(single, tmp_path / "native", max_shard_bytes=100_000, progress=False)
    index = json.loads((native / "model.safetensors.index.json").read_text())["weight_map"]
    file = index["vision.post_norm.bias"]
    drop_tensor(native / file, "vision.post_norm.bias")
    out = tmp_path / "exported"
    with pytest.raises(Gemma3VLError, match=re.escape(f"missing tensor 'vision.post_norm.bias' (expected in "
                                                      f"{native / file})")):
        bridge.export_checkpoint(native, out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".exported.*"))


def test_not_a_native_dir_and_no_weights(single, tmp_path):
    with pytest.raises(Gemma3VLError, match="not a native gemma3vl checkpoint"):
        bridge.export_checkpoint(single, tmp_path / "out", progress=False)
    empty = tmp_path / "config-only"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(tiny_hf_config()))
    with pytest.raises(Gemma3VLError, match=re.escape(f"{empty}: neither model.safetensors nor "
                                                      "model.safetensors.index.json found")):
        bridge.import_checkpoint(empty, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_untied_config_without_lm_head(tmp_path):
    # tie_word_embeddings=false: transformers would initialise a missing lm_head randomly; we refuse.
    source = tmp_path / "hf"
    config = tiny_hf_config(text_only=True, tie_word_embeddings=False)
    bridge.write_random_hf_checkpoint(config, source, layout="text", dtype=torch.float32)
    drop_tensor(source / "model.safetensors", "lm_head.weight")
    assert_fails_cleanly(source, tmp_path / "out", re.escape(
        f"missing tensor 'lm_head.weight' (expected in {source / 'model.safetensors'})"))


def test_overwrite_never_deletes_the_input(single, tmp_path):
    with pytest.raises(Gemma3VLError, match="cannot contain the input directory"):
        bridge.import_checkpoint(single, tmp_path, progress=False, overwrite=True)
    assert (single / "model.safetensors").is_file()


def test_an_unwritable_output_location_is_a_clear_error(single, tmp_path, capsys):
    # A file where a parent directory of OUT_DIR should be (as a read-only location): one error naming both.
    blocker = tmp_path / "a file"
    blocker.write_text("not a directory")
    out = blocker / "sub" / "native"
    with pytest.raises(Gemma3VLError, match=re.escape(f"{out}: cannot write the output ({blocker} is a file, "
                                                      "not a directory)")):
        bridge.import_checkpoint(single, out, progress=False)
    native = bridge.import_checkpoint(single, tmp_path / "native", progress=False)
    from gemma3vl.cli import main

    assert main(["convert", "export", str(native), str(blocker / "hf")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the output" in err and "Traceback" not in err
    assert blocker.read_text() == "not a directory" and sorted(p.name for p in tmp_path.iterdir()) == [
        "a file", "native", "single"]


def test_cli_exports_the_memory_layout(single, tmp_path):
    # The API writes the memory layout on request; the command line must be able to ask for it too.
    from safetensors import safe_open

    from gemma3vl.cli import main

    native = bridge.import_checkpoint(single, tmp_path / "native", progress=False)
    assert main(["convert", "export", str(native), str(tmp_path / "memory"), "--layout", "memory"]) == 0
    with safe_open(str(tmp_path / "memory" / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.language_model.embed_tokens.weight" in keys and "model.vision_tower.post_layernorm.bias" in keys


@pytest.mark.parametrize("damage, words", [
    (lambda m: m.pop("config_json"), "'config_json' must hold the source's config.json text"),
    (lambda m: m.update(config_json="{"), "'config_json' must hold the source's config.json text"),
    (lambda m: m.pop("source"), "'source' must be an object"),
    (lambda m: m["source"].update(layout="bogus"), "'source.layout' is 'bogus', not one of hub"),
    (lambda m: m["source"].update(layout=[1]), "'source.layout' is [1]"),
    (lambda m: m["source"].update(files=None), "'source.files' must be a list"),
    (lambda m: m["source"].update(sharded="yes"), "'source.sharded' must be true or false"),
])
def test_a_damaged_manifest_is_one_error_naming_its_key(single, tmp_path, damage, words):
    """A gemma3vl.json missing a key or holding the wrong type was a KeyError / TypeError traceback from inside the
    export; now one error naming the file and the key, before anything is written."""
    native = tmp_path / "native"
    bridge.import_checkpoint(single, native, progress=False)
    manifest = json.loads((native / "gemma3vl.json").read_text())
    damage(manifest)
    (native / "gemma3vl.json").write_text(json.dumps(manifest))
    with pytest.raises(Gemma3VLError, match=re.escape(f"{native / 'gemma3vl.json'}: {words}")):
        bridge.export_checkpoint(native, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_an_unreadable_input_file_is_named_as_the_inputs_fault(tmp_path, monkeypatch):
    """A tokenizer file the user cannot read was reported as "OUT: cannot write the output (Permission denied:
    .../tokenizer.json)", blaming the output; now the input file is named. (Run as root, chmod 000 reads anyway:
    the open is made to fail as it does for another user.)"""
    import builtins

    from gemma3vl.bridge import fsutil
    from gemma3vl.tiny import write_tiny_checkpoint

    source = write_tiny_checkpoint(tmp_path / "tiny")
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if Path(file).name == "tokenizer.json" and Path(file).parent == source:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(fsutil, "open", guarded, raising=False)
    with pytest.raises(Gemma3VLError, match=re.escape(f"{source / 'tokenizer.json'}: cannot read (Permission denied)")):
        bridge.import_checkpoint(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
