"""``--adapter`` on generate / chat / serve (merged at load) and ``gemma3vl convert merge`` (base + adapter -> a merged
HF checkpoint). The oracle is peft on transformers: ``PeftModel`` over transformers' base model gives the logits the
merged checkpoint must give; and the merge must be the training run's own merged export (``OUT/hf``), byte for byte.
Tiny models, CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import assert_merged_equals_peft
from gemma3vl.cli import main
from gemma3vl.infer.loading import load_model

FAST = ["logging.progress=false", "data.eval_accuracy_samples=0", "train.seq_length=128", "train.global_batch_size=2",
        "train.micro_batch_size=1"]


@pytest.fixture(scope="module", params=["lora", "dora"])
def run(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"adapter_{request.param}") / "run"
    assert main(["train", "--recipe", "tiny_peft", "--out", str(out), "train.steps=2", "optim.lr=0.05",
                 f"peft.method={request.param}", *FAST]) == 0
    return out


def test_convert_merge_is_the_runs_own_export_and_what_peft_computes(run, tmp_path):
    merged = tmp_path / "merged"
    assert main(["convert", "merge", str(run / "base"), str(run / "adapter"), str(merged)]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (merged / name).read_bytes() == (run / "hf" / name).read_bytes(), name
    assert (merged / "tokenizer.json").is_file() and (merged / "chat_template.jinja").is_file()
    assert_merged_equals_peft(merged, run / "base", run / "adapter")


def test_generate_with_adapter_answers_as_the_merged_export(run, capsys):
    prompt = ["--prompt", "What is in the picture?", "--greedy", "--max-new-tokens", "6"]
    assert main(["generate", str(run / "hf"), *prompt]) == 0
    expected = capsys.readouterr().out
    assert main(["generate", str(run / "base"), "--adapter", str(run / "adapter"), *prompt]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected
    assert "merged" in captured.err


def test_chat_and_serve_runtime_merge_the_adapter_at_load(run):
    """``chat`` and ``serve`` load through ``InferenceRuntime.load(..., adapter=)``: its weights are the merged
    export's, and it says what it merged."""
    from gemma3vl.infer.runtime import InferenceRuntime

    runtime = InferenceRuntime.load(run / "base", device="cpu", dtype="float32", adapter=run / "adapter")
    merged, _ = load_model(run / "hf", device="cpu", dtype="float32")
    expected = merged.state_dict()
    got = runtime.model.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert "merged" in runtime.describe()


def test_adapter_refusals_come_before_loading(run, tmp_path, capsys, monkeypatch):
    import gemma3vl.infer.loading as loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(loading, "load_model", no_loading)
    prompt = ["--prompt", "hi", "--max-new-tokens", "2"]
    assert main(["generate", str(run / "hf"), "--adapter", str(run / "adapter"), *prompt]) == 2
    assert "already in its weights" in capsys.readouterr().err
    assert main(["convert", "merge", str(run / "hf"), str(run / "adapter"), str(tmp_path / "x")]) == 2
    assert "already in its weights" in capsys.readouterr().err
    assert main(["chat", str(run / "base"), "--adapter", str(run / "base")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_convert_merge_checks_its_output_before_loading(run, tmp_path, capsys, monkeypatch):
    import gemma3vl.infer.loading as loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(loading, "load_model", no_loading)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["convert", "merge", str(run / "base"), str(run / "adapter"), str(taken)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (taken / "keep.txt").read_text() == "mine"
    assert main(["convert", "merge", str(run / "base"), str(run / "adapter"), str(run / "base" / "out")]) == 2
    assert "inside the input directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def api_adapter(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random base and a LoRA adapter for it written by the Python API (no training run)."""
    from gemma3vl.tiny import write_tiny_checkpoint
    from gemma3vl.train.lora import LoraConfig, apply_lora
    from gemma3vl.train.peft_export import write_peft_adapter

    root = tmp_path_factory.mktemp("api_adapter")
    base = write_tiny_checkpoint(root / "base")
    model, _ = load_model(base, device="cpu", dtype="float32")
    lora = LoraConfig(rank=2, alpha=3)
    apply_lora(model, lora)
    return base, write_peft_adapter(model, lora, root / "adapter")


# adapter_config.json edits that must be refused with one error line naming the file: malformed values (today a
# traceback) and peft variants whose model is not base + s*BA per projection (today merged as if it were).
BAD_CONFIGS = {
    "not-an-object": lambda config: [config],
    "alpha-null": lambda config: {**config, "lora_alpha": None},
    "alpha-text": lambda config: {**config, "lora_alpha": "sixteen"},
    "targets-bad-regex": lambda config: {**config, "target_modules": "(q_proj"},
    "targets-number": lambda config: {**config, "target_modules": 5},
    "alora": lambda config: {**config, "alora_invocation_tokens": [5, 6]},  # peft: an aLoRA adapter cannot be merged
    "layer-replication": lambda config: {**config, "layer_replication": [[0, 2], [1, 3]]},  # another base model
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_convert_merge_refuses_a_bad_adapter_config_in_one_line(api_adapter, tmp_path, capsys, case):
    import json
    import shutil

    base, adapter = api_adapter
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(BAD_CONFIGS[case](config)))
    assert main(["convert", "merge", str(base), str(bad), str(tmp_path / "merged")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "adapter_config.json" in err[0], err
    assert not (tmp_path / "merged").exists()
