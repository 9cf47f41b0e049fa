"""``gemma3vl train``: set up model, data, adapters and logging from a config, train, export.

At the end ``OUT`` holds ``checkpoints/`` (DCP training checkpoints), ``hf/`` (a complete HF checkpoint with
the trained — for LoRA, merged — weights, tokenizer, processor and configs), ``adapter/`` for LoRA/DoRA (HF
PEFT format), ``metrics.jsonl``, ``tensorboard/``, ``loss.png`` and ``train_config.json``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

from gemma3vl import bridge
from gemma3vl.data.dataset import ConversationDataset
from gemma3vl.data.loader import BatchLoader
from gemma3vl.data.settings import DataConfig
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.loading import load_model, resolve_device
from gemma3vl.infer.prompt import load_processor
from gemma3vl.train.config import TrainConfig
from gemma3vl.train.evaluate import Evaluator
from gemma3vl.train.lora import LoraConfig, apply_lora, merge_lora, parameter_summary
from gemma3vl.train.metrics import MetricsLogger, plot_losses
from gemma3vl.train.peft_export import write_peft_adapter
from gemma3vl.train.steps import StepFeed
from gemma3vl.train.trainer import Trainer, TrainResult, freeze, write_run_config

TINY_TRAIN_RECORDS = 256
TINY_EVAL_RECORDS = 48


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_tiny_inputs(cfg: TrainConfig, out: Path) -> None:
    """Tiny recipes bring their own model and data: a tiny random checkpoint and drawn shapes."""
    from gemma3vl.shapes import write_shapes_dataset
    from gemma3vl.tiny import write_tiny_checkpoint

    if cfg.model.path is None:
        base = out / "base"
        if not (base / "config.json").is_file():
            say(f"tiny recipe: writing a tiny random Gemma 3 VL checkpoint to {base}")
            write_tiny_checkpoint(base, seed=cfg.train.seed)
        cfg.model.path = str(base)
    if cfg.data.path is None:
        data = out / "data"
        if not (data / "train.jsonl").is_file():
            say(f"tiny recipe: drawing {TINY_TRAIN_RECORDS} training and {TINY_EVAL_RECORDS} held-out pictures in {data}")
            write_shapes_dataset(data, TINY_TRAIN_RECORDS, seed=cfg.train.seed, name="train")
            write_shapes_dataset(data, TINY_EVAL_RECORDS, seed=cfg.train.seed, name="eval")
        cfg.data.path = str(data / "train.jsonl")
        cfg.data.eval_path = cfg.data.eval_path or str(data / "eval.jsonl")


def data_config(cfg: TrainConfig, path: str, *, shuffle: bool) -> DataConfig:
    d = cfg.data
    return DataConfig(
        path=path, format=d.format, seq_length=cfg.train.seq_length, packing=d.packing, truncation=d.truncation,
        on_bad_record=d.on_bad_record, pan_and_scan=d.pan_and_scan or None,
        allow_remote_images=d.allow_remote_images, allow_outside_paths=d.allow_outside_paths,
        shuffle=shuffle and d.shuffle, seed=cfg.train.seed,
    )


def lora_config(cfg: TrainConfig) -> LoraConfig:
    p = cfg.peft
    return LoraConfig(rank=p.rank, alpha=p.alpha, dropout=p.dropout, use_dora=p.method == "dora",
                      targets=tuple(p.targets), include_vision=p.include_vision)


def build_trainer(cfg: TrainConfig, out: Path) -> tuple[Trainer, ConversationDataset]:
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    if cfg.recipe.startswith("tiny_"):
        prepare_tiny_inputs(cfg, out)
    if cfg.model.path is None:
        raise Gemma3VLError("model.path is not set: pass --model HF_OR_NATIVE_DIR")
    if cfg.data.path is None:
        raise Gemma3VLError("data.path is not set: pass --data PATH (a JSONL of conversations)")
    device = resolve_device(cfg.model.device)
    weight_dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    model, model_config = load_model(cfg.model.path, device=device, dtype=weight_dtype)
    freeze(model, cfg)
    if cfg.peft.method != "none":
        apply_lora(model, lora_config(cfg))
    say(f"model: {cfg.model.path} on {device} ({weight_dtype}); {parameter_summary(model)}")
    processor = load_processor(cfg.model.path, model_config)
    train_data = ConversationDataset(data_config(cfg, cfg.data.path, shuffle=True), processor)
    feed = StepFeed(BatchLoader(train_data, cfg.train.micro_batch_size),
                    cfg.train.global_batch_size // cfg.train.micro_batch_size)
    evaluator = None
    if cfg.data.eval_path:
        eval_data = ConversationDataset(data_config(cfg, cfg.data.eval_path, shuffle=False), processor)
        evaluator = Evaluator(
            eval_data, micro_batch_size=cfg.train.micro_batch_size,
            accuracy_samples=cfg.data.eval_accuracy_samples, max_new_tokens=cfg.data.eval_max_new_tokens,
            stop_token_ids=model_config.stop_token_ids, device=device,
        )
    return Trainer(cfg, model, feed, out, device, evaluator), train_data


def export_results(trainer: Trainer, cfg: TrainConfig, out: Path) -> None:
    model = trainer.model
    if cfg.peft.method != "none":
        adapter = write_peft_adapter(model, lora_config(cfg), out / "adapter",
                                     base_model_name_or_path=str(cfg.model.path), overwrite=True)
        say(f"adapter (HF PEFT format): {adapter}")
        merge_lora(model)
    hf_dir = bridge.export_model(model, cfg.model.path, out / "hf", overwrite=True)
    say(f"HF checkpoint: {hf_dir}")


def run_training(cfg: TrainConfig, resume: str | bool | None = None) -> TrainResult:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    trainer, train_data = build_trainer(cfg, out)
    if resume:
        trainer.resume(None if resume is True else Path(resume))
        say(f"resumed at step {trainer.step}")
    elif (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise Gemma3VLError(f"{out}: already holds checkpoints; pass --resume to continue, or choose another --out")
    elif (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    write_run_config(cfg, out)
    logger = MetricsLogger(out, cfg.logging, cfg.to_dict(), cfg.train.steps, resume_step=trainer.step)
    try:
        result = trainer.run(logger)
    finally:
        logger.close()
    summary = train_data.summary()
    say(f"data: {summary}")
    (out / "data_summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    export_results(trainer, cfg, out)
    png = plot_losses(out / "metrics.jsonl", out / "loss.png")
    if png:
        say(f"loss curves: {png}")
    return result
