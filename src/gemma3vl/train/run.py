"""``gemma3vl train``: set up model, data, adapters and logging from a config, train, export.

At the end ``OUT`` holds ``checkpoints/`` (DCP training checkpoints), ``hf/`` (a complete HF checkpoint with
the trained — for LoRA, merged — weights, tokenizer, processor and configs), ``adapter/`` for LoRA/DoRA (HF
PEFT format), ``metrics.jsonl``, ``tensorboard/``, ``loss.png`` and ``train_config.json``.

Launched by ``torchrun`` the same command trains on all ranks in the layout of the ``parallel.*`` settings
(checked against the world size and the model before anything is loaded): every rank reads its share of
the data, rank 0 alone writes logs and exports, and all ranks write the DCP checkpoints together. So ``OUT`` must
be one directory for all ranks (on several nodes, a shared filesystem): checked first, on every rank.
"""

from __future__ import annotations

import json
import os
import random
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gemma3vl import bridge
from gemma3vl.bridge.fsutil import blocking_file
from gemma3vl.data.dataset import ConversationDataset, DataSummary
from gemma3vl.data.loader import BatchLoader
from gemma3vl.data.settings import DataConfig
from gemma3vl.data.sources import is_hf_dataset
from gemma3vl.errors import Gemma3VLError, on_every_rank
from gemma3vl.infer.loading import load_model, resolve_device
from gemma3vl.infer.prompt import load_processor
from gemma3vl.model import Gemma3Model
from gemma3vl.parallel import ParallelContext, ParallelDims, init_distributed, launched_by_torchrun, parallelize
from gemma3vl.parallel.context import ContextParallelFeed, shard_batch
from gemma3vl.parallel.distributed import check_shared_directory
from gemma3vl.parallel.export import gather_full_state, gather_pipeline_state, plain_model
from gemma3vl.parallel.sharded_load import dora_magnitudes, load_sharded
from gemma3vl.train.checkpoint import COMPLETE
from gemma3vl.train.config import TrainConfig
from gemma3vl.train.evaluate import Evaluator
from gemma3vl.train.lora import LoraConfig, apply_lora, merge_lora, parameter_summary
from gemma3vl.train.metrics import ANSWERS_FILE, MetricsLogger, plot_losses
from gemma3vl.train.peft_export import write_peft_adapter
from gemma3vl.train.steps import StepFeed
from gemma3vl.train.trainer import Trainer, TrainResult, freeze, uses_autocast, write_run_config

TINY_TRAIN_RECORDS = 256
TINY_EVAL_RECORDS = 48


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def say(message: str) -> None:
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


class QuietLogger:
    """What ranks other than 0 log to: nothing (rank 0's logger has the global numbers)."""

    def __init__(self):
        self.history: list[dict] = []

    def log(self, record: dict) -> None:
        self.history.append(record)

    def answers(self, step: int, answers: list[dict]) -> None:
        pass

    def advance(self) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


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


def data_config(cfg: TrainConfig, path: str, *, shuffle: bool, held_out: bool = False) -> DataConfig:
    d = cfg.data
    # data.columns maps the columns of Hugging Face datasets (directories, parquet); JSON records have no columns.
    hf = is_hf_dataset(path, d.format)
    return DataConfig(
        path=path, format=d.format, seq_length=cfg.train.seq_length, packing=d.packing, truncation=d.truncation,
        on_bad_record=d.on_bad_record, pan_and_scan=d.pan_and_scan or None,
        allow_remote_images=d.allow_remote_images, allow_outside_paths=d.allow_outside_paths,
        shuffle=shuffle and d.shuffle, seed=cfg.train.seed, layout=d.layout, max_image_pixels=d.max_image_pixels,
        columns=d.column_map() if hf and d.layout == "conversation" else None,
        split=(d.eval_split or d.split) if held_out else d.split,
    )


