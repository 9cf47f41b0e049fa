"""Optimizer and learning-rate schedule: AdamW (fused on CUDA), linear warmup then a cosine (default), linear or
no decay (``optim.schedule``).

``optim.cpu_offload`` swaps AdamW for :class:`HostOffloadAdamW`, which keeps the optimizer's state on the host.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.adam import adam

from gemma3vl.errors import Gemma3VLError
from gemma3vl.parallel.distributed import total_grad_norm
from gemma3vl.train.config import SCHEDULES, OptimSettings


def schedule_factor(step: int, *, schedule: str = "cosine", warmup_steps: int, total_steps: int,
                    min_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based) of ``total_steps`` (``N``).

    Warmup: step ``s < W`` trains at ``(s + 1) / W`` (the last warmup step at the peak). Then, from the peak at step
    ``W`` towards ``min_ratio`` (``r``), with ``p = (s - W) / (N - W)``: ``cosine``, the cosine of transformers'
    ``get_cosine_schedule_with_warmup``, ``r + (1 - r) * (1 + cos(pi * p)) / 2``; ``linear``, that of
    ``get_linear_schedule_with_warmup``, ``r + (1 - r) * (1 - p)``; ``constant`` (``get_constant_schedule_with_warmup``)
    stays at the peak. The decays would reach ``r`` at step ``N``, one past the last (so with ``r = 0`` the last
    step still trains); with ``W >= N`` the run ends inside the warmup."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    if schedule != "cosine":
        raise Gemma3VLError(f"optim.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))



class HostOffloadAdamW(torch.optim.Optimizer):
    """AdamW whose state lives in host memory: per trained parameter an fp32 master copy and the two moments
    (12 bytes, vs 4 to 12 on the GPU for plain AdamW), with the update computed by the CPU.

    For full fine-tuning where weights + gradients fit on one GPU but the optimizer does not (the 27B: 54 GB of
    bf16 weights, 54 GB of gradients, 216 GB of fp32 AdamW state). Each ``step`` copies the gradients to the host,
    runs torch's AdamW kernel (``decoupled_weight_decay``, the same arithmetic as ``torch.optim.AdamW``) on the
    fp32 masters, and copies the masters back into the parameters (rounded to their dtype): bf16 weights then train
    as if with fp32 master weights (torch's fused CPU AdamW kernel, ``fused=True``). The cost is the transfers and a
    CPU pass over the state every step: worth it
    when the step is long (large models, long sequences), not for short steps of small models.

    The parameter groups hold the model's own parameters, so gradient clipping, the LR scheduler and DCP
    checkpoints (state keyed by parameter name) see an ordinary optimizer; the state tensors stay on the host
    through ``load_state_dict`` (``torch.optim.Optimizer`` would move them to the parameters' device and dtype).
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        from torch.distributed.tensor import DTensor

        if any(isinstance(param, DTensor) for group in self.param_groups for param in group["params"]):
            raise Gemma3VLError("optim.cpu_offload keeps whole parameters' state on the host of one process; under "
                                "FSDP use parallel.cpu_offload instead")

    def _host_state(self, param: torch.Tensor) -> dict[str, Any]:
        state = self.state[param]
        if not state:
            master = torch.empty(param.shape, dtype=torch.float32, device="cpu", pin_memory=_can_pin(param))
            master.copy_(param.detach())
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["master"] = master
            state["exp_avg"] = torch.zeros_like(master)
            state["exp_avg_sq"] = torch.zeros_like(master)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, masters, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], [], []
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._host_state(param)
                params.append(param)
                masters.append(state["master"])
                grads.append(param.grad.to("cpu", torch.float32))
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adam(  # torch's fused CPU kernel: 0.10 s vs 0.87 s for the single-tensor loop, 101M params, 2 cores
                masters, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True, decoupled_weight_decay=True,
                amsgrad=False, beta1=beta1, beta2=beta2, lr=float(group["lr"]), weight_decay=group["weight_decay"],
                eps=group["eps"], maximize=False,
            )
            for param, master in zip(params, masters):
                param.copy_(master, non_blocking=master.is_pinned())
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore hyperparameters and state (saved ids matched to parameters by order, as torch does), keeping
        every state tensor on the host in fp32."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(saved["params"]) != len(group["params"]) for saved, group in zip(saved_groups, self.param_groups)
        ):
            raise Gemma3VLError("the saved optimizer state has other parameter groups than this model's trainable "
                                "parameters (different peft/freeze settings?)")
        by_id = {}
        for saved, group in zip(saved_groups, self.param_groups):
            by_id.update(zip(saved["params"], group["params"]))
            group.update({key: value for key, value in saved.items() if key != "params"})
        self.state.clear()
        for saved_id, saved_state in state_dict["state"].items():
            param = by_id[saved_id]
            self.state[param] = {
                key: value.detach().to("cpu", torch.float32).clone() if torch.is_tensor(value) else value
                for key, value in saved_state.items()
            }


