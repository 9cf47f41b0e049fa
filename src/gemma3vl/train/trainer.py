"""One training loop for full SFT and LoRA/DoRA.

Each optimizer step takes ``train.global_batch_size`` rows, split into micro-batches of
``train.micro_batch_size``; the loss is the token-weighted mean over the whole step (every micro-batch's
summed loss is divided by the step's total number of target tokens), so accumulation gives exactly the
gradient of one big batch. Gradients are clipped to ``train.grad_clip``; AdamW with warmup + cosine.

A step whose loss or gradient norm is not finite (inf/NaN) changes no weight: the update is skipped, the
step is logged with ``skipped: true`` and the source lines of its conversations, and the run stops with an
error after ``train.max_nonfinite_steps`` such steps in a row — never a silently NaN model.

Precision: on CUDA the parameters stay float32 (master weights) and the forward runs under bf16 autocast;
``model.dtype=bfloat16`` keeps the weights themselves in bf16 (half the memory, no fp32 master copy), and
``model.dtype=float32`` computes in float32 (no autocast).
On the CPU everything is float32.

Under ``torchrun`` (``parallel`` given) each data-parallel rank runs its own micro-batches, and the step's
target-token count is summed over the ranks before any backward, so every rank divides by the count of the
whole global batch and the summed gradients are exactly one process's. Logged numbers are sums over the ranks.

Data: during :meth:`Trainer.run` the next ``data.prefetch`` steps of micro-batches are built by a background thread
(``gemma3vl.data.prefetch``) while the current step trains: the same steps in the same order, with checkpoints at
the position of the steps trained on. Each rank has its own thread over its own share of the data (it runs no
collective); the pipeline and context-parallel layouts take their steps from it too. The held-out evaluation reads
its own data on the main thread, with the thread paused. ``train_step`` called outside ``run`` (before it) reads
synchronously.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gemma3vl.data.batch import Batch
from gemma3vl.data.prefetch import PrefetchFeed
from gemma3vl.errors import Gemma3VLError
from gemma3vl.model import Gemma3Model
from gemma3vl.parallel.context import ContextParallelBatch
from gemma3vl.parallel.distributed import ParallelContext, clip_grad_norm_
from gemma3vl.train.checkpoint import agreed_checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from gemma3vl.train.config import TrainConfig
from gemma3vl.train.flops import batch_step_flops
from gemma3vl.train.metrics import MetricsLogger, peak_flops_per_second
from gemma3vl.train.schedule import build_optimizer, build_scheduler, clip_in_fused_step, folds_clipping
from gemma3vl.train.steps import StepFeed


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    history: list[dict[str, Any]]


class TrainingStopped(Gemma3VLError):
    """The run stopped early on SIGTERM or SIGINT, after saving a checkpoint of its last whole step."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # what a shell reports for a process the signal ended: 143, 130


