"""Pipeline parallelism: the decoder blocks cut into stages, run by ``torch.distributed.pipelining``.

How the model is cut. ``parallel.pp`` ranks hold ``S = pp x v`` stages (``v`` = 1 for ``1f1b``, and
``parallel.pp_stages_per_rank`` for ``interleaved``); stage ``s`` lives on pipeline rank ``s % pp`` (the
"loop" placement Interleaved1F1B expects). The decoder blocks are split into ``S`` runs of consecutive blocks,
as evenly as possible (where they do not divide, the first and last stages get the fewer: they also carry the
embedding and vision tower, and the loss). Stage 0 also holds the vision tower, the projector and the
embedding; the last stage the final norm and the loss (the chunked linear cross-entropy over the output
matrix, vocab-parallel under TP).

Each stage is a plain ``Gemma3Model`` built on the meta device and given the modules it owns, with the
same attribute paths: its blocks sit in a :class:`StageLayers` keyed by their global index, so a stage's
parameters are named ``text.layers.3.attn...`` exactly as in the whole model. The stage is then parallelized
like a whole model (TP -> checkpointing -> compile -> FSDP, ``parallelize``), and its class swapped for one
whose ``forward`` is the stage's part (as ``fully_shard`` swaps classes). What the trainer, the optimizer,
checkpoints and exports see is :class:`PipelinedGemma3Model`, another meta-built skeleton holding this rank's
modules under their usual names: so DCP checkpoints are layout-independent (a PP2 checkpoint loads in one
process, and the reverse).

Where the stages come from. Usually from a whole model built on the meta device (no memory): each stage is
parallelized there, given empty storage (``to_empty``) and filled by ``load`` — sharded loading
(``parallel/sharded_load.py``), which reads from the checkpoint exactly the boxes of this rank's stages, by
their (the whole model's) names. So a rank never holds more of the model than its stages' shards (DoRA's
starting magnitudes, norms of whole base rows, are computed from the checkpoint beforehand, one module at a time).
Otherwise (a layout that loads whole) from a whole model in host memory, of which each stage keeps its modules.
LoRA adapters live in the blocks they adapt, so they go with their block's stage.

The tied embedding. Gemma 3 ties the output matrix to the embedding, and the first and the last stage both
need it. The last stage gets its own copy (same name ``text.embed.weight``, same values: sharded loading reads
it from the same checkpoint tensor); before clipping, the two copies' gradients are all-reduced over the pair
of ranks that hold them (Megatron's "embedding group"), so the copies get the same update and stay
identical. The gradient norm counts the matrix once. A checkpoint holds one copy (DCP writes one of two
identical entries) and both copies load it; the export takes stage 0's. Under LoRA the embedding is frozen:
nothing to sync.

What passes between stages: the hidden states ``[B, T, D]``, whole (under sequence parallelism the text
decoder's own TP hooks shard them on entry to each stage and gather them on exit). The pipelining API passes
tensors only, and the same shapes every micro-batch: so every micro-batch of a step is padded to
``train.seq_length`` rows (padding is segment 0 without targets: nothing attends to it, nothing is learnt
from it), and each stage reads the rest of its micro-batch (mask description, targets, images) from the
step's list of micro-batches, by the micro-batch index the schedule hands every stage as a keyword argument.

With context parallelism (``parallel.cp``; Megatron's arrangement): the stages are outermost, and inside each
stage the ``cp`` ranks of the stage split every row (``parallel/context.py``). Rows are padded to
``train.seq_length`` rounded up to ``2 x cp`` chunks (times the TP degree under sequence parallelism), every rank
keeps the whole micro-batches (ids, mask description, targets: a few integers a token) and its zigzag slice of
them (a ``SequenceShard``), and what passes between stages is the slice's hidden states ``[B, T / cp, D]``. Stage 0
embeds the slice (``embed_slice``: the vision tower runs on the images whose soft tokens fall in it), each stage's
blocks get a ``KeyValueExchange`` over the stage's context-parallel group with the whole row's mask description,
and the last stage's loss is its slice's. The ``cp`` ranks of a stage run the same schedule, so their per-layer
exchanges (forward all-gathers, backward reduce-scatters) meet in the same order; FSDP shards each stage over
``dp_shard x cp`` and sums the slices' gradients.

The loss. The last stage returns the micro-batch's summed cross-entropy divided by the step's total number
of target tokens (known before the step), and the schedule does not rescale (``scale_grads=False``): so the
gradients are exactly one process's. The logged loss is the last stage's sum, all-reduced over the pipeline
ranks (the others add 0); the trainer then sums it over the data- and context-parallel ranks (each last-stage
rank's sum is its slice's).

The cost: the pipeline bubble, ``(p - 1) / (m + p - 1)`` of the step for ``p`` ranks and ``m`` micro-batches
under 1F1B, ``(p - 1) / (v m + p - 1)`` interleaved; the step's micro-batches are the pipeline's.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from gemma3vl.data.batch import Batch
from gemma3vl.errors import Gemma3VLError
from gemma3vl.model import Gemma3Model, TokenInfo
from gemma3vl.model.loss import IGNORE, linear_cross_entropy
from gemma3vl.parallel.context import ContextParallelBatch, KeyValueExchange, SequenceShard, embed_slice, slice_info
from gemma3vl.parallel.distributed import ParallelContext
from gemma3vl.parallel.loss import vocab_parallel_cross_entropy
from gemma3vl.parallel.parallelize import parallelize

SCHEDULES = ("1f1b", "interleaved")


# ---------------------------------------------------------------------------------------------- the cut
def stages_per_rank(schedule: str, setting: int) -> int:
    """Virtual stages per pipeline rank: 1 for 1F1B, ``parallel.pp_stages_per_rank`` interleaved."""
    return 1 if schedule == "1f1b" else setting


def split_layers(num_layers: int, num_stages: int) -> list[list[int]]:
    """The block indices of each stage: consecutive runs, as even as possible; where they do not divide,
    the middle stages take the extra blocks first (the first and last stages carry embedding, vision tower
    and loss), then the last, then the first."""
    base, extra = divmod(num_layers, num_stages)
    sizes = [base] * num_stages
    order = list(range(1, num_stages - 1)) + [num_stages - 1, 0] if num_stages > 1 else [0]
    for stage in order[:extra]:
        sizes[stage] += 1
    runs, start = [], 0
    for size in sizes:
        runs.append(list(range(start, start + size)))
        start += size
    return runs


def check_pipeline(pp: int, num_layers: int, schedule: str, per_rank: int, micro_batches: int | None) -> None:
    """Refuse a pipeline layout that cannot run, saying which setting to change and to what."""
    if schedule not in SCHEDULES:
        raise Gemma3VLError(f"parallel.pp_schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if schedule == "interleaved" and per_rank < 2:
        raise Gemma3VLError(
            f"parallel.pp_schedule=interleaved with parallel.pp_stages_per_rank={per_rank}: interleaving needs at "
            f"least 2 stages per rank; set parallel.pp_stages_per_rank=2, or parallel.pp_schedule=1f1b"
        )
    stages = pp * stages_per_rank(schedule, per_rank)
    if num_layers < stages:
        fitting = [v for v in range(2, num_layers // pp + 1)]
        hint = (f"set parallel.pp_stages_per_rank to at most {num_layers // pp}"
                if schedule == "interleaved" and fitting else f"choose parallel.pp of at most {num_layers}")
        raise Gemma3VLError(
            f"parallel.pp={pp} x {stages_per_rank(schedule, per_rank)} stage(s) per rank = {stages} stages, but "
            f"the model has {num_layers} decoder blocks: every stage needs at least one; {hint}"
        )
    if micro_batches is None:
        return
    if micro_batches < pp:
        raise Gemma3VLError(
            f"parallel.pp={pp} needs at least {pp} micro-batches per step, but each data-parallel rank gets "
            f"{micro_batches} (train.global_batch_size / (train.micro_batch_size x data-parallel ranks)); raise "
            f"train.global_batch_size or lower train.micro_batch_size (more micro-batches also shrink the "
            f"pipeline bubble, (p-1)/(m+p-1))"
        )
    if schedule == "interleaved" and micro_batches % pp:
        raise Gemma3VLError(
            f"parallel.pp_schedule=interleaved needs a multiple of parallel.pp={pp} micro-batches per step, but "
            f"each data-parallel rank gets {micro_batches}; choose train.global_batch_size so that it gets a "
            f"multiple of {pp}, or use parallel.pp_schedule=1f1b"
        )


class StageLayers(nn.ModuleList):
    """The decoder blocks of some stages, registered under their index in the whole model ("3", "4", ...),
    so that parameter names are the whole model's. Iterates in order; ``layers[i]`` is the i-th block held
    (what ``apply_activation_checkpointing`` uses to put wrappers in place)."""

    def __init__(self, blocks: dict[int, nn.Module]):
        super().__init__()
        for index, block in sorted(blocks.items()):
            self.add_module(str(index), block)

    def _key(self, position: int) -> str:
        return list(self._modules)[position]

    def __getitem__(self, position):
        if isinstance(position, slice):
            return [self._modules[key] for key in list(self._modules)[position]]
        return self._modules[self._key(position)]

    def __setitem__(self, position: int, module: nn.Module) -> None:
        setattr(self, self._key(position), module)


# ---------------------------------------------------------------------------------------------- a stage
@dataclass
class StepInputs:
    """What every stage reads for the current step (or eval batch): the padded micro-batches (whole rows), under
    context parallelism the slice of them this rank computes, and the divisor of the loss. The last stage
    appends each micro-batch's (summed loss, target count) — its slice's under context parallelism."""

    batches: list[Batch] = field(default_factory=list)
    shards: list[SequenceShard | None] = field(default_factory=list)  # None: whole rows (parallel.cp = 1)
    total_targets: int = 1
    losses: list[tuple[torch.Tensor, int]] = field(default_factory=list)

    def set(self, batches: list[Batch], shards: list[SequenceShard | None], total_targets: int) -> None:
        self.batches, self.shards, self.total_targets, self.losses = batches, shards, total_targets, []

    def saved(self) -> tuple:
        return self.batches, self.shards, self.total_targets, self.losses

    def restore(self, saved: tuple) -> None:
        self.batches, self.shards, self.total_targets, self.losses = saved


class StageForward:
    """The forward of one stage, mixed into the (parallelized) stage module's class.

    ``x``: input ids ``[B, T]`` on stage 0 (whole rows), the hidden states ``[B, T, D]`` elsewhere — under
    context parallelism ``[B, T / cp, D]``, this rank's slice of the rows; ``micro_batch``: the index ``[1]`` of
    the micro-batch in ``inputs.batches``. Returns the hidden states for the next stage, or on the last stage the
    loss ``[1]`` (summed cross-entropy over this rank's targets / the step's target tokens).

    Under context parallelism (``inputs.shards``) stage 0 embeds the slice (and runs the vision tower on the
    images whose soft tokens fall in it), every stage's blocks exchange keys and values over the stage's
    context-parallel group with the whole row's mask description (``KeyValueExchange``), and the last stage
    computes the loss of the slice's targets: each piece as ``parallel/context.py`` does for a whole model.
    """

    stage_index: int
    is_first: bool
    is_last: bool
    inputs: StepInputs
    boundary_dtype: torch.dtype
    autocast: bool

    def forward(self, x: torch.Tensor, micro_batch: torch.Tensor) -> torch.Tensor:
        index = int(micro_batch.reshape(-1)[0])
        batch = self.inputs.batches[index]
        shard = self.inputs.shards[index] if self.inputs.shards else None
        if shard is None:
            info, cache, targets = batch.info, None, batch.targets
        else:  # this rank's slice of the rows; attention sees the whole row's keys
            info, cache = slice_info(batch.info, shard.indices), KeyValueExchange(batch.info, shard)
            targets = batch.targets[:, shard.indices]
        # bf16 autocast over fp32 master weights on CUDA, as ``trainer.autocast_for`` does in one process.
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext():
            if self.is_first:
                if shard is None:
                    x, ran_vision = self.embed(x, batch.pixel_values), batch.pixel_values is not None
                else:
                    x, ran_vision = embed_slice(self, x, batch.pixel_values, shard.indices)
                if not ran_vision and self.vision is not None:
                    x = x + _zero_use_of(self.vision, self.projector).to(x.dtype)
            hidden = self.text(x, info, cache)
            if not self.is_last:
                return hidden.to(self.boundary_dtype)
            weight = self.text.output_weight
            if isinstance(weight, DTensor):
                summed, count = vocab_parallel_cross_entropy(hidden, weight, targets,
                                                             softcap=self.text.logit_softcap)
            else:
                summed, count = linear_cross_entropy(hidden, weight, targets, softcap=self.text.logit_softcap,
                                                     compile_backend=self.text.loss_compile_backend)
        self.inputs.losses.append((summed.detach(), count))
        return (summed / max(self.inputs.total_targets, 1)).reshape(1)


def _zero_use_of(*modules: nn.Module) -> torch.Tensor:
    """0 x the sum of the modules' trainable parameters: a micro-batch without images still gives the
    vision tower and projector a (zero) gradient, so that FSDP's data-parallel ranks reduce the same tensors
    (see ``parallel/fsdp.py``). Read inside the forward: under FSDP these are the gathered parameters."""
    parameters = [p for module in modules if module is not None for p in module.parameters() if p.requires_grad]
    if not parameters:
        return torch.zeros(())
    return 0.0 * sum((p.to_local() if isinstance(p, DTensor) else p).sum() for p in parameters)


_STAGE_CLASSES: dict[type, type] = {}


def _become_stage(module: nn.Module) -> None:
    cls = type(module)
    if cls not in _STAGE_CLASSES:
        _STAGE_CLASSES[cls] = type(f"PipelineStage{cls.__name__}", (StageForward, cls), {})
    module.__class__ = _STAGE_CLASSES[cls]


def _skeleton(config) -> Gemma3Model:
    """A ``Gemma3Model`` without memory: its modules are then replaced by real ones (or removed)."""
    with torch.device("meta"):
        return Gemma3Model(config)


def _copy_settings(model: Gemma3Model, skeleton: Gemma3Model) -> None:
    """The plain attributes of the model and its text decoder (config, RoPE tables, attention backend...)."""
    for source, target in ((model, skeleton), (model.text, skeleton.text)):
        for key, value in vars(source).items():
            if not key.startswith("_") and key != "training":
                setattr(target, key, value)


def _stage_model(model: Gemma3Model, blocks: list[int], first: bool, last: bool) -> Gemma3Model:
    """The stage's modules (shared with ``model``, except the last stage's copy of a tied embedding) under
    the whole model's names. On a meta ``model`` the copy is on the meta device too, and loads like the
    original from ``text.embed.weight``."""
    stage = _skeleton(model.config)
    _copy_settings(model, stage)
    text = stage.text
    tied = model.text.lm_head is None
    if first:
        text.embed = model.text.embed
    elif last and tied:
        text.embed = copy.deepcopy(model.text.embed)  # the output matrix; gradients all-reduced with stage 0's
    else:
        text.embed = None
    text.layers = StageLayers({index: model.text.layers[index] for index in blocks})
    text.norm = model.text.norm if last else nn.Identity()
    text.lm_head = model.text.lm_head if last else None
    stage.vision = model.vision if first else None
    stage.projector = model.projector if first else None
    return stage


# ---------------------------------------------------------------------------------------------- the model
class PipelinedGemma3Model(Gemma3Model):
    """This rank's stages under the whole model's parameter names, for the optimizer, checkpoints and
    exports. ``forward`` is the schedule's (``pipeline.train_step``); ``loss`` runs one batch through the
    stages without a schedule, for the held-out loss (the whole batch's numbers, also under context
    parallelism), and ``context_parallel_loss`` one rank's slice of it (what ``ContextParallelBatch.loss``
    calls: the evaluator sums the slices over the context-parallel ranks)."""

    pipeline: "Pipeline"

    def forward(self, *args, **kwargs):
        raise Gemma3VLError("a pipelined model runs through its schedule (Pipeline.train_step), not forward()")

    @torch.no_grad()
    def loss(self, input_ids, targets, info, pixel_values=None):
        return self.pipeline.forward_only(Batch(input_ids, targets, info, pixel_values))

    @torch.no_grad()
    def context_parallel_loss(self, input_ids, targets, info, pixel_values, shard: SequenceShard):
        return self.pipeline.forward_only(Batch(input_ids, targets, info, pixel_values), shard=shard)


@dataclass
class Pipeline:
    """This rank's stages, the schedule, and the pipeline's collectives (tied gradients, clipping, loss)."""

    context: ParallelContext
    stage_modules: list[nn.Module]
    stages: list[PipelineStage]
    schedule: object
    inputs: StepInputs
    num_stages: int
    micro_batches: int
    seq_length: int
    row_multiple: int  # the padded rows' length is a multiple of this (2 x cp chunks, each split over SP ranks)
    tied_parameter: nn.Parameter | None  # this rank's copy of the tied embedding, when it holds one
    tied_group: dist.ProcessGroup | None  # the pair of ranks that hold the two copies
    duplicate_names: frozenset[str]  # names this rank holds that stage 0 holds too (not counted, not exported)
    view: PipelinedGemma3Model = None  # set once built
    bytes_read: int | None = None  # what sharded loading read from the checkpoint for this rank's stages

    @property
    def group(self) -> dist.ProcessGroup:
        return self.context.pp_mesh.get_group()

    @property
    def has_first(self) -> bool:
        return any(module.is_first for module in self.stage_modules)

    @property
    def has_last(self) -> bool:
        return any(module.is_last for module in self.stage_modules)

    @property
    def context_parallel(self) -> bool:
        return self.context.dims.cp > 1

    # ------------------------------------------------------------------ inputs
    def _padded_length(self, length: int) -> int:
        return -(-max(length, 1) // self.row_multiple) * self.row_multiple

    def _shard(self, length: int, given: SequenceShard | None = None) -> SequenceShard | None:
        """This rank's slice of rows of ``length`` tokens under context parallelism (``given``, when it was cut
        for that length), else ``None``."""
        if not self.context_parallel:
            return None
        if given is not None and given.length == length:
            return given.to(self.context.device)
        mesh = self.context.cp_mesh
        return SequenceShard.create(length, mesh.size(), mesh.get_local_rank(), mesh.get_group()).to(
            self.context.device)

    def _prepare(self, batch: Batch | ContextParallelBatch, length: int) -> tuple[Batch, SequenceShard | None]:
        """The whole micro-batch padded to ``length`` tokens, and this rank's slice of it (context parallelism:
        the feed hands out ``ContextParallelBatch``es, cut for their own length; the stages need the step's)."""
        if isinstance(batch, ContextParallelBatch):
            batch = batch.whole
        return self._pad(batch.to(self.context.device), length), self._shard(length)

    def _pad(self, batch: Batch, length: int) -> Batch:
        extra = length - batch.input_ids.shape[1]
        if extra < 0:
            raise Gemma3VLError(f"a micro-batch of {batch.input_ids.shape[1]} tokens is longer than train.seq_length "
                                f"{self.seq_length}")
        if extra == 0:
            return batch

        def pad(tensor: torch.Tensor, value: int) -> torch.Tensor:
            return nn.functional.pad(tensor, (0, extra), value=value)

        info = TokenInfo(positions=pad(batch.info.positions, 0), segment_ids=pad(batch.info.segment_ids, 0),
                         image_block_ids=pad(batch.info.image_block_ids, -1))
        return Batch(pad(batch.input_ids, 0), pad(batch.targets, IGNORE), info, batch.pixel_values, batch.sources)

    # ------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[Batch], total_targets: int) -> float:
        """Forward and backward of the step's micro-batches through the schedule; returns the summed loss of
        this data-parallel rank's micro-batches (the same on every pipeline rank)."""
        if len(micro_batches) != self.micro_batches:
            raise RuntimeError(f"the pipeline was built for {self.micro_batches} micro-batches, "
                               f"got {len(micro_batches)}")
        length = self._padded_length(self.seq_length)
        prepared = [self._prepare(batch, length) for batch in micro_batches]
        batches = [batch for batch, _ in prepared]
        self.inputs.set(batches, [shard for _, shard in prepared], total_targets)
        index = torch.arange(len(batches))
        args = (torch.cat([b.input_ids for b in batches]),) if self.has_first else ()
        self.schedule.step(*args, target=index, micro_batch=index)
        summed = sum(float(loss) for loss, _ in self.inputs.losses) if self.has_last else 0.0
        self.inputs.set([], [], 1)
        return self.sum_over_pipeline(summed)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of the whole model, every pipeline rank taking part: this rank's stages'
        (a DTensor counts its whole shape, so FSDP and TP inside a stage count once) summed over the pipeline
        ranks, the last stage's copy of the tied embedding not counted."""
        named = [(name, p) for name, p in self.view.named_parameters() if name not in self.duplicate_names]
        counts = torch.tensor([sum(p.numel() for _, p in named if p.requires_grad), sum(p.numel() for _, p in named)],
                              dtype=torch.float64, device=self.context.device)
        dist.all_reduce(counts, group=self.group)
        return int(counts[0].item()), int(counts[1].item())

    def sum_over_pipeline(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.context.device)
        dist.all_reduce(tensor, group=self.group)
        return float(tensor.item())

    def sync_tied_gradients(self) -> None:
        """Sum the gradients of the two copies of the tied embedding (stage 0's and the last stage's)."""
        param = self.tied_parameter
        if param is None or not param.requires_grad:
            return
        if param.grad is None:  # no target token on this rank in the whole step: still take part
            param.grad = torch.zeros_like(param)
        with torch.no_grad():
            grad = param.grad
            if isinstance(grad, DTensor) and grad.placements != param.placements:
                # Under TP the embedding's backward leaves a Replicate() gradient for the Shard(0) matrix; the
                # loss's is Shard(0): bring both to the parameter's layout (a local slice) before summing shards.
                grad = param.grad = grad.redistribute(param.device_mesh, param.placements)
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            dist.all_reduce(local, group=self.tied_group)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip to the whole model's gradient norm: the sum of squares over this rank's stages (the tied
        matrix counted once, on stage 0), summed over the pipeline ranks. Syncs the tied gradients first."""
        self.sync_tied_gradients()
        named = [(name, p) for name, p in self.view.named_parameters() if p.requires_grad and p.grad is not None]
        counted = [p.grad for name, p in named if name not in self.duplicate_names]
        if counted:
            local = torch.nn.utils.get_total_norm(counted, 2.0)
            if isinstance(local, DTensor):
                local = local.full_tensor()
            squares = local.detach().to(torch.float64).reshape(1) ** 2
        else:
            squares = torch.zeros(1, dtype=torch.float64, device=self.context.device)
        squares = squares.to(self.context.device)
        dist.all_reduce(squares, group=self.group)
        total = squares.sqrt().to(torch.float32).reshape(())
        torch.nn.utils.clip_grads_with_norm_([p for _, p in named], max_norm, total)
        return total

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def forward_only(self, batch: Batch, shard: SequenceShard | None = None) -> tuple[torch.Tensor, int]:
        """(summed loss, target count) of one batch, every pipeline rank taking part: each runs its stages in
        order, receiving the hidden states from the previous stage's rank and sending them to the next. Every
        rank ends with the last stage's numbers.

        Under context parallelism each rank computes its slice: ``shard`` given (``context_parallel_loss``), the
        numbers are the slice's (the caller sums them over the context-parallel ranks); without it, the rows are
        sliced here and the numbers summed over the context-parallel ranks too: the whole batch's."""
        device = self.context.device
        sum_slices = self.context_parallel and shard is None
        length = self._padded_length(batch.input_ids.shape[1])
        batch = self._pad(batch.to(device), length)
        shard = self._shard(length, shard)
        saved = self.inputs.saved()
        self.inputs.set([batch], [shard], 1)
        pp, group = self.context.dims.pp, self.group
        index = torch.zeros(1, dtype=torch.long)
        hidden_dtype = self.stage_modules[0].boundary_dtype
        rows, tokens = batch.input_ids.shape[0], length // (shard.degree if shard is not None else 1)
        try:
            for module in self.stage_modules:
                if module.is_first:
                    x = batch.input_ids
                else:
                    x = torch.empty((rows, tokens, module.config.text.hidden_size), dtype=hidden_dtype,
                                    device=device)
                    dist.recv(x, group_src=(module.stage_index - 1) % pp, group=group)
                out = module(x, index)
                if not module.is_last:
                    dist.send(out.contiguous(), group_dst=(module.stage_index + 1) % pp, group=group)
            result = torch.zeros(2, dtype=torch.float64, device=device)
            if self.has_last:
                summed, count = self.inputs.losses[0]
                result = torch.tensor([float(summed), float(count)], dtype=torch.float64, device=device)
            dist.all_reduce(result, group=group)  # the other ranks add 0
            if sum_slices:
                dist.all_reduce(result, group=self.context.cp_mesh.get_group())
        finally:
            self.inputs.restore(saved)
        return result[0], int(result[1].item())