def lora_config(cfg: TrainConfig) -> LoraConfig:
    p = cfg.peft
    return LoraConfig(rank=p.rank, alpha=p.alpha, dropout=p.dropout, use_dora=p.method == "dora",
                      targets=tuple(p.targets), include_vision=p.include_vision)


def check_layout(cfg: TrainConfig, world_size: int) -> ParallelDims:
    """The ``parallel.*`` degrees resolved against the world size, checked against the model and the batch. What
    it refuses follows from the settings and the world size alone, so every rank refuses alike (rank 0 says it)."""
    dims = ParallelDims.resolve(cfg.parallel_degrees(), world_size)
    per_step = cfg.train.micro_batch_size * dims.dp
    # (pipeline parallelism) the pipeline's micro-batches are the step's, per data-parallel rank
    pp_microbatches = None if cfg.train.global_batch_size % per_step else cfg.train.global_batch_size // per_step
    dims.validate(bridge.read_config(cfg.model.path), peft=cfg.peft.method != "none",
                  seq_length=cfg.train.seq_length, sequence_parallel=cfg.parallel.sequence_parallel,  # (for cp)
                  pp_schedule=cfg.parallel.pp_schedule, pp_stages_per_rank=cfg.parallel.pp_stages_per_rank,
                  pp_microbatches=pp_microbatches)
    if cfg.train.global_batch_size % per_step:
        raise Gemma3VLError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{cfg.train.micro_batch_size} x {dims.dp} data-parallel ranks = {per_step}: each rank must take an "
            f"equal number of whole micro-batches per step"
        )
    if cfg.parallel.cpu_offload and not dims.fsdp_enabled:
        raise Gemma3VLError("parallel.cpu_offload=true offloads FSDP shards: it needs more than one data-parallel "
                            "rank (torchrun with parallel.dp_shard > 1)")
    if dims.pp > 1 and cfg.train.freeze_language:
        raise Gemma3VLError(
            f"train.freeze_language=true with parallel.pp={dims.pp}: only the vision tower and projector train, and "
            f"they are in the first pipeline stage: the other stages would have nothing to train; set parallel.pp=1 "
            f"(and parallel.dp_shard=-1 to shard over every rank)")
    return dims


def setup_parallel(cfg: TrainConfig, device: torch.device) -> ParallelContext | None:
    """Check the ``parallel.*`` layout against the world size and the model, and build the device mesh.

    One process (no torchrun): the degrees must all come out as 1, and nothing is set up."""
    try:
        dims = check_layout(cfg, dist.get_world_size() if dist.is_initialized() else 1)
    except Gemma3VLError as exc:
        raise on_every_rank(exc)
    if not dist.is_initialized():
        return None
    context = ParallelContext.create(dims, device, sequence_parallel=cfg.parallel.sequence_parallel)
    say(f"parallel: {dims.describe()} on {device.type} ({dist.get_backend()})")
    spanning = context.tp_groups_across_nodes()
    if spanning:
        per_node = os.environ.get("LOCAL_WORLD_SIZE", "?")
        say(f"warning: parallel.tp={dims.tp} puts tensor-parallel groups across nodes (ranks {spanning[0]}, "
            f"{len(spanning)} such group(s); {per_node} process(es) a node): TP's collectives, two per block on the "
            f"critical path, then cross the network. It trains correctly, but slowly: choose a parallel.tp that "
            f"divides the processes per node, and give the rest to parallel.dp_shard")
    return context


def loads_sharded(cfg: TrainConfig, parallel: ParallelContext | None) -> bool:
    """Whether each rank reads only its own shards of the checkpoint (parallel/sharded_load.py): every
    layout, pipeline stages and DoRA included."""
    return parallel is not None and parallel.dims.world_size > 1


def set_attention(model: Gemma3Model, cfg: TrainConfig, device: torch.device) -> None:
    """``model.attention``: the decoder's attention kernel (gemma3vl.model.flex.use_flex). FlexAttention has no
    backward on the CPU, so ``flex`` there is refused here rather than at the first backward."""
    if cfg.model.attention == "flex" and device.type != "cuda":
        raise Gemma3VLError(f"model.attention=flex trains on CUDA only (FlexAttention has no backward on {device.type}); "
                            "use model.attention=auto or sdpa")
    model.text.attention_backend = cfg.model.attention


