"""``optim.cpu_offload``: AdamW with its state on the host (``gemma3vl.train.schedule.HostOffloadAdamW``).

The oracle is ``torch.optim.AdamW`` itself: on fp32 parameters the offloaded optimizer must take the very same
steps, and on bf16 parameters it must give what AdamW over fp32 master weights gives, rounded to bf16 (exactly:
both run torch's fused CPU kernel, ``fused=True``). A DCP
checkpoint of it resumes to the same next step. CPU only: on a GPU the same code adds the two copies.
"""

from __future__ import annotations

import torch

from gemma3vl.train.config import OptimSettings
from gemma3vl.train.schedule import HostOffloadAdamW, build_optimizer, build_scheduler


def small_model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    return model.to(dtype)


def train(model, optimizer, steps: int, scheduler=None, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs = torch.randn(4, 6, generator=generator).to(next(model.parameters()).dtype)
        optimizer.zero_grad(set_to_none=True)
        model(inputs).float().square().mean().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


SETTINGS = dict(lr=1e-2, weight_decay=0.1, beta1=0.8, beta2=0.95, eps=1e-6, warmup_steps=2, min_lr_ratio=0.1)


def test_same_steps_as_torch_adamw_with_decay_groups_and_schedule():
    ours, reference = small_model(), small_model()
    settings = OptimSettings(**SETTINGS, cpu_offload=True)
    optimizer = build_optimizer(ours, settings, torch.device("cpu"))
    assert isinstance(optimizer, HostOffloadAdamW)
    plain = build_optimizer(reference, OptimSettings(**SETTINGS), torch.device("cpu"))
    assert isinstance(plain, torch.optim.AdamW)
    train(ours, optimizer, 5, build_scheduler(optimizer, settings, 10))
    train(reference, plain, 5, build_scheduler(plain, settings, 10))
    for mine, theirs in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)


def test_bf16_weights_train_on_fp32_masters():
    ours, reference = small_model(torch.bfloat16), small_model(torch.bfloat16).float()
    optimizer = HostOffloadAdamW(ours.parameters(), lr=1e-3, weight_decay=0.0)
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    # One step on the same gradients: the fp32 reference's update rounded to bf16, not a bf16 AdamW's.
    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(p.shape, generator=generator) for p in reference.parameters()]
    for _ in range(3):
        for mine, theirs, grad in zip(ours.parameters(), reference.parameters(), grads):
            mine.grad, theirs.grad = grad.bfloat16(), grad.bfloat16().float()
        optimizer.step()
        plain.step()
    for mine, theirs in zip(ours.parameters(), reference.parameters()):
        assert mine.dtype == torch.bfloat16
        assert torch.equal(mine, theirs.bfloat16())
        assert optimizer.state[mine]["master"].dtype == torch.float32
        torch.testing.assert_close(optimizer.state[mine]["master"], theirs, rtol=0, atol=0)


def test_checkpoint_resumes_to_the_same_step(tmp_path):
    from gemma3vl.train.checkpoint import load_checkpoint, save_checkpoint

    settings = OptimSettings(**SETTINGS, cpu_offload=True)
    model = small_model()
    optimizer = build_optimizer(model, settings, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, settings, 10)
    train(model, optimizer, 3, scheduler)
    path = save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {})
    train(model, optimizer, 2, scheduler, seed=7)
    expected = [p.detach().clone() for p in model.parameters()]

    resumed = small_model()
    optimizer2 = build_optimizer(resumed, settings, torch.device("cpu"))
    scheduler2 = build_scheduler(optimizer2, settings, 10)
    load_checkpoint(path, resumed, optimizer2, scheduler2)
    state = next(iter(optimizer2.state.values()))
    assert state["exp_avg"].device.type == "cpu" and state["master"].dtype == torch.float32
    train(resumed, optimizer2, 2, scheduler2, seed=7)
    for got, want in zip(resumed.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
