"""Clipping folded into the fused AdamW kernel (``optim.fused=true``, one process) is the same step as clipping the
gradients and then stepping: ``gemma3vl.train.schedule.clip_in_fused_step``."""

import pytest
import torch

from gemma3vl.train.config import build_config
from gemma3vl.train.run import build_trainer

FAST = [
    "train.seq_length=128", "train.global_batch_size=2", "train.micro_batch_size=1", "logging.progress=false",
    "logging.tensorboard=false", "data.eval_accuracy_samples=0", "optim.lr=0.01", "optim.warmup_steps=0",
    "optim.fused=true",
]


def two_steps(tmp_path, grad_clip: float, fold: bool):
    cfg = build_config("tiny_sft", overrides=[*FAST, "train.steps=2", f"train.grad_clip={grad_clip}",
                                              f"out={tmp_path}"])
    cfg.data.eval_path = None
    torch.manual_seed(0)
    trainer, _ = build_trainer(cfg, tmp_path)
    assert trainer.fold_clipping  # fused AdamW in one process
    trainer.fold_clipping = fold  # False: torch's clip_grad_norm_, then the same fused optimizer's step
    records = [trainer.train_step() for _ in range(2)]
    state = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    moments = [v.clone() for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return records, state, moments


@pytest.mark.parametrize("grad_clip", [1e-3, 1e9])
def test_folded_clipping_is_clip_then_step(tmp_path, grad_clip):
    """1e-3 clips every step (the kernel divides by norm / max_norm: equal to the last bit of the scale); 1e9 never
    clips (scale 1: the same arithmetic exactly)."""
    folded_records, folded, folded_moments = two_steps(tmp_path / "folded", grad_clip, fold=True)
    plain_records, plain, plain_moments = two_steps(tmp_path / "plain", grad_clip, fold=False)
    exact = grad_clip > 1
    first, second = folded_records[0], plain_records[0]
    assert first["loss"] == second["loss"] and first["grad_norm"] == second["grad_norm"]
    assert first["grad_norm"] > 1e-3  # the small clip did clip
    for got, want in zip(folded_records, plain_records):  # the second step starts from last-bit-close weights
        assert not got.get("skipped")
        assert got["loss"] == (want["loss"] if exact else pytest.approx(want["loss"], rel=1e-6))
        assert got["grad_norm"] == (want["grad_norm"] if exact else pytest.approx(want["grad_norm"], rel=1e-5))
    for name, tensor in plain.items():
        if exact:
            assert torch.equal(folded[name], tensor), name
        else:
            torch.testing.assert_close(folded[name], tensor, rtol=1e-5, atol=1e-6)
    # AdamW's update hardly depends on the gradients' scale; its moments do (exp_avg is (1 - beta1) x the clipped
    # gradient): they show that the kernel clipped, and by how much.
    assert len(folded_moments) == len(plain_moments)
    for got, want in zip(folded_moments, plain_moments):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9 if not exact else 0)


def test_the_unfused_optimizer_does_not_fold(tmp_path):
    cfg = build_config("tiny_sft", overrides=[*FAST[:-1], "optim.fused=false", f"out={tmp_path}"])
    cfg.data.eval_path = None
    trainer, _ = build_trainer(cfg, tmp_path)
    assert not trainer.fold_clipping


@pytest.mark.parametrize("dtype,autocast", [("auto", True), ("float32", False), ("bfloat16", True)])
def test_model_dtype_float32_turns_autocast_off(tmp_path, monkeypatch, dtype, autocast):
    """``model.dtype=float32`` computes in float32: the training step (and the held-out loss) ask for no bf16
    autocast; ``auto`` does (it applies on CUDA to float32 weights). On a CUDA device ``autocast_for`` then gives
    torch.autocast or nothing."""
    from gemma3vl.train import trainer as trainer_module

    asked = []
    real = trainer_module.autocast_for

    def recording(model, device, enabled=True):
        asked.append(enabled)
        return real(model, device, enabled)

    monkeypatch.setattr(trainer_module, "autocast_for", recording)
    cfg = build_config("tiny_sft", overrides=[*FAST, "train.steps=1", f"model.dtype={dtype}", f"out={tmp_path}"])
    trainer, _ = build_trainer(cfg, tmp_path)
    trainer.train_step()
    trainer.evaluator.loss(trainer.model)
    assert asked and set(asked) == {autocast}
    model = torch.nn.Linear(2, 2)
    cuda = torch.device("cuda")
    assert isinstance(real(model, cuda, True), torch.autocast)
    assert not isinstance(real(model, cuda, False), torch.autocast)