def build_sharded_model(cfg: TrainConfig, parallel: ParallelContext, device: torch.device,
                        weight_dtype: torch.dtype, compute_dtype: torch.dtype | None) -> tuple[Gemma3Model, Any]:
    """The model built on the meta device, parallelized there, then each rank's shards read from the checkpoint."""
    model_config = bridge.read_config(cfg.model.path)
    with torch.device("meta"):
        model = Gemma3Model(model_config)
        if bridge.has_untied_head(cfg.model.path):
            model.text.add_untied_head()
    model = model.to(weight_dtype)
    set_attention(model, cfg, device)
    extra: dict[str, torch.Tensor] = {}
    if cfg.peft.method != "none":
        apply_lora(model, lora_config(cfg))  # adapters made on the CPU, as one process makes them
    freeze(model, cfg)  # after the adapters: a frozen part's adapters do not train either
    if cfg.peft.method != "none":
        extra = {name: param.detach().clone() for name, param in model.named_parameters() if not param.is_meta}
        if cfg.peft.method == "dora":  # magnitudes from the base rows, read one module at a time
            extra.update(dora_magnitudes(cfg.model.path, model))
        model = model.to("meta")
    p = cfg.parallel
    if parallel.dims.pp > 1:  # (pipeline parallelism) each stage parallelized on meta, then its shards read
        whole = model  # the checkpoint must fit the whole model; each stage reads its own tensors
        model = build_pipelined_model(
            model, cfg, parallel, compute_dtype,
            load=lambda stage: load_sharded(cfg.model.path, stage, extra=extra, part_of=whole))
        read = model.pipeline.bytes_read
    else:
        parallelize(model, parallel, activation_checkpoint=p.activation_checkpoint, compile=p.compile,
                    compile_mode=p.compile_mode, param_dtype=compute_dtype, cpu_offload=p.cpu_offload)
        model.to_empty(device="cpu" if p.cpu_offload else device)
        read = load_sharded(cfg.model.path, model, extra=extra)
    say(f"sharded loading: this rank read {read / 2**20:.1f} MiB of the checkpoint")
    return model, model_config


# ---------------------------------------------------------------------------------------------- pipeline parallelism
def build_pipelined_model(model: Gemma3Model, cfg: TrainConfig, parallel: ParallelContext,
                          compute_dtype: torch.dtype | None, load=None) -> Gemma3Model:
    """``parallel.pp > 1``: this rank's stages of the model, each parallelized like a whole model, and the
    schedule (``gemma3vl.parallel.pipeline``). Returns the view the trainer uses. ``model`` is built on the
    meta device with ``load(stage)`` filling each stage (sharded loading), or whole in host memory (DoRA)."""
    from gemma3vl.parallel.pipeline import build_pipeline  # (imports torch.distributed.pipelining)

    p, t = cfg.parallel, cfg.train
    micro_batches = t.global_batch_size // (t.micro_batch_size * parallel.dims.dp)
    return build_pipeline(
        model, parallel, schedule=p.pp_schedule, stages_per_rank_setting=p.pp_stages_per_rank,
        micro_batches=micro_batches, micro_batch_size=t.micro_batch_size, seq_length=t.seq_length,
        activation_checkpoint=p.activation_checkpoint, compile=p.compile, compile_mode=p.compile_mode,
        param_dtype=compute_dtype,
        cpu_offload=p.cpu_offload, load=load,
    )