class StopSignals:
    """While training: SIGTERM (a scheduler's preemption, ``kill``, ``docker stop``) or SIGINT (Ctrl-C) asks the run
    to stop after the step in progress, with a checkpoint; a second SIGINT stops at once (``KeyboardInterrupt``).
    Only the main thread can install handlers; elsewhere the signals keep their usual meaning."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, note=None):
        self.received: int | None = None
        self._note = note
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        if self._note is not None:
            self._note(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint (a second Ctrl-C "
                       "stops at once, without one)")

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def freeze(model: Gemma3Model, cfg: TrainConfig) -> None:
    parts = {
        "vision": (cfg.train.freeze_vision, model.vision),
        "projector": (cfg.train.freeze_projector, model.projector),
        "language": (cfg.train.freeze_language, model.text),
    }
    for _, (frozen, module) in parts.items():
        if frozen and module is not None:
            for param in module.parameters():
                param.requires_grad_(False)


def drop_image_gradients(model: Gemma3Model) -> None:
    """For a step in which no rank saw an image: the vision tower and projector get no gradient, so AdamW leaves
    them as they are, as transformers does in one process (the tower never ran). The sharded layouts computed a
    zero gradient for them (every rank must reduce the same tensors; pipeline stage 0 likewise), on which AdamW
    would still move them by their momentum and weight decay."""
    for part in (getattr(model, "vision", None), getattr(model, "projector", None)):
        for param in part.parameters() if part is not None else ():
            param.grad = None


def autocast_for(model: Gemma3Model, device: torch.device, enabled: bool = True):
    """bf16 autocast over fp32 master weights on CUDA (``model.dtype=auto``); nothing on CPU, for bf16 weights, or
    when not ``enabled`` (``model.dtype=float32``: float32 compute)."""
    if enabled and device.type == "cuda" and next(model.parameters()).dtype == torch.float32:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def uses_autocast(cfg: TrainConfig) -> bool:
    """Whether the forward runs under bf16 autocast where the weights are float32 on CUDA: yes for
    ``model.dtype=auto``; ``float32`` asks for float32 compute."""
    return cfg.model.dtype != "float32"


def step_loss(model: Gemma3Model, batch: Batch | ContextParallelBatch, device: torch.device,
              autocast: bool = True) -> tuple[torch.Tensor, int]:
    batch = batch.to(device)
    with autocast_for(model, device, autocast):
        if isinstance(batch, ContextParallelBatch):  # parallel.cp > 1: this rank's slice of every row
            return batch.loss(model)
        return model.loss(batch.input_ids, batch.targets, batch.info, batch.pixel_values)


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        model: Gemma3Model,
        batcher: StepFeed,
        out: Path,
        device: torch.device,
        evaluator=None,
        parallel: ParallelContext | None = None,
    ):
        self.cfg = cfg
        self.parallel = parallel
        self.model = model
        self.batcher = batcher
        self.prefetch: PrefetchFeed | None = None  # run() with data.prefetch > 0: its prefetcher (closed after)
        self.out = out
        self.device = device
        self.evaluator = evaluator
        self.optimizer = build_optimizer(model, cfg.optim, device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.step = 0
        self.autocast = uses_autocast(cfg)
        self.last_eval: dict[str, Any] = {}
        self.pipeline = getattr(model, "pipeline", None)  # parallel.pp > 1: gemma3vl.parallel.pipeline.Pipeline
        # torch's fused AdamW (not under pipeline stages, whose norm sums the tied embedding's copies): clipping and
        # the non-finite skip happen inside its kernel.
        self.fold_clipping = self.pipeline is None and folds_clipping(self.optimizer)
        self.world_size = parallel.dims.world_size if parallel is not None else 1
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.peak_flops = peak_flops_per_second(device_name)
        # MFU counts the benchmark's model FLOPs (gemma3vl.train.flops): a LoRA'd or frozen decoder backpropagates
        # activations only (2 x forward), a frozen vision tower runs forward only.
        trains_base = cfg.peft.method == "none"
        self.flops_mode = "sft" if trains_base and not cfg.train.freeze_language else "peft"
        self.vision_trained = trains_base and not cfg.train.freeze_vision
        # adapters on the frozen tower: its backward computes activation gradients (2 x; its attention 3 x)
        self.vision_adapted = (not trains_base and cfg.peft.include_vision and not cfg.train.freeze_vision)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def feed(self) -> StepFeed | PrefetchFeed:
        """Where steps and the data position come from: the prefetcher once run() has started one (closed after
        the run, it still gives the position of the steps trained on, and refuses to hand out more: the batcher
        itself has read ahead), else the batcher itself."""
        return self.prefetch if self.prefetch is not None else self.batcher

    def save(self) -> Path:
        data = self.feed.state_dict()  # the position after the last step trained on
        if self.parallel is not None and self.parallel.dims.dp > 1:
            data = {"ranks": self.parallel.gather_over_dp(data)}  # each data-parallel rank reads its own share
        return save_checkpoint(
            self.checkpoint_root, self.step, self.model, self.optimizer, self.scheduler,
            {"batcher": data}, keep_last=self.cfg.checkpoint.keep_last,
        )

    def resume(self, path: Path | None) -> None:
        # Every rank resumes from the checkpoint rank 0 chose (a node's listing of a shared directory may lag).
        path = agreed_checkpoint(self.checkpoint_root, path or latest_checkpoint(self.checkpoint_root))
        if path is None:
            return
        settings = [{key: value for key, value in group.items() if key != "params"}
                    for group in self.optimizer.param_groups]  # this run's optim.* (lr, weight decay, betas, eps)
        base_lrs = list(self.scheduler.base_lrs)
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        self.step = int(state["step"])
        self.batcher.load_state_dict(state["data"]["batcher"])
        self._keep_run_settings(settings, base_lrs)

    def _keep_run_settings(self, settings: list[dict[str, Any]], base_lrs: list[float]) -> None:
        """After a checkpoint is loaded: the optimizer's moments and the schedule's position are the checkpoint's,
        its hyperparameters this run's. The checkpoint also restores the learning rate, weight decay, betas and eps
        it was saved with (and the schedule's peak), which would silently override a changed ``optim.lr``."""
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)
        self.scheduler.base_lrs = base_lrs
        position = self.scheduler.last_epoch  # the number of steps taken: the next step's multiplier
        for group, base, multiplier in zip(self.optimizer.param_groups, base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * multiplier(position)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # ------------------------------------------------------------------ the loop
    def train_step(self) -> dict[str, Any]:
        started = time.perf_counter()
        micro_batches = self.feed.next_step()
        total_targets = sum(b.num_target_tokens for b in micro_batches)
        total_tokens = sum(b.num_tokens for b in micro_batches)
        flops = batch_step_flops(self.model.config, micro_batches, self.flops_mode, vision_trained=self.vision_trained,
                                 vision_adapted=self.vision_adapted)
        images = sum(b.num_images for b in micro_batches)
        if self.parallel is not None:
            total_targets, total_tokens, flops, images = self.parallel.sum_over_batch(
                total_targets, total_tokens, flops, images)
            total_targets, total_tokens = int(total_targets), int(total_tokens)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.pipeline is not None:
            # The step's micro-batches go through the schedule in one call (forward and backward interleaved
            # across the stages); the tied embedding's two copies sum their gradients, and the gradient norm is
            # the whole model's (gemma3vl.parallel.pipeline).
            loss_sum = self.pipeline.train_step(micro_batches, total_targets)
            (loss_sum,) = self.parallel.sum_over_batch(loss_sum)
            if not images:
                drop_image_gradients(self.model)
            grad_norm = self.pipeline.clip_grad_norm_(self.cfg.train.grad_clip)
        else:
            # Summed on the device in float64 (what adding Python floats did), read once: a read per micro-batch
            # would make the host wait for each backward before it could queue the next micro-batch's forward.
            loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
            for batch in micro_batches:
                summed, _ = step_loss(self.model, batch, self.device, autocast=self.autocast)
                if summed.requires_grad:  # (not when only image parts train and this micro-batch has no image)
                    (summed / max(total_targets, 1)).backward()
                loss_total += summed.detach().double()
            if not images:
                drop_image_gradients(self.model)
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            if self.parallel is not None:  # the step's loss, the same on every rank (so that all skip together)
                loss_total = self.parallel.sum_over_batch_on_device(loss_total)
            if self.fold_clipping:
                grad_norm, applied = clip_in_fused_step(self.optimizer, trainable, self.cfg.train.grad_clip,
                                                        loss_total)
                finite = bool(applied)  # read once the update is queued: the device never waits for the host
            else:
                grad_norm = clip_grad_norm_(trainable, self.cfg.train.grad_clip)
            loss_sum = float(loss_total)
        lr = self.optimizer.param_groups[0]["lr"]
        if not self.fold_clipping:  # (folded: the update is queued already, or skipped by the kernel)
            finite = math.isfinite(loss_sum) and math.isfinite(float(grad_norm))
            if finite:
                self.optimizer.step()
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)  # the step's data is consumed; no weight changes
        self.scheduler.step()
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - started
        record = {
            "step": self.step,
            "loss": loss_sum / max(total_targets, 1),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": total_tokens / elapsed,
            "target_tokens": total_targets,
            "tokens": total_tokens,
            "step_time_s": elapsed,
        }
        if not finite:
            sources = [source for batch in micro_batches for row in batch.sources for source in row]
            if self.parallel is not None:
                sources = [source for part in self.parallel.gather_over_dp(sources) for source in part]
            record["skipped"] = True
            record["sources"] = sources
        record["mfu"] = flops / elapsed / (self.peak_flops * self.world_size) if self.peak_flops else None
        if self.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            import resource

            record["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return record

    def _evaluate(self, logger: MetricsLogger) -> dict[str, Any]:
        # (the held-out data shares the processor and its tokenizer with the training data's thread)
        with self.prefetch.paused() if self.prefetch is not None else nullcontext():
            result = self.evaluator(self.model)
        answers = result.pop("eval_answers", None)
        if answers:
            logger.answers(self.step, answers)
        logger.log({"step": self.step, **result})
        loss, accuracy = result.get("eval_loss"), result.get("eval_accuracy")
        shown = [f"loss {loss:.4f}" if loss is not None else "", f"accuracy {accuracy:.1%}" if accuracy is not None else ""]
        logger.note(f"eval at step {self.step}: " + ", ".join(s for s in shown if s))
        self.last_eval = result
        return result

    def run(self, logger: MetricsLogger) -> TrainResult:
        with StopSignals(logger.note) as stop, self._prefetching():
            return self._run(logger, stop)

    @contextmanager
    def _prefetching(self):
        """``data.prefetch`` steps built ahead by one thread, from the batcher's position (after any resume) until
        the run ends, however it ends."""
        if not self.cfg.data.prefetch:
            yield
            return
        if self.prefetch is not None:
            raise Gemma3VLError("this trainer has run with data.prefetch already, and its data has been read ahead "
                                "of the steps trained on: resume a new trainer from the checkpoint instead")
        self.prefetch = PrefetchFeed(self.batcher, self.cfg.data.prefetch)
        try:
            yield
        finally:
            self.prefetch.close()

    def _stop_requested(self, stop: StopSignals) -> bool:
        """Whether a stop signal reached this process or (under torchrun) any other: every rank stops at the
        same step, so their checkpoint is one whole step."""
        if self.parallel is not None:
            return self.parallel.any_rank(stop.received is not None)
        return stop.received is not None

    def _run(self, logger: MetricsLogger, stop: StopSignals) -> TrainResult:
        cfg = self.cfg
        last_loss = None
        if self.evaluator is not None and self.step == 0:
            self._evaluate(logger)
        nonfinite_in_a_row = 0
        while self.step < cfg.train.steps:
            record = self.train_step()
            last_loss = record["loss"]
            logger.advance()
            skipped = bool(record.get("skipped"))
            if skipped or self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                logger.log(record)
            if skipped:
                nonfinite_in_a_row += 1
                logger.note(
                    f"step {self.step}: loss {record['loss']} / gradient norm {record['grad_norm']} is not finite; "
                    f"update skipped ({nonfinite_in_a_row} in a row). The step's conversations: "
                    + ", ".join(record["sources"][:20]) + (" ..." if len(record["sources"]) > 20 else "")
                )
                if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    raise Gemma3VLError(
                        f"stopping at step {self.step}: {nonfinite_in_a_row} steps in a row had a non-finite loss or "
                        f"gradient (train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); no weight was updated "
                        f"by them. Lower optim.lr, check the data lines named above, or resume from the last "
                        f"checkpoint in {self.checkpoint_root}"
                    )
            else:
                nonfinite_in_a_row = 0
            evaluate_now = cfg.train.eval_every and self.step % cfg.train.eval_every == 0
            if self.evaluator is not None and (evaluate_now or self.step == cfg.train.steps):
                self._evaluate(logger)
            saved = (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or self.step == cfg.train.steps
            if saved:
                path = self.save()
                logger.note(f"checkpoint: {path}")
            if self.step < cfg.train.steps and self._stop_requested(stop):
                if not saved:
                    path = self.save()
                    logger.note(f"checkpoint: {path}")
                name = (signal.Signals(stop.received).name if stop.received is not None
                        else "a stop signal on another rank")
                raise TrainingStopped(
                    f"stopped at step {self.step} of {cfg.train.steps} ({name}); the checkpoint {path} holds it: "
                    f"run the same command with --resume to continue", stop.received or signal.SIGTERM)
        return TrainResult(steps=self.step, final_loss=last_loss, history=logger.history)


def write_run_config(cfg: TrainConfig, out: Path) -> None:
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
