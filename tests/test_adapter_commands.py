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
