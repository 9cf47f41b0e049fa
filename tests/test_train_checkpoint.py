"""Training checkpoints: atomic, complete-marked, never unpickling code, clear errors on a full disk."""

import errno
import pickle

import pytest
import torch

from gemma3vl.errors import Gemma3VLError
from gemma3vl.train import checkpoint as ckpt


def make_state(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, optimizer, scheduler = make_state(0)
    path = ckpt.save_checkpoint(tmp_path, 7, model, optimizer, scheduler, {"position": 3})
    expected_rng = torch.rand(3)
    other, other_opt, other_sched = make_state(1)
    torch.rand(5)
    state = ckpt.load_checkpoint(path, other, other_opt, other_sched)
    assert state["step"] == 7 and state["data"] == {"position": 3}
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])
    assert other_sched.last_epoch == scheduler.last_epoch
    assert torch.equal(torch.rand(3), expected_rng)


def test_keep_last_and_incomplete_checkpoints_are_ignored(tmp_path):
    model, optimizer, scheduler = make_state()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, scheduler, {}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    broken = tmp_path / "step-00000009"
    broken.mkdir()  # looks like a checkpoint, but has no COMPLETE marker (a save killed half-way)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
    with pytest.raises(Gemma3VLError, match="not a complete training checkpoint"):
        ckpt.load_checkpoint(broken, model, optimizer, scheduler)


class _Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(MARKER["path"]),))


MARKER = {}


def test_metadata_that_would_run_code_is_refused(tmp_path):
    model, optimizer, scheduler = make_state()
    path = ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {})
    MARKER["path"] = str(tmp_path / "pwned")
    (path / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(Gemma3VLError, match="refused, not plain DCP metadata"):
        ckpt.load_checkpoint(path, model, optimizer, scheduler)
    assert not (tmp_path / "pwned").exists()


def test_full_disk_leaves_earlier_checkpoints_and_no_partial_directory(tmp_path, monkeypatch):
    model, optimizer, scheduler = make_state()
    ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.dcp, "save", no_space)
    with pytest.raises(Gemma3VLError, match="No space left on device.*earlier checkpoints are untouched"):
        ckpt.save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {})
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000001"


def test_resuming_with_fewer_trained_weights_is_one_clear_error(tmp_path):
    """A DoRA run resumed with peft.method=lora: the checkpoint holds magnitudes this model does not train. DCP
    ignored them and the first step then failed deep in the LR scheduler (``zip() argument 2 is longer``);
    now loading refuses, naming a weight and the settings to keep. The original settings still resume."""
    from gemma3vl.train.config import build_config
    from gemma3vl.train.run import build_trainer

    def trainer(method: str):
        cfg = build_config("tiny_peft", overrides=[
            f"peft.method={method}", "train.seq_length=128", "train.global_batch_size=2", "train.micro_batch_size=1",
            "logging.progress=false", f"out={tmp_path}"])
        cfg.data.eval_path = None
        return build_trainer(cfg, tmp_path)[0]

    first = trainer("dora")
    first.train_step()
    path = first.save()
    with pytest.raises(Gemma3VLError, match=r"trained weight\(s\) this model does not train, e.g. .*magnitude"):
        trainer("lora").resume(path)
    again = trainer("dora")
    again.resume(path)
    assert again.step == 1
    again.train_step()


def test_a_resumed_run_trains_with_its_own_learning_rate_and_weight_decay(tmp_path):
    """docs/training.md: the learning rate may change on resume. The checkpoint's optimizer state also held the
    learning rate, weight decay and schedule peak it was saved with, and they silently won over the resumed run's
    ``optim.lr`` / ``optim.weight_decay``; the moments and the schedule's position are still the checkpoint's."""
    from gemma3vl.train.config import build_config
    from gemma3vl.train.run import build_trainer
    from gemma3vl.train.schedule import schedule_factor

    def trainer(*overrides: str):
        cfg = build_config("tiny_sft", overrides=[
            "train.seq_length=128", "train.global_batch_size=2", "train.micro_batch_size=1", "train.steps=6",
            "optim.warmup_steps=2", "logging.progress=false", f"out={tmp_path}", *overrides])
        cfg.data.eval_path = None
        return build_trainer(cfg, tmp_path)[0]

    first = trainer("optim.lr=3e-3", "optim.weight_decay=0.1")
    first.train_step()
    first.train_step()
    path = first.save()
    moments = {k: v.clone() for k, v in first.optimizer.state[first.optimizer.param_groups[0]["params"][0]].items()}
    resumed = trainer("optim.lr=1e-3", "optim.weight_decay=0.0")
    resumed.resume(path)
    state = resumed.optimizer.state[resumed.optimizer.param_groups[0]["params"][0]]
    assert all(torch.equal(state[k], moments[k]) for k in moments)
    assert resumed.scheduler.last_epoch == 2
    assert [group["weight_decay"] for group in resumed.optimizer.param_groups] == [0.0, 0.0]
    record = resumed.train_step()
    assert record["lr"] == 1e-3 * schedule_factor(2, warmup_steps=2, total_steps=6, min_ratio=0.1)
    assert resumed.train_step()["lr"] == 1e-3 * schedule_factor(3, warmup_steps=2, total_steps=6, min_ratio=0.1)
