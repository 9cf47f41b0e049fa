"""Where training metrics go: the console (progress bar), ``OUT/metrics.jsonl``, TensorBoard, optionally
Weights & Biases, and at the end a PNG of the loss curves."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from gemma3vl.train.config import LoggingSettings


def peak_flops_per_second(device_name: str) -> float | None:
    """Dense bf16 peak for the GPUs we benchmark on (for the MFU estimate); None when unknown (CPU)."""
    name = device_name.lower()
    for key, flops in (("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l40s", 362e12)):
        if key in name:
            return flops
    return None


ANSWERS_FILE = "eval_answers.jsonl"  # the answers of each evaluation's accuracy questions


def drop_lost_steps(path: Path, resume_step: int) -> bool:
    """Before a resumed run appends to ``path`` (``metrics.jsonl``): keep only the records its checkpoint holds.

    A run killed after its last checkpoint had logged steps (and evaluations) past it, which the resumed run trains
    and logs again: those records are removed (at step 0, nothing was kept: the start's evaluation runs again), as is
    a line a kill cut short. Returns whether there was a file (the run is a continuation)."""
    if not path.is_file():
        return False
    kept = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        if isinstance(step, int) and (step < resume_step or step == resume_step > 0):
            kept.append(line + "\n")
    staged = path.with_name(path.name + ".tmp")
    staged.write_text("".join(kept))
    os.replace(staged, path)
    return True


class MetricsLogger:
    def __init__(self, out: Path, settings: LoggingSettings, config: dict[str, Any], total_steps: int, resume_step: int = 0):
        self.out = out
        # (a fresh run's metrics.jsonl is removed before this: one still there is the stopped run's)
        resumed = drop_lost_steps(out / "metrics.jsonl", resume_step)
        drop_lost_steps(out / ANSWERS_FILE, resume_step)
        self.jsonl = open(out / "metrics.jsonl", "a")
        self.history: list[dict[str, Any]] = []
        self.tensorboard = None
        self.wandb = None
        self.progress = None
        if settings.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # resumed: TensorBoard drops the stopped run's events of the steps logged again (from resume_step + 1)
                purge = (resume_step + 1 if resume_step else 0) if resumed else None
                self.tensorboard = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=purge)
            except ImportError:
                print("note: tensorboard is not installed; skipping TensorBoard logs", file=sys.stderr)
        if settings.wandb:
            try:
                import wandb
            except ImportError:
                from gemma3vl.errors import Gemma3VLError

                raise Gemma3VLError("logging.wandb=true but the wandb package is not installed (pip install wandb)")
            self.wandb = wandb.init(project=settings.wandb_project, config=config, dir=str(out))
        if settings.progress:
            from tqdm import tqdm

            self.progress = tqdm(total=total_steps, initial=resume_step, desc="train", unit="step", file=sys.stderr,
                                 dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.history.append(clean)
        self.jsonl.write(json.dumps(clean) + "\n")
        self.jsonl.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                if self.tensorboard is not None:
                    self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(clean, step=step)
        if self.progress is not None and "loss" in record:
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")

    def answers(self, step: int, answers: list[dict[str, Any]]) -> None:
        """One line per held-out question answered at this evaluation, in ``eval_answers.jsonl``."""
        with open(self.out / ANSWERS_FILE, "a", encoding="utf-8") as file:
            file.writelines(json.dumps({"step": step, **answer}, ensure_ascii=False) + "\n" for answer in answers)

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def note(self, message: str) -> None:
        if self.progress is not None:
            self.progress.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png_path: Path) -> Path | None:
    """Training loss per step and eval loss, from ``metrics.jsonl`` (so resumed runs plot whole)."""
    records = read_metrics(metrics_path)
    train = sorted({r["step"]: r["loss"] for r in records if r.get("loss") is not None}.items())
    evals = sorted({r["step"]: r["eval_loss"] for r in records if r.get("eval_loss") is not None}.items())
    if not train and not evals:
        return None
    from matplotlib.figure import Figure  # no pyplot: a caller's (a notebook's) backend and figures stay theirs

    figure = Figure(figsize=(7, 4), dpi=100)
    axis = figure.subplots()
    if train:
        axis.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        axis.plot(*zip(*evals), "o-", label="eval loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png_path)  # the Agg canvas, chosen for .png
    return png_path