def check_seq_length(cfg: TrainConfig) -> None:
    """``train.seq_length`` within the model's context (its ``max_position_embeddings``), before it loads: past it
    the rows hold positions the model was never trained at (and a long one on the CPU's dense masks got the process
    killed for memory, without a word)."""
    if not Path(cfg.model.path).is_dir():  # (load_model names a missing directory)
        return
    from gemma3vl.bridge.loading import read_config

    context = read_config(cfg.model.path).text.max_position_embeddings
    if cfg.train.seq_length > context:
        raise on_every_rank(Gemma3VLError(
            f"train.seq_length={cfg.train.seq_length} is over the model's context of {context} tokens "
            f"(max_position_embeddings of {cfg.model.path}'s text config)"))


def build_trainer(cfg: TrainConfig, out: Path) -> tuple[Trainer, ConversationDataset]:
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    if launched_by_torchrun():
        device = init_distributed(use_gpu=cfg.model.device != "cpu")
    else:
        device = resolve_device(cfg.model.device, flag="model.device")
    if cfg.recipe.startswith("tiny_"):
        if is_main_process():
            prepare_tiny_inputs(cfg, out)
        if dist.is_initialized():
            dist.barrier()  # the other ranks find rank 0's files and only take their paths
        if not is_main_process():
            prepare_tiny_inputs(cfg, out)
    if cfg.model.path is None:
        raise Gemma3VLError("model.path is not set: pass --model HF_OR_NATIVE_DIR")
    if cfg.data.path is None:
        raise Gemma3VLError("data.path is not set: pass --data PATH (a JSONL of conversations)")
    check_seq_length(cfg)
    parallel = setup_parallel(cfg, device)
    weight_dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    p = cfg.parallel
    # FSDP's compute dtype: bf16 where the single-process run would autocast to bf16.
    compute_dtype = torch.bfloat16 if device.type == "cuda" and cfg.model.dtype == "auto" else None
    if loads_sharded(cfg, parallel):
        model, model_config = build_sharded_model(cfg, parallel, device, weight_dtype, compute_dtype)
    else:
        # One process, or a layout that cannot load shard by shard yet (see loads_sharded): the whole model in
        # this rank's host memory, of which parallelize moves only the rank's shards to its device.
        sharded = parallel is not None and parallel.dims.world_size > 1
        model, model_config = load_model(cfg.model.path, device="cpu" if sharded else device, dtype=weight_dtype)
        set_attention(model, cfg, device)
        if cfg.peft.method != "none":
            apply_lora(model, lora_config(cfg))
        freeze(model, cfg)  # after the adapters: a frozen part's adapters do not train either
        if parallel is not None and parallel.dims.pp > 1:
            model = build_pipelined_model(model, cfg, parallel, compute_dtype)
        elif parallel is not None or p.activation_checkpoint != "none" or p.compile:
            parallelize(model, parallel, activation_checkpoint=p.activation_checkpoint, compile=p.compile,
                        compile_mode=p.compile_mode, param_dtype=compute_dtype, cpu_offload=p.cpu_offload)
    say(f"model: {cfg.model.path} on {device} ({weight_dtype}); {parameter_summary(model)}")
    dropouts = [f"{part}.attention_dropout={value:g}" for part, value in
                (("text_config", model_config.text.attention_dropout),
                 ("vision_config", model_config.vision.attention_dropout if model_config.vision else 0.0)) if value]
    if dropouts:
        say(f"note: the checkpoint's config sets {' and '.join(dropouts)}; gemma3vl trains without attention dropout "
            f"(transformers would drop attention weights in training)")
    if cfg.optim.warmup_steps > cfg.train.steps:
        say(f"note: optim.warmup_steps={cfg.optim.warmup_steps} is longer than train.steps={cfg.train.steps}: the "
            f"run ends inside the warm-up, its learning rate reaching {cfg.train.steps}/{cfg.optim.warmup_steps} of "
            f"optim.lr={cfg.optim.lr:g} at the last step")
    if parallel is not None or p.activation_checkpoint != "none" or p.compile:
        misplaced = [name for name, param in model.named_parameters() if param.device.type != device.type]
        if misplaced and not p.cpu_offload:
            raise RuntimeError(f"parallelize left {len(misplaced)} parameter(s) off {device}, e.g. {misplaced[0]}")
    processor = load_processor(cfg.model.path, model_config)
    train_data = ConversationDataset(data_config(cfg, cfg.data.path, shuffle=True), processor)
    if parallel is not None:
        train_data.shard(parallel.dp_rank, parallel.dims.dp)
    per_rank = cfg.train.global_batch_size // (parallel.dims.dp if parallel else 1)
    feed = StepFeed(BatchLoader(train_data, cfg.train.micro_batch_size), per_rank // cfg.train.micro_batch_size)
    slice_batch = sum_slices = None
    if parallel is not None and parallel.dims.cp > 1:
        # Context parallelism: the cp ranks of a data-parallel rank read the same batches; each computes its slice
        # (in training and in the held-out loss, whose slices are summed over the cp ranks).
        sequence_shards = parallel.dims.tp if parallel.sequence_parallel else 1
        cp_rank, cp_group = parallel.cp_mesh.get_local_rank(), parallel.cp_mesh.get_group()
        feed = ContextParallelFeed(feed, parallel.dims.cp, cp_rank, cp_group, sequence_shards=sequence_shards)
        slice_batch = partial(shard_batch, degree=parallel.dims.cp, rank=cp_rank, group=cp_group,
                              sequence_shards=sequence_shards)
        sum_slices = parallel.sum_over_cp
    evaluator = None
    if cfg.data.eval_path:
        eval_data = ConversationDataset(data_config(cfg, cfg.data.eval_path, shuffle=False, held_out=True), processor)
        answering = None
        if parallel is not None:
            # The sharded model cannot generate: rank 0 answers with a whole copy (the export's gather), in the
            # compute dtype, while the other ranks wait for its answers.
            answering = partial(gathered_model, parallel=parallel, cfg=cfg, device=device,
                                dtype=compute_dtype or weight_dtype)
        evaluator = Evaluator(
            eval_data, micro_batch_size=cfg.train.micro_batch_size,
            accuracy_samples=cfg.data.eval_accuracy_samples, max_new_tokens=cfg.data.eval_max_new_tokens,
            stop_token_ids=model_config.stop_token_ids, device=device, metrics=cfg.data.eval_metrics(),
            slice_batch=slice_batch, sum_slices=sum_slices, autocast=uses_autocast(cfg), answering_model=answering,
        )
    return Trainer(cfg, model, feed, out, device, evaluator, parallel=parallel), train_data


def gathered_model(model: torch.nn.Module, parallel: ParallelContext, cfg: TrainConfig, device: torch.device,
                   dtype: torch.dtype | None = None) -> Gemma3Model | None:
    """The sharded ``model`` as one plain model on rank 0 (on ``device`` in ``dtype`` if given, else on the host
    as trained); ``None`` on the other ranks. Collective: every rank gathers tensor by tensor (pipeline stages
    send theirs on to rank 0)."""
    if parallel.dims.pp > 1:
        state = gather_pipeline_state(model, parallel, skip=model.pipeline.duplicate_names)
    else:
        state = gather_full_state(model, device)
    if not is_main_process():
        return None
    whole = plain_model(lambda: _plain_like(cfg), state)
    del state
    return whole if dtype is None else whole.to(device=device, dtype=dtype)


def export_results(trainer: Trainer, cfg: TrainConfig, out: Path) -> None:
    model = trainer.model
    if trainer.parallel is not None:
        # Every rank gathers tensor by tensor; rank 0 then holds one plain model and writes it as one process would.
        model = gathered_model(model, trainer.parallel, cfg, trainer.device)
        if model is None:
            return
    if cfg.peft.method != "none":
        # adapter_config.json names the base for transformers (AutoPeftModel loads it from there); a native
        # directory is not one transformers can read, so it is left out rather than recorded.
        native_base = bridge.is_native_dir(cfg.model.path)
        adapter = write_peft_adapter(model, lora_config(cfg), out / "adapter", overwrite=True,
                                     base_model_name_or_path=None if native_base else str(cfg.model.path))
        say(f"adapter (HF PEFT format): {adapter}")
        if native_base:
            say(f"note: the base {cfg.model.path} is a native directory: with transformers/peft apply the adapter to "
                f"its HF form (gemma3vl convert export {cfg.model.path} DIR); base_model_name_or_path is left unset")
        merge_lora(model)
    elif (out / "adapter").exists():  # left by an earlier LoRA run in this OUT: never deleted, but said
        say(f"note: {out / 'adapter'} is from an earlier run in this OUT (this run trained no adapter); this "
            f"run's model is {out / 'hf'}")
    hf_dir = bridge.export_model(model, cfg.model.path, out / "hf", overwrite=True)
    say(f"HF checkpoint: {hf_dir}")


def _plain_like(cfg: TrainConfig) -> Gemma3Model:
    """An unsharded model shaped like the one trained (untied head, adapters) for the gathered weights."""
    model = Gemma3Model(bridge.read_config(cfg.model.path))
    if bridge.has_untied_head(cfg.model.path):
        model.text.add_untied_head()
    if cfg.peft.method != "none":
        apply_lora(model, lora_config(cfg))
    return model


def check_paths(cfg: TrainConfig, out: Path) -> None:
    """What the run reads and writes, checked before anything loads: ``OUT`` must be a directory that can be made,
    the data must exist, and the model must not be one of the paths the run replaces (``OUT/hf``, ``OUT/adapter``,
    ``OUT/checkpoints``; a native model's own ``hf/`` when ``OUT`` is that model): the export at the end would
    overwrite the checkpoint the run started from."""
    if out.exists() and not out.is_dir():
        raise Gemma3VLError(f"--out {out}: exists and is not a directory")
    blocking = blocking_file(out)
    if blocking is not None:
        raise Gemma3VLError(f"--out {out}: cannot be made ({blocking} is a file, not a directory)")
    for key, value in (("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)):
        if value is not None and not Path(value).exists():
            raise Gemma3VLError(f"{value}: no such dataset file or directory ({key})")
        if value is not None and Path(value).is_file() and Path(value).stat().st_size == 0:
            raise Gemma3VLError(f"{value}: the dataset holds no records (an empty file; {key})")
    if cfg.model.path is not None and Path(cfg.model.path).exists():
        model, resolved = Path(cfg.model.path).resolve(), out.resolve()
        if model == resolved and bridge.is_native_dir(model):
            raise Gemma3VLError(f"--out {out} is the native model directory --model {cfg.model.path}: the run's export "
                                f"to {out / 'hf'} would replace the model's own hf/ files; choose another --out")
        for written in (resolved / "hf", resolved / "adapter", resolved / "checkpoints"):
            if model == written or written in model.parents:
                raise Gemma3VLError(
                    f"--model {cfg.model.path} is {'inside ' if model != written else ''}{written}, which this run "
                    f"replaces with its own output: choose another --out (or copy the model elsewhere first)")


def run_training(cfg: TrainConfig, resume: str | bool | None = None) -> TrainResult:
    out = Path(cfg.out)
    try:
        check_paths(cfg, out)  # (every rank alike under torchrun: rank 0 alone says it)
    except Gemma3VLError as exc:
        raise on_every_rank(exc)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Gemma3VLError(f"--out {out}: cannot be made ({exc.strerror or exc})") from None
    try:
        if launched_by_torchrun():
            # Join the other ranks first, and make sure OUT is one directory for all of them: the checks of OUT's
            # contents below must give every rank the same answer, and every rank writes checkpoint shards there.
            init_distributed(use_gpu=cfg.model.device != "cpu")
            check_shared_directory(out, "--out")
        result = _run(cfg, out, resume)
        if dist.is_initialized():
            # Rank 0 may still be writing the export: leave together (a gloo rank that tears down while its
            # peers are still connected can abort).
            dist.barrier()
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# What the trained weights mean: a resumed run must keep these (the adapters' scale, what is trained). Dropout,
# the learning rate, the steps and the data may change.
RESUME_FIXED = [("peft", "method"), ("peft", "rank"), ("peft", "alpha"), ("peft", "targets"),
                ("peft", "include_vision"), ("train", "freeze_vision"), ("train", "freeze_language"),
                ("train", "freeze_projector")]


def check_resume_settings(saved_path: Path, current: dict[str, Any]) -> None:
    """Refuse to resume with settings that change what the checkpoint's weights mean (``RESUME_FIXED``), compared
    with the run's ``train_config.json``: e.g. another ``peft.alpha`` would silently rescale the trained adapters."""
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError):
        return  # no record of the run's settings (an older run): the checkpoint's own checks still apply
    if not isinstance(saved, dict) or not all(isinstance(saved.get(section, {}), dict) for section, _ in RESUME_FIXED):
        raise Gemma3VLError(f"{saved_path}: not the settings of a run (expected the object gemma3vl train writes); "
                            "it is how --resume checks the run's adapter and freezing settings")
    changed = [f"{section}.{key}: {saved[section][key]!r} when the run started, {current[section][key]!r} now"
               for section, key in RESUME_FIXED
               if key in saved.get(section, {}) and saved[section][key] != current[section][key]]
    if changed:
        raise Gemma3VLError(f"--resume with other settings than the run's ({saved_path}): " + "; ".join(changed))


def _run(cfg: TrainConfig, out: Path, resume: str | bool | None) -> TrainResult:
    # Both checks before anything loads (a 27B takes minutes to load only to be refused).
    if resume:
        check_resume_settings(out / "train_config.json", cfg.to_dict())
        if resume is not True and not (Path(resume) / COMPLETE).is_file():
            what = "no such directory" if not Path(resume).exists() else f"no {COMPLETE} marker"
            raise on_every_rank(Gemma3VLError(f"--resume {resume}: not a complete training checkpoint ({what}); the "
                                              f"checkpoints are OUT/checkpoints/step-*"))
    elif (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise Gemma3VLError(f"{out}: already holds checkpoints; pass --resume to continue, or choose another --out")
    trainer, _ = build_trainer(cfg, out)
    main = is_main_process()
    if resume:
        trainer.resume(None if resume is True else Path(resume))
        if trainer.step > cfg.train.steps:  # (it exported the checkpoint's weights as if trained to train.steps)
            raise on_every_rank(Gemma3VLError(
                f"--resume: the checkpoint is at step {trainer.step}, past train.steps={cfg.train.steps}: nothing is "
                f"left to train; give train.steps above {trainer.step} to go on"))
        say(f"resumed at step {trainer.step}" + (
            ": the last step, nothing left to train; writing the run's export (a run stopped in it finishes it)"
            if trainer.step == cfg.train.steps else ""))
    elif main:  # a fresh run in a reused OUT: the last run's records go
        for name in ("metrics.jsonl", ANSWERS_FILE):
            (out / name).unlink(missing_ok=True)
    if main:
        write_run_config(cfg, out)
        logger = MetricsLogger(out, cfg.logging, cfg.to_dict(), cfg.train.steps, resume_step=trainer.step)
    else:
        logger = QuietLogger()
    try:
        result = trainer.run(logger)
    finally:
        logger.close()
    summary = trainer.feed.summary()  # what the steps trained on read (not what a prefetching thread read ahead)
    if trainer.parallel is not None:
        summary = sum_summaries(trainer.parallel.gather_over_dp(summary.to_dict()))
    say(f"data: {summary}")
    if main:
        (out / "data_summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    export_results(trainer, cfg, out)
    if main:
        png = plot_losses(out / "metrics.jsonl", out / "loss.png")
        if png:
            say(f"loss curves: {png}")
    return result


def sum_summaries(parts: list[dict]) -> DataSummary:
    """The data summary of the whole run from every data-parallel rank's own."""
    total = DataSummary()
    for part in parts:
        total.merge(DataSummary.from_dict(part))
    return total