# ---------------------------------------------------------------------------------------------- building it
def _tied_group(context: ParallelContext, first_rank: int, last_rank: int) -> dist.ProcessGroup | None:
    """The process group of the two pipeline ranks holding the tied embedding's copies, for this rank's
    coordinates of the other mesh dimensions. With two pipeline ranks it is the pipeline group itself;
    otherwise every rank creates every pair's group (``new_group`` is collective), keeping its own."""
    if context.dims.pp == 2:
        return context.pp_mesh.get_group()
    ranks = context.mesh.mesh  # [pp, dp_replicate, dp_shard, cp, tp] of global ranks
    lines = ranks.reshape(ranks.shape[0], -1)
    mine = None
    for column in range(lines.shape[1]):
        pair = sorted({int(lines[first_rank, column]), int(lines[last_rank, column])})
        group = dist.new_group(pair)
        if dist.get_rank() in pair:
            mine = group
    return mine


def build_pipeline(
    model: Gemma3Model,
    context: ParallelContext,
    *,
    schedule: str,
    stages_per_rank_setting: int,
    micro_batches: int,
    micro_batch_size: int,
    seq_length: int,
    activation_checkpoint: str = "none",
    compile: bool = False,
    compile_mode: str = "default",
    param_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
    load: Callable[[nn.Module], int] | None = None,
) -> PipelinedGemma3Model:
    """Cut ``model`` into this rank's stages, parallelize each (TP, checkpointing, compile, FSDP over the
    stage's data-parallel ranks) and build the schedule. Returns the view of this rank's modules that the
    trainer uses; its ``pipeline`` attribute runs the steps.

    ``model`` is either built on the meta device, and then ``load(stage)`` fills each parallelized stage once
    it has storage (``load_sharded``: returns the bytes it read), or plain and loaded whole on the host."""
    on_meta = any(param.is_meta for param in model.parameters())
    if on_meta and load is None:
        raise RuntimeError("build_pipeline: a model on the meta device needs a load(stage) to fill its stages")
    pp, pp_rank, device = context.dims.pp, context.pp_mesh.get_local_rank(), context.device
    per_rank = stages_per_rank(schedule, stages_per_rank_setting)
    num_stages = pp * per_rank
    runs = split_layers(len(model.text.layers), num_stages)
    local_indices = [pp_rank + k * pp for k in range(per_rank)]
    weight_dtype = next(model.parameters()).dtype
    boundary_dtype = param_dtype or weight_dtype
    # bf16 autocast where the one-process run has it (model.dtype=auto: fp32 weights, bf16 compute); not for
    # model.dtype=float32, whose compute dtype (param_dtype) is None.
    autocast = device.type == "cuda" and weight_dtype == torch.float32 and param_dtype == torch.bfloat16
    inputs = StepInputs()
    sharded = context.dims.tp_enabled or context.dims.fsdp_enabled
    modules: list[nn.Module] = []
    bytes_read = 0
    for index in local_indices:
        first, last = index == 0, index == num_stages - 1
        stage = _stage_model(model, runs[index], first, last)
        if not sharded and not on_meta:
            stage.to(device)
        with warnings.catch_warnings():
            # The TP plan names modules a stage may not hold (text.embed, vision): parallelize_module warns.
            warnings.filterwarnings("ignore", message=".*could not be resolved.*")
            parallelize(stage, context, activation_checkpoint=activation_checkpoint, compile=compile,
                        compile_mode=compile_mode,
                        param_dtype=param_dtype, cpu_offload=cpu_offload)
        if on_meta:
            # Storage for this stage's shards only, then its boxes of the checkpoint (the whole model's names).
            stage.to_empty(device="cpu" if cpu_offload else device)
            bytes_read += load(stage)
        _become_stage(stage)
        stage.stage_index, stage.is_first, stage.is_last = index, first, last
        stage.inputs, stage.boundary_dtype, stage.autocast = inputs, boundary_dtype, autocast
        modules.append(stage)

    hidden = model.config.text.hidden_size
    # Rows are padded to whole sequence-parallel shards and, under context parallelism, to 2 x cp whole chunks:
    # stage 0 takes whole rows of ids, the stages pass each other this rank's slice of the hidden states.
    cp = context.dims.cp
    row_multiple = (context.dims.tp if context.sequence_parallel else 1) * (2 * cp if cp > 1 else 1)
    length = -(-seq_length // row_multiple) * row_multiple
    stages = []
    for module in modules:
        ids = torch.zeros(micro_batch_size, length, dtype=torch.long, device=device)
        # requires_grad: the stages send each other the gradients of the hidden states (static metadata says so).
        states = torch.zeros(micro_batch_size, length // cp, hidden, dtype=boundary_dtype, device=device,
                             requires_grad=True)
        loss = torch.zeros(1, dtype=torch.float32, device=device)
        stages.append(PipelineStage(
            module, module.stage_index, num_stages, device,
            input_args=(ids if module.is_first else states,), output_args=(loss if module.is_last else states,),
            group=context.pp_mesh.get_group(),
        ))

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output.sum()  # the stage already returns summed loss / the step's target tokens

    if schedule == "1f1b":
        runner = Schedule1F1B(stages[0], n_microbatches=micro_batches, loss_fn=loss_fn, scale_grads=False)
    else:
        runner = ScheduleInterleaved1F1B(stages, n_microbatches=micro_batches, loss_fn=loss_fn, scale_grads=False)

    view = _view(model, modules)
    tied = model.text.lm_head is None
    holds_first, holds_last = 0 in local_indices, num_stages - 1 in local_indices
    tied_parameter = view.text.embed.weight if tied and (holds_first or holds_last) else None
    first_rank, last_rank = 0, (num_stages - 1) % pp
    tied_group = _tied_group(context, first_rank, last_rank) if tied else None
    duplicates = frozenset({"text.embed.weight"} if tied and holds_last and not holds_first else ())
    view.pipeline = Pipeline(
        context=context, stage_modules=modules, stages=stages, schedule=runner, inputs=inputs,
        num_stages=num_stages, micro_batches=micro_batches, seq_length=seq_length, row_multiple=row_multiple,
        tied_parameter=tied_parameter, tied_group=tied_group, duplicate_names=duplicates, view=view,
        bytes_read=bytes_read if on_meta else None,
    )
    return view


def _view(model: Gemma3Model, modules: Iterable[nn.Module]) -> PipelinedGemma3Model:
    """One skeleton holding every module of this rank's stages (as parallelized) under the whole model's
    names: what the optimizer, checkpoints and the export walk."""
    view = _skeleton(model.config)
    view.__class__ = PipelinedGemma3Model
    _copy_settings(model, view)
    text = view.text
    text.embed = text.norm = text.lm_head = None
    view.vision = view.projector = None
    blocks: dict[int, nn.Module] = {}
    for module in sorted(modules, key=lambda m: m.stage_index):
        if module.is_first or (module.is_last and module.text.embed is not None and text.embed is None):
            text.embed = module.text.embed
        if module.is_first:
            view.vision, view.projector = module.vision, module.projector
        if module.is_last:
            text.norm, text.lm_head = module.text.norm, module.text.lm_head
        blocks.update({int(key): block for key, block in module.text.layers._modules.items()})
    text.layers = StageLayers(blocks)
    return view


def pipeline_of(model: nn.Module) -> Pipeline | None:
    return getattr(model, "pipeline", None) if isinstance(model, PipelinedGemma3Model) else None


def bubble_fraction(pp: int, micro_batches: int, per_rank: int = 1) -> float:
    """The idle share of a step: ``(p - 1) / (v m + p - 1)``."""
    return (pp - 1) / (per_rank * micro_batches + pp - 1) if pp > 1 else 0.0


__all__ = ["SCHEDULES", "PipelinedGemma3Model", "Pipeline", "StageLayers", "build_pipeline", "bubble_fraction",
           "check_pipeline", "pipeline_of", "split_layers", "stages_per_rank"]
