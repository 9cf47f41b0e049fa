"""Training: settings, accumulation, the whole `gemma3vl train` run, exports, and resume after a kill.

Exports are checked with transformers (and peft for adapters) as the oracle, on tiny random models."""

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import launch_ranks
from conftest import assert_merged_equals_peft
from gemma3vl import verify
from gemma3vl.cli import main
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.loading import load_model
from gemma3vl.train.config import build_config
from gemma3vl.train.metrics import read_metrics
from gemma3vl.train.run import build_trainer

FAST = [
    "train.seq_length=128", "train.global_batch_size=2", "train.micro_batch_size=1",
    "data.eval_accuracy_samples=2", "data.eval_max_new_tokens=3", "logging.progress=false",
]


def last_per_step(records, key):
    return {r["step"]: r[key] for r in records if r.get(key) is not None}


def test_recipe_overrides_and_files(tmp_path):
    cfg = build_config("tiny_peft", overrides=["train.steps=3", "optim.lr=0.001", "peft.rank=4", "peft.alpha=8",
                                               "checkpoint.every=2", "train.global_batch_size=4"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.peft.rank, cfg.peft.alpha) == (3, 0.001, 4, 8.0)
    assert cfg.peft.method == "lora" and cfg.checkpoint.every == 2
    with pytest.raises(Gemma3VLError, match="unknown setting 'train.stpes'"):
        build_config("tiny_sft", overrides=["train.stpes=3"])
    with pytest.raises(Gemma3VLError, match="not a multiple"):
        build_config("tiny_sft", overrides=["train.global_batch_size=5", "train.micro_batch_size=2"])
    with pytest.raises(Gemma3VLError, match="expected an integer"):
        build_config("tiny_sft", overrides=["train.steps=many"])
    with pytest.raises(Gemma3VLError, match="unknown recipe"):
        build_config("gemma3_vl_1b_sft")
    settings = tmp_path / "run.yaml"
    settings.write_text("recipe: gemma3_vl_4b_peft\ntrain:\n  seq_length: 2048\noptim:\n  lr: 1.0e-4\n")
    cfg = build_config(None, str(settings), ["train.steps=7"])
    assert cfg.recipe == "gemma3_vl_4b_peft" and cfg.train.seq_length == 2048 and cfg.optim.lr == 1e-4
    assert cfg.train.steps == 7 and cfg.peft.method == "lora" and cfg.train.global_batch_size == 32


@pytest.mark.parametrize("yaml_text,message", [
    ("train:\n  steps: [1]\n", "train.steps=[1]: expected an integer"),
    ("train:\n  steps: 1.5\n", "train.steps=1.5: expected an integer"),
    ("optim:\n  lr: null\n", "optim.lr=None: expected a number"),
    ("optim:\n  lr: true\n", "optim.lr=True: expected a number"),
    ("parallel:\n  tp: null\n", "parallel.tp=None: expected an integer"),
    ("data:\n  packing: 1\n", "data.packing=1: expected true or false"),
    ("data:\n  path: [a.jsonl, b.jsonl]\n", "data.path=['a.jsonl', 'b.jsonl']: expected a string"),
    ("model:\n  path: 123\n", "model.path=123: expected a string"),
    ("out: null\n", "out=None: expected a string"),
    ("peft:\n  targets: [q_proj, 3]\n", "peft.targets=['q_proj', 3]: expected a list of strings"),
])
def test_config_file_values_of_the_wrong_type_name_the_key(tmp_path, yaml_text, message):
    """YAML gives typed values: one of the wrong type is refused naming its key, not a TypeError in
    validate() (lists, null) nor a float step count or a boolean learning rate trained on silently."""
    settings = tmp_path / "run.yaml"
    settings.write_text("recipe: tiny_sft\n" + yaml_text)
    with pytest.raises(Gemma3VLError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_config(None, str(settings))


def test_config_file_values_of_the_right_type(tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text("recipe: tiny_sft\noptim:\n  lr: 1e-4\n  weight_decay: 0\ntrain:\n  steps: '7'\n"
                        "data:\n  eval_metric: [exact_match, token_f1]\n  path: null\n  packing: 'no'\n"
                        "model:\n  path: base\npeft:\n  targets: q_proj\n")
    cfg = build_config(None, str(settings), ["model.path=other"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.steps) == (1e-4, 0.0, 7)
    settings.write_text("recipe: tiny_sft\noptim:\n  fused: false\n")  # YAML's boolean for auto | true | false
    assert build_config(None, str(settings), []).optim.fused == "false"
    assert build_config(None, str(settings), ["optim.fused=true"]).optim.fused == "true"
    with pytest.raises(Gemma3VLError, match="optim.fused='yes' is not one of auto, true, false"):
        build_config(None, str(settings), ["optim.fused=yes"])
    assert cfg.data.eval_metrics() == ["exact_match", "token_f1"] and cfg.data.packing is False
    assert cfg.model.path == "other" and cfg.peft.targets == ["q_proj"]


@pytest.mark.parametrize("override,message", [
    ("train.lr=1e-4", r"unknown setting 'train.lr' \(did you mean optim.lr\?\)"),
    ("optim.seq_length=64", r"did you mean train.seq_length\?"),
    ("recipe=tiny_peft", "--recipe"),
    ("optim.lr=nan", "optim.lr=nan must be a finite number"),
    ("optim.lr=inf", "optim.lr=inf must be a finite number"),
    ("train.grad_clip=0", "train.grad_clip=0.0 must be > 0"),
    ("train.log_every=0", "train.log_every=0 must be >= 1"),
    ("train.eval_every=-1", "train.eval_every=-1 must be >= 0"),
    ("checkpoint.every=-5", "checkpoint.every=-5 must be >= 0"),
    ("optim.warmup_steps=-3", "optim.warmup_steps=-3 must be >= 0"),
    ("data.max_image_pixels=0", "data.max_image_pixels=0 must be >= 1"),
    ("data.eval_max_new_tokens=0", "data.eval_max_new_tokens=0 must be >= 1"),
    ("optim.beta1=1.5", r"optim.beta1=1.5 must be in \[0, 1\)"),
    ("optim.schedule=step", "optim.schedule='step' is not one of cosine, linear, constant"),
    ("train.freeze_language=true", "nothing to train: the adapters are on the text decoder, which train.freeze_"),
    ("out=none", None),
])
def test_bad_overrides_are_refused_before_anything_loads(override, message):
    """Each of these used to reach training (a ZeroDivisionError at the first log for log_every=0, gradients
    clipped to zero for grad_clip=0, a NaN learning rate) or was ignored (recipe=...)."""
    if message is None:
        assert build_config("tiny_sft", overrides=[override]).out == "none"
        return
    recipe = "tiny_peft" if override.startswith("train.freeze_") else "tiny_sft"
    with pytest.raises(Gemma3VLError, match=message):
        build_config(recipe, overrides=[override])


def test_hf_dataset_columns_and_split_are_settings(tmp_path):
    """docs/data.md maps a HF dataset's columns and picks its split; `gemma3vl train` had no setting for
    either, so a dataset whose conversations are in a column named otherwise could not be trained on."""
    from gemma3vl.train.run import data_config

    cfg = build_config("tiny_sft", overrides=["data.columns=messages=chat, images=pictures",
                                              "data.split=train", "data.eval_split=validation"])
    train = data_config(cfg, str(tmp_path / "data.parquet"), shuffle=True)
    held_out = data_config(cfg, str(tmp_path), shuffle=False, held_out=True)
    assert train.columns == held_out.columns == {"messages": "chat", "images": "pictures"}
    assert (train.split, held_out.split) == ("train", "validation")
    assert data_config(cfg, str(tmp_path / "eval.jsonl"), shuffle=False).columns is None  # JSON has no columns
    settings = tmp_path / "run.yaml"
    settings.write_text("recipe: tiny_sft\ndata:\n  columns:\n    messages: chat\n")
    assert build_config(None, str(settings)).data.column_map() == {"messages": "chat"}
    with pytest.raises(Gemma3VLError, match="data.columns='chat': expected key=column pairs"):
        build_config("tiny_sft", overrides=["data.columns=chat"])


def test_accumulation_equals_one_big_batch(tmp_path):
    """4 micro-batches of 1 row give the same loss and gradient norm as 1 micro-batch of 4 rows."""
    records = {}
    for micro in (1, 4):
        cfg = build_config("tiny_sft", overrides=[*FAST, "train.global_batch_size=4", f"train.micro_batch_size={micro}",
                                                  "train.grad_clip=1e9", f"out={tmp_path / 'run'}"])
        cfg.data.eval_path = None
        trainer, _ = build_trainer(cfg, tmp_path / "run")
        records[micro] = trainer.train_step()
    assert records[1]["target_tokens"] == records[4]["target_tokens"]
    assert records[1]["loss"] == pytest.approx(records[4]["loss"], rel=1e-5)
    assert records[1]["grad_norm"] == pytest.approx(records[4]["grad_norm"], rel=1e-4)


def test_sft_run_logs_exports_and_matches_transformers(tmp_path, capsys):
    out = tmp_path / "sft"
    code = main(["train", "--recipe", "tiny_sft", "--out", str(out), "train.steps=3", "checkpoint.every=2", *FAST])
    assert code == 0
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record in steps:
        for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s"):
            assert record[key] is not None
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 3]
    assert (out / "loss.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    # OUT/hf is a complete HF checkpoint: transformers loads it and computes what our trained weights compute
    ours, config = load_model(out / "hf", device="cpu", dtype="float32")
    reference = verify.load_reference(out / "hf", config, torch.float32, torch.device("cpu"))
    report = verify.compare(ours, reference, config, dtype=torch.float32, device=torch.device("cpu"), greedy_tokens=4)
    assert report.passed, verify.format_report(report)
    base, _ = load_model(out / "base", device="cpu", dtype="float32")
    assert not torch.equal(base.text.embed.weight, ours.text.embed.weight)  # it did train
    for name in ("tokenizer.json", "chat_template.jinja", "processor_config.json", "generation_config.json"):
        assert (out / "hf" / name).is_file()
    assert "eval at step 3" in capsys.readouterr().err


def test_lora_run_adapter_loads_in_peft(tmp_path):
    """Oracle: peft on transformers (conftest.assert_merged_equals_peft)."""
    out = tmp_path / "lora"
    assert main(["train", "--recipe", "tiny_peft", "--out", str(out), "train.steps=3", *FAST]) == 0
    assert_merged_equals_peft(out / "hf", out / "base", out / "adapter", changed_by=1e-3)


def _train_argv(out: Path, *extra: str) -> list[str]:
    return ["train", "--recipe", "tiny_sft", "--out", str(out), "train.steps=6", "checkpoint.every=2",
            "checkpoint.keep_last=5", "train.eval_every=0", *FAST, *extra]


def test_resume_after_kill_gives_the_same_losses(tmp_path):
    """``gemma3vl train`` in processes of their own (forked from a preloaded server, launch_ranks.py): one whole
    run; one killed (SIGKILL) after its first checkpoint, then resumed: the same losses, bit for bit."""
    whole = tmp_path / "whole"
    done = launch_ranks.run(_train_argv(whole), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = tmp_path / "killed"
    killed.mkdir()
    # share the base model and data so both runs read the same bytes
    for name in ("base", "data"):
        os.symlink(whole / name, killed / name)
    process = launch_ranks.start(_train_argv(killed), os.devnull, os.devnull)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-00000002" / "COMPLETE").exists():
        assert process.is_alive(), "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    process.kill()
    process.join()
    assert not (killed / "hf").exists()
    done = launch_ranks.run(_train_argv(killed, "--resume"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = last_per_step(read_metrics(whole / "metrics.jsonl"), "loss")
    got = last_per_step(read_metrics(killed / "metrics.jsonl"), "loss")
    assert sorted(expected) == list(range(1, 7))
    assert got == expected  # bit for bit on the CPU
    norms = last_per_step(read_metrics(killed / "metrics.jsonl"), "grad_norm")
    assert norms == last_per_step(read_metrics(whole / "metrics.jsonl"), "grad_norm")


def test_refuses_to_clobber_checkpoints_without_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "tiny_sft", "--out", str(out), "train.steps=1", "data.eval_accuracy_samples=0",
                 *FAST]) == 0
    import gemma3vl.train.run as run_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(run_module, "build_trainer", no_loading)
    assert main(["train", "--recipe", "tiny_sft", "--out", str(out), "train.steps=1", *FAST]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert (out / "checkpoints" / "step-00000001").is_dir()
    # resuming a checkpoint past train.steps: nothing to train, an error (it exported the checkpoint's weights as
    # the run's and reported "final loss None"); at train.steps itself, the export is written again (a run killed
    # in its final export finishes it that way: test_reliability_kill), saying so
    monkeypatch.undo()
    assert main(["train", "--recipe", "tiny_sft", "--out", str(out), "--resume", *FAST, "train.steps=0"]) == 2
    assert "train.steps=0 must be >= 1" in capsys.readouterr().err
    longer = tmp_path / "longer"
    assert main(["train", "--recipe", "tiny_sft", "--out", str(longer), *FAST, "train.steps=2",
                 "data.eval_accuracy_samples=0"]) == 0
    capsys.readouterr()
    exported = (longer / "hf" / "model.safetensors").stat().st_mtime_ns
    assert main(["train", "--recipe", "tiny_sft", "--out", str(longer), "--resume", *FAST, "train.steps=1"]) == 2
    assert ("the checkpoint is at step 2, past train.steps=1: nothing is left to train; give train.steps above 2"
            in capsys.readouterr().err)
    assert (longer / "hf" / "model.safetensors").stat().st_mtime_ns == exported  # (the export is left alone)
    assert main(["train", "--recipe", "tiny_sft", "--out", str(out), "--resume", *FAST, "train.steps=1"]) == 0
    err = capsys.readouterr().err
    assert "resumed at step 1: the last step, nothing left to train; writing the run's export" in err
    assert "final loss n/a (no step ran in this run)" in err


def test_lora_run_from_a_native_base_records_no_base_transformers_cannot_read(tmp_path, capsys):
    """Oracle: transformers/peft. Trained from a native directory (docs/evaluation.md does so), the adapter's
    ``base_model_name_or_path`` is left unset instead of naming that directory, from which transformers (and so
    peft's AutoPeftModel) would build a randomly initialised default model; applied with PeftModel to
    transformers' model of the HF form of the base, the adapter gives the logits of the merged OUT/hf."""
    from gemma3vl.bridge import import_checkpoint
    from gemma3vl.tiny import write_tiny_checkpoint

    hf_base = write_tiny_checkpoint(tmp_path / "base")
    native = import_checkpoint(hf_base, tmp_path / "native", progress=False)
    out = tmp_path / "lora"
    assert main(["train", "--recipe", "tiny_peft", "--model", str(native), "--out", str(out), "train.steps=1",
                 *FAST]) == 0
    settings = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] is None
    assert "is a native directory" in capsys.readouterr().err
    assert_merged_equals_peft(out / "hf", hf_base, out / "adapter", changed_by=0.0)


def test_resume_followed_by_an_override_takes_the_override(monkeypatch, tmp_path):
    """``--resume train.steps=8``: argparse hands the override to --resume's optional PATH; it must still be an
    override, and the run resume from OUT's latest checkpoint."""
    import gemma3vl.train.run as run
    from gemma3vl.cli import main

    seen = {}

    def fake_training(cfg, resume=None):
        seen.update(steps=cfg.train.steps, lr=cfg.optim.lr, resume=resume)
        return SimpleNamespace(steps=0, final_loss=None)

    monkeypatch.setattr(run, "run_training", fake_training)
    assert main(["train", "--recipe", "tiny_sft", "--out", str(tmp_path), "--resume", "train.steps=8",
                 "optim.lr=0.5"]) == 0
    assert seen == {"steps": 8, "lr": 0.5, "resume": True}


def test_overrides_between_options_are_overrides_in_their_order(monkeypatch, tmp_path, capsys):
    """``train train.steps=1 --data X data.on_bad_record=error --out O train.steps=9``: argparse takes only the first
    run of overrides as the positional list; the later ones are overrides too (the last train.steps wins), and a
    stray option or word is still refused, naming it."""
    import gemma3vl.train.run as run
    from gemma3vl.cli import main

    seen = {}

    def fake_training(cfg, resume=None):
        seen.update(steps=cfg.train.steps, on_bad=cfg.data.on_bad_record, lr=cfg.optim.lr, out=str(cfg.out))
        return SimpleNamespace(steps=0, final_loss=None)

    monkeypatch.setattr(run, "run_training", fake_training)
    assert main(["train", "--recipe", "tiny_sft", "train.steps=1", "--out", str(tmp_path), "data.on_bad_record=error",
                 "--eval-data", str(tmp_path / "eval.jsonl"), "optim.lr=0.5", "train.steps=9"]) == 0
    assert seen == {"steps": 9, "on_bad": "error", "lr": 0.5, "out": str(tmp_path)}
    for stray in ("--stepz", "extra"):
        with pytest.raises(SystemExit) as exited:
            main(["train", "--recipe", "tiny_sft", "optim.lr=0.5", "--out", str(tmp_path), stray, "train.steps=2"])
        assert exited.value.code == 2 and f"unrecognized arguments: {stray}" in capsys.readouterr().err


def test_resume_with_settings_that_change_the_weights_meaning_is_refused(tmp_path):
    """Another peft.alpha on resume would silently rescale the trained adapters (rank, method, targets and what
    is frozen likewise): refused, naming each; dropout, the learning rate and the steps may change."""
    from gemma3vl.train.config import build_config
    from gemma3vl.train.run import check_resume_settings, run_training

    started = build_config("tiny_peft", None, [f"out={tmp_path}"])
    (tmp_path / "train_config.json").write_text(json.dumps(started.to_dict()))
    check_resume_settings(tmp_path / "train_config.json",
                          build_config("tiny_peft", None, ["peft.dropout=0.1", "optim.lr=1e-3"]).to_dict())
    changed = build_config("tiny_peft", None, [f"out={tmp_path}", "peft.alpha=8", "train.freeze_vision=true"])
    with pytest.raises(Gemma3VLError, match=r"peft.alpha: 16.0 when the run started, 8.0 now; "
                                            r"train.freeze_vision: False when the run started, True now"):
        run_training(changed, resume=True)


def test_a_step_without_images_leaves_the_image_parts_as_transformers_does(tmp_path):
    """In transformers a text-only step never runs the vision tower, so AdamW (which skips parameters without a
    gradient) leaves the tower and projector as they were, weight decay and momentum notwithstanding; so do we,
    in one process as under every layout (tests/test_parallel_layouts.py)."""
    from safetensors.torch import load_file

    from gemma3vl.cli import main

    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Say the number {n}."},
        {"role": "assistant", "content": f"The number is {n}."}]}) + "\n" for n in range(8)))
    out = tmp_path / "run"
    assert main(["train", "--recipe", "tiny_sft", "--out", str(out), "--data", str(data), "train.steps=2",
                 "optim.weight_decay=0.1", "optim.warmup_steps=0", "train.eval_every=0"]) == 0

    def image_parts(directory):
        tensors = {}
        for file in sorted(directory.glob("*.safetensors")):
            tensors.update({k: v for k, v in load_file(file).items() if "vision" in k or "projector" in k})
        return tensors

    before, after = image_parts(out / "base"), image_parts(out / "hf")
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    text_before = load_file(next((out / "base").glob("*.safetensors")))
    assert any(not torch.equal(v, load_file(next((out / "hf").glob("*.safetensors")))[k])
               for k, v in text_before.items() if "language_model" in k)  # the text did train