def _can_pin(param: torch.Tensor) -> bool:
    """Pinned host memory makes the copy back to a GPU asynchronous; it exists only beside CUDA."""
    return param.device.type == "cuda"


def check_optim_settings(settings: OptimSettings) -> None:
    """The ``optim.*`` values AdamW and the schedule can use, each refused naming its key: torch would raise a bare
    ``ValueError`` for some (a beta of 1.5) and silently accept others (``eps=0`` divides 0 by 0 for a gradient
    that is exactly zero; a NaN, negative or above-1 ``min_lr_ratio`` makes the learning rate NaN, negative or
    higher than the peak as the cosine decays)."""
    ranges = {
        "optim.lr": (settings.lr, 0.0 < settings.lr < math.inf, "a finite number > 0"),
        "optim.weight_decay": (settings.weight_decay, 0.0 <= settings.weight_decay < math.inf,
                               "a finite number >= 0"),
        "optim.beta1": (settings.beta1, 0.0 <= settings.beta1 < 1.0, "in [0, 1)"),
        "optim.beta2": (settings.beta2, 0.0 <= settings.beta2 < 1.0, "in [0, 1)"),
        "optim.eps": (settings.eps, 0.0 < settings.eps < math.inf, "a finite number > 0"),
        "optim.min_lr_ratio": (settings.min_lr_ratio, 0.0 <= settings.min_lr_ratio <= 1.0, "in [0, 1]"),
        "optim.warmup_steps": (settings.warmup_steps, settings.warmup_steps >= 0, ">= 0"),
    }
    for key, (value, ok, kind) in ranges.items():
        if not ok:
            raise Gemma3VLError(f"{key}={value} must be {kind}")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether AdamW's weight decay applies to a parameter: matrices (and stacks of them) only, never a norm's
    weight or a bias, whatever its native shape."""
    return param.ndim >= 2 and name.rsplit(".", 1)[-1] != "bias"


def build_optimizer(
    model: torch.nn.Module, settings: OptimSettings, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on norms, biases and 1-D parameters.

    A bias is told by its name, not its shape: the SigLIP tower's q/k/v biases are stacked into one native
    ``[3, hidden]`` tensor (``vision.layers.N.attn.qkv.bias``), 2-D but three of transformers' 1-D biases.

    ``settings.cpu_offload``: :class:`HostOffloadAdamW` (state on the host) instead of ``torch.optim.AdamW``."""
    check_optim_settings(settings)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    if not decay and not no_decay:
        raise Gemma3VLError("nothing to train: every parameter is frozen (check train.freeze_* and peft.*)")
    fused = device.type == "cuda" if settings.fused == "auto" else settings.fused == "true"
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if settings.cpu_offload:
        return HostOffloadAdamW([g for g in groups if g["params"]], lr=settings.lr,
                                betas=(settings.beta1, settings.beta2), eps=settings.eps)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=settings.lr,
        betas=(settings.beta1, settings.beta2),
        eps=settings.eps,
        fused=fused or None,
    )


def folds_clipping(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is torch's fused AdamW, whose kernel can clip and skip (below); its parameters may be
    DTensors (FSDP, TP): the kernel then runs on each rank's shards with the same scale and flag."""
    return type(optimizer) is torch.optim.AdamW and all(group.get("fused") for group in optimizer.param_groups)


def clip_in_fused_step(
    optimizer: torch.optim.AdamW, parameters: list[torch.nn.Parameter], max_norm: float, loss: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient clipping to ``max_norm`` and the optimizer step in one pass over the gradients, queued without
    waiting for the device. Returns (the gradient norm, whether the update was applied), both on the device.
    ``loss`` must be the same on every rank (the step's summed loss), so that all ranks skip together.

    The norm is ``torch.nn.utils.clip_grad_norm_``'s; instead of scaling every gradient by ``max_norm / (norm +
    1e-6)`` (a read and a write of all of them) the fused AdamW kernel divides each gradient by the inverse as it
    reads it (``grad_scale``, the hook AMP's GradScaler uses), and where the loss or the norm is not finite it skips
    the whole update and restores its step count (``found_inf``). The result equals clipping then stepping to the
    last bit of the scale; an unclipped step (scale 1) is the same arithmetic exactly.
    """
    norm = total_grad_norm(parameters)  # the whole model's (every rank the same value under FSDP / TP)
    applied = torch.isfinite(norm) & torch.isfinite(loss)
    optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)
    optimizer.found_inf = (~applied).float()
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
    return norm, applied


def build_scheduler(optimizer: torch.optim.Optimizer, settings: OptimSettings, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: schedule_factor(step, schedule=settings.schedule, warmup_steps=settings.warmup_steps,
                                     total_steps=total_steps, min_ratio=settings.min_lr_ratio),
    )