def test_a_stale_adapter_in_a_reused_out_is_pointed_out(tmp_path, capsys):
    """A full fine-tuning run into an OUT that still holds an earlier LoRA run's adapter/ leaves it (never deleted)
    but says it is not this run's: a user must not ship it with the new hf/."""
    from gemma3vl.cli import main

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert main(["train", "--recipe", "tiny_sft", "--out", str(tmp_path), "train.steps=1",
                 "train.eval_every=0"]) == 0
    assert f"{tmp_path / 'adapter'} is from an earlier run in this OUT" in capsys.readouterr().err
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == "{}"


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_continues(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's preemption) mid-run: the step in progress finishes, a checkpoint of it is saved
    (checkpoint.every would not have saved one), the command exits 143, and --resume gives the losses of an
    uninterrupted run."""
    from gemma3vl.train.trainer import Trainer

    args = ["train", "--recipe", "tiny_sft", "train.steps=4", "checkpoint.every=0", "train.eval_every=0", *FAST]
    whole = tmp_path / "whole"
    assert main([*args, "--out", str(whole)]) == 0
    stopped = tmp_path / "stopped"
    real_step = Trainer.train_step

    def step_then_signal(self):
        record = real_step(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the step's bookkeeping is still running
        return record

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    assert main([*args, "--out", str(stopped)]) == 128 + signal.SIGTERM
    assert "stopped at step 2 of 4 (SIGTERM)" in capsys.readouterr().err
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step-00000002"]
    assert not (stopped / "hf").exists()  # not finished: no export
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main([*args, "--out", str(stopped), "--resume"]) == 0
    assert last_per_step(read_metrics(stopped / "metrics.jsonl"), "loss") == \
        last_per_step(read_metrics(whole / "metrics.jsonl"), "loss")
    assert (stopped / "hf").is_dir()


def test_a_second_ctrl_c_stops_at_once():
    from gemma3vl.train.trainer import StopSignals

    notes = []
    before = signal.getsignal(signal.SIGINT)  # (SIG_IGN when pytest was started in the background by a shell)
    with StopSignals(notes.append) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # (delivered at the next bytecode boundary)
        assert stop.received == signal.SIGINT and "stopping after this step" in notes[0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before


def _native_to_hf(model, what="param"):
    """Our native tensors (weights or gradients) under transformers' in-memory names (bridge's own mapping)."""
    from gemma3vl.bridge.layouts import LAYOUTS
    from gemma3vl.bridge.mapping import build_mappings

    mappings = {m.native: m for m in build_mappings(model.config, LAYOUTS["memory"])}
    named = {}
    for name, param in model.named_parameters():
        tensor = param.detach() if what == "param" else param.grad
        if tensor is not None:
            named.update(zip(mappings[name].hf, mappings[name].op.to_hf(tensor)))
    return named


def test_a_step_with_uneven_and_empty_micro_batches_matches_transformers_and_torch_adamw(tmp_path):
    """The oracle is transformers itself (Gemma3ForConditionalGeneration on the same tiny random checkpoint, float32,
    each conversation alone, its own loss with ``num_items_in_batch`` = the step's target tokens) with torch's own
    ``clip_grad_norm_`` and ``torch.optim.AdamW`` over transformers' parameters, weight decay on its matrices
    only (never a norm or a bias). Micro-batches of 0, 1 and many target tokens: the step's loss is the mean over
    all its target tokens. Weight decay is on, so a bias that decays (the SigLIP q/k/v biases, stacked 2-D in our
    native layout) shows; AdamW's eps is large enough that the update does not amplify float32 rounding."""
    import dataclasses

    from transformers import Gemma3ForConditionalGeneration

    lr, decay, clip = 1e-2, 0.1, 0.5
    cfg = build_config("tiny_sft", overrides=[*FAST, "train.global_batch_size=4", "data.prefetch=0",
                                              f"optim.lr={lr}", f"optim.weight_decay={decay}", "optim.eps=1e-3",
                                              "optim.warmup_steps=0", f"train.grad_clip={clip}", f"out={tmp_path}"])
    cfg.data.eval_path = None
    trainer, _ = build_trainer(cfg, tmp_path)
    reference = Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "base", dtype=torch.float32,
                                                               attn_implementation="eager").train()
    taken = trainer.batcher.next_step

    def uneven_step():
        batches = taken()
        batches[1] = dataclasses.replace(batches[1], targets=torch.full_like(batches[1].targets, -100))
        one = torch.full_like(batches[2].targets, -100)
        first = (batches[2].targets != -100).nonzero()[0]
        one[first[0], first[1]] = batches[2].targets[first[0], first[1]]
        batches[2] = dataclasses.replace(batches[2], targets=one)
        seen.append(batches)
        return batches

    seen = []
    trainer.batcher.next_step = uneven_step
    record = trainer.train_step()
    counts = [batch.num_target_tokens for batch in seen[0]]
    assert counts[1] == 0 and counts[2] == 1 and counts[0] > 5 and record["target_tokens"] == sum(counts)

    total, image_id = record["target_tokens"], trainer.model.config.image_token_id
    expected_loss = 0.0
    for batch in seen[0]:  # each conversation alone, as transformers sees it
        images = iter(batch.pixel_values if batch.pixel_values is not None else ())
        for row in range(batch.input_ids.shape[0]):
            segments = batch.info.segment_ids[row]
            for segment in segments.unique()[segments.unique() > 0]:
                ids, targets = batch.input_ids[row, segments == segment], batch.targets[row, segments == segment]
                count = int((ids == image_id).sum()) // trainer.model.config.mm_tokens_per_image
                pixels = torch.stack([next(images) for _ in range(count)]) if count else None
                out = reference(input_ids=ids[None], pixel_values=pixels, token_type_ids=(ids == image_id).long()[None],
                                labels=torch.cat([torch.tensor([-100]), targets[:-1]])[None],
                                num_items_in_batch=torch.tensor(total))
                if out.loss.requires_grad:  # (a conversation without targets: transformers' loss is 0)
                    out.loss.backward()  # transformers' own loss: this conversation's sum / the step's target tokens
                expected_loss += float(out.loss.detach())
    params = dict(reference.named_parameters())
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
    matrices = [p for n, p in params.items() if p.ndim >= 2 and not n.endswith("bias") and "norm" not in n]
    others = [p for n, p in params.items() if not (p.ndim >= 2 and not n.endswith("bias") and "norm" not in n)]
    torch.optim.AdamW([{"params": matrices, "weight_decay": decay}, {"params": others, "weight_decay": 0.0}],
                      lr=lr, eps=1e-3).step()
    assert record["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert record["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    assert record["lr"] == lr
    ours = _native_to_hf(trainer.model)
    assert ours.keys() == params.keys()
    for name, param in params.items():
        scale = param.detach().abs().max()
        assert (ours[name] - param.detach()).abs().max() <= 2e-5 * scale, name


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """A run killed after logging steps past its last checkpoint (here 3, checkpoint at 2; the last line cut short
    by the kill) trains those steps again when resumed: metrics.jsonl keeps what the checkpoint holds and the
    resumed run's own records, one per step, rather than both runs' (and a torn line that stops read_metrics)."""
    from gemma3vl.train.config import LoggingSettings
    from gemma3vl.train.metrics import MetricsLogger

    lines = [{"step": 0, "eval_loss": 6.0}, {"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0},
             {"step": 2, "eval_loss": 4.5}, {"step": 3, "loss": 3.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 4, "lo')
    answers = tmp_path / "eval_answers.jsonl"  # each evaluation's answers: kept up to the checkpoint's step too
    answers.write_text("".join(json.dumps({"step": step, "index": 0, "answer": "a", "expected": "b"}) + "\n"
                               for step in (0, 2, 4)))
    settings = LoggingSettings(tensorboard=False, progress=False)
    logger = MetricsLogger(tmp_path, settings, {}, total_steps=4, resume_step=2)
    logger.log({"step": 3, "loss": 3.5, "lr": 1e-3})
    logger.answers(4, [{"index": 0, "answer": "c", "expected": "b"}])
    logger.close()
    assert read_metrics(path) == [*lines[:4], {"step": 3, "loss": 3.5, "lr": 1e-3}]
    assert [(row["step"], row["answer"]) for row in read_metrics(answers)] == [(0, "a"), (2, "a"), (4, "c")]
    MetricsLogger(tmp_path, settings, {}, total_steps=4, resume_step=0).close()  # resumed before any checkpoint
    assert read_metrics(path) == [] and read_metrics(answers) == []


@pytest.mark.parametrize("key, value, message", [
    ("beta1", 1.5, r"optim.beta1=1.5 must be in \[0, 1\)"),
    ("beta2", -0.1, r"optim.beta2=-0.1 must be in \[0, 1\)"),
    ("eps", 0.0, r"optim.eps=0.0 must be a finite number > 0"),
    ("weight_decay", -0.1, r"optim.weight_decay=-0.1 must be a finite number >= 0"),
    ("weight_decay", float("nan"), r"optim.weight_decay=nan must be a finite number >= 0"),
    ("min_lr_ratio", -0.5, r"optim.min_lr_ratio=-0.5 must be in \[0, 1\]"),
    ("min_lr_ratio", float("nan"), r"optim.min_lr_ratio=nan must be in \[0, 1\]"),
])
def test_optimizer_settings_out_of_range_are_one_clear_error(key, value, message):
    """torch raised a bare ValueError for some (a beta of 1.5) and took others silently: eps=0 divides 0 by 0 for a
    gradient that is exactly zero, and a negative or NaN min_lr_ratio turns the decayed learning rate negative or
    NaN (gradient ascent, NaN weights)."""
    from dataclasses import replace

    from gemma3vl.train.config import OptimSettings
    from gemma3vl.train.schedule import build_optimizer

    with pytest.raises(Gemma3VLError, match=message):
        build_optimizer(torch.nn.Linear(3, 2), replace(OptimSettings(), **{key: value}), torch.device("cpu"))


def test_schedule_is_linear_warmup_then_transformers_cosine_with_a_floor():
    """docs/training.md's formula; the oracle for the decay is transformers' get_cosine_schedule_with_warmup."""
    from transformers import get_cosine_schedule_with_warmup

    from gemma3vl.train.schedule import schedule_factor

    for warmup, steps, floor in [(0, 7, 0.1), (3, 10, 0.1), (2, 3, 0.0), (4, 4, 0.5), (5, 3, 0.1)]:
        reference = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                                                    warmup, steps).lr_lambdas[0]
        for step in range(steps):
            expected = (step + 1) / warmup if step < warmup else floor + (1 - floor) * reference(step)
            assert schedule_factor(step, warmup_steps=warmup, total_steps=steps, min_ratio=floor) == pytest.approx(
                expected, rel=1e-12, abs=1e-15)


def test_linear_and_constant_schedules_decay_as_transformers_ones():
    """``optim.schedule=linear`` / ``constant``: after our warmup, transformers' get_linear_schedule_with_warmup
    (above the floor) and get_constant_schedule_with_warmup (the oracles); the run's scheduler follows the setting."""
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    from gemma3vl.train.config import OptimSettings
    from gemma3vl.train.schedule import build_scheduler, schedule_factor

    def sgd():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    for warmup, steps, floor in [(0, 7, 0.1), (3, 10, 0.1), (2, 3, 0.0), (4, 4, 0.5), (5, 3, 0.1)]:
        linear = get_linear_schedule_with_warmup(sgd(), warmup, steps).lr_lambdas[0]
        constant = get_constant_schedule_with_warmup(sgd(), warmup).lr_lambdas[0]
        for step in range(steps):
            warming = step < warmup
            for schedule, expected in (("linear", floor + (1 - floor) * linear(step)), ("constant", constant(step))):
                got = schedule_factor(step, schedule=schedule, warmup_steps=warmup, total_steps=steps,
                                      min_ratio=floor)
                assert got == pytest.approx((step + 1) / warmup if warming else expected, rel=1e-12, abs=1e-15)
    settings = OptimSettings(lr=2.0, warmup_steps=2, schedule="linear", min_lr_ratio=0.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=settings.lr)
    scheduler, rates = build_scheduler(optimizer, settings, total_steps=6), []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1.0, 2.0, 2.0, 1.5, 1.0, 0.5])  # the peak at steps W and W + 1, then down to 0


def test_a_frozen_part_keeps_its_adapters_frozen_too(tmp_path):
    """LoRA on the text decoder and the vision tower with ``train.freeze_language=true``: only the vision adapters
    train (the text ones were made trainable again by the adapters, after the freeze)."""
    from safetensors.torch import load_file

    from gemma3vl.cli import main

    out = tmp_path / "run"
    assert main(["train", "--recipe", "tiny_peft", "--out", str(out), "train.steps=1", "optim.warmup_steps=0",
                 "train.eval_every=0", "peft.include_vision=true", "train.freeze_language=true"]) == 0
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    text_b = [v for k, v in adapter.items() if "language_model" in k and "lora_B" in k]
    vision_b = [v for k, v in adapter.items() if "vision_tower" in k and "lora_B" in k]
    assert text_b and vision_b
    assert all(not v.any() for v in text_b)  # B starts at zero and never moved
    assert any(v.any() for v in vision_b)


def test_a_checkpoint_with_a_siglip_pooling_head_trains_and_exports_it_unchanged(tmp_path, capsys):
    """``vision_use_head: true`` (transformers' default): the head Gemma 3 never runs is carried through a full
    fine-tuning run untouched, and the export loads in transformers with every key (verify: its logits are ours).
    The same checkpoint's ``attention_dropout`` (which gemma3vl does not apply) is said, not ignored silently."""
    from safetensors.torch import load_file

    from conftest import build_reference
    from gemma3vl.tiny import tiny_hf_config
    from gemma3vl.tiny_tokenizer import write_tokenizer_and_processor

    raw = tiny_hf_config()
    raw["vision_config"]["vision_use_head"] = True
    raw["text_config"]["attention_dropout"] = 0.1
    base, out = tmp_path / "base", tmp_path / "run"
    build_reference(raw, 0).save_pretrained(base)
    write_tokenizer_and_processor(base, raw)
    assert main(["train", "--recipe", "tiny_sft", "--model", str(base), "--out", str(out), "train.steps=1",
                 "optim.warmup_steps=0", "train.eval_every=0", "logging.progress=false"]) == 0
    assert "text_config.attention_dropout=0.1; gemma3vl trains without attention dropout" in capsys.readouterr().err
    before, after = load_file(base / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert sorted(before) == sorted(after)
    head = [key for key in before if ".head." in key]
    assert len(head) == 11 and all(torch.equal(before[key], after[key]) for key in head)
    assert any(not torch.equal(before[key], after[key]) for key in before if key not in head)  # it trained
    assert main(["verify", str(out / "hf"), "--greedy-tokens", "0"]) == 0


def test_the_loss_plot_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    """plot_losses draws on its own Figure: a notebook that fine-tunes keeps its backend (no matplotlib.use)."""
    import matplotlib

    from gemma3vl.train.metrics import plot_losses

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in (1, 2, 3))
                       + json.dumps({"step": 3, "eval_loss": 1.5}) + "\n")
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        assert plot_losses(metrics, tmp_path / "loss.png") == tmp_path / "loss.png"
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_seq_length_past_the_models_context_is_refused_before_it_loads(tmp_path, capsys):
    """``train.seq_length`` over ``max_position_embeddings``: positions the model never saw (and on the CPU a dense
    mask that got the process killed without a word): an error naming both, before the model loads."""
    from gemma3vl.tiny import tiny_hf_config

    context = tiny_hf_config()["text_config"]["max_position_embeddings"]
    assert main(["train", "--recipe", "tiny_sft", "--out", str(tmp_path / "run"), *FAST,
                 f"train.seq_length={context + 1}"]) == 2
    err = capsys.readouterr().err
    assert f"train.seq_length={context + 1} is over the model's context of {context} tokens" in err
    assert "model:" not in err  # (nothing loaded)
