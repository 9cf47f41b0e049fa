"""Will it fit? Per-GPU memory of a training run in each candidate layout, and the layout to use.

An estimate from the model's shapes, not a measurement: parameter counts are exact (the model is built on
the meta device), the rest is the accounting below. Every term is per GPU, in bytes. A layout is ``tp`` x
``cp`` x ``pp`` x data-parallel ranks; ``N`` below is the parameters this GPU holds, ``T`` the tokens of one
micro-batch (``train.micro_batch_size`` rows of ``seq``), ``L`` the decoder blocks this GPU runs.

* **States.** Full SFT keeps weights, gradients and AdamW's two moments in the weights' dtype: 16 bytes per
  parameter in fp32, 8 with ``model.dtype=bfloat16``. ``optim.cpu_offload`` (one GPU) moves the moments and an
  fp32 master copy to the host (12 bytes per parameter there, and during the optimizer step a 4-byte fp32 copy
  of every gradient beside them: 16): 8 bytes on the GPU (4 in bf16). LoRA keeps the base weights (4 bytes in
  fp32, 2 in bf16) and, per adapter parameter, its weight, gradient and two moments in the same dtype (16 bytes,
  8 in bf16). Tensor parallelism divides the decoder, the embedding and an untied output matrix by ``tp`` (the
  vision tower is replicated over TP, and so is half of every adapter: ``lora_A`` of QKV and gate/up, ``lora_B``
  of the output and down projections); FSDP divides everything by the data-parallel degree times ``cp``
  (context-parallel ranks hold the same parameters, FSDP shards over both). Pipeline stages hold their own blocks
  (``pipeline.split_layers``); the first stage also the embedding and the vision tower, the last the output
  matrix for the loss (a copy of the tied embedding, or the untied ``lm_head``).
* **Working copies.** Under FSDP the root unit (embedding, vision tower, projector) stays gathered in bf16 for
  the whole step (``parallel/fsdp.py`` says why), plus two gathered blocks (the current one and the prefetched
  one) and one block's gradients before they are reduce-scattered. Without FSDP, bf16 autocast caches a bf16
  copy of every weight for the step instead (none for bf16 weights).
* **Activations** of one micro-batch, counted per token and layer from what our block saves for backward (the
  RMSNorms work in fp32, so they dominate): about ``W = 40 D + 4 (H + 2K) hd + 14 (H + K) hd + 4 H hd + 8 I``
  bytes without checkpointing; with ``selective`` only the matmul, attention and collective outputs
  (``2 (H + 2K) hd + 2 H hd + 6 D + 4 I``), with ``full`` only the block input (``2 D``) — both plus one whole
  block (``T W``) during its recomputation. So with full checkpointing: ``T (2 D L + W)``. Sequence parallelism
  divides the token-wise terms by ``tp``. Plus ``4 D`` a token for the embeddings and the final hidden states.
  The vision tower is never checkpointed: about ``32 Dv + 6 Iv`` bytes per patch and layer per image when it
  trains (full fine-tuning); under LoRA it is frozen and its input is pixels, so it keeps nothing for backward
  (and autocast keeps no bf16 copy of its weights).
* **Attention masks.** FlexAttention (``model.attention=auto`` on CUDA, or ``flex``) builds a block-sparse mask
  (a few integers per 128 x 128 tile): no ``[T, T]`` term. SDPA (``--attention sdpa``) needs dense boolean masks
  of the two layer types and their float copy inside the kernel: ``4 B Tq Tk`` bytes (``Tq`` this rank's
  queries, ``Tk`` all keys), 69 GB at 131,072 tokens.
* **Context parallelism** (``cp``): every token-wise term above (activations, loss) is for this rank's
  ``T / cp`` tokens, plus the keys and values all-gathered from the other ranks for each layer's attention,
  ``2 x 2 K hd / tp`` bytes per token of the rest of the row: kept for backward by every layer without ``full``
  checkpointing, one layer's (and its gradient) with it. The vision tower's activations are not divided: the
  rank whose slice holds the image runs the tower.
* **Pipeline parallelism** (``pp``, 1F1B): stage ``s`` of ``p`` holds the activations of up to ``min(m, p - s)``
  micro-batches in flight (``m``: the step's micro-batches per data-parallel rank); its gradients accumulate over
  the step, so they are alive with the activations. The worst stage is shown. The bubble, ``(p - 1) / (m + p - 1)``
  of each step idle, is shown as a cost.
* **Both** (``pp`` x ``cp``, as the trainer runs them: stages outermost, each stage's context-parallel ranks
  splitting every row): a stage's terms are the context-parallel ones for its own blocks, per micro-batch in
  flight: ``T / cp`` tokens of activations (what passes between stages is the slice too), and each of its layers'
  all-gathered keys and values; FSDP shards the stage over its data- and context-parallel ranks.
* **Loss**: the chunked cross-entropy's fp32 logits and their gradient for one 4,096-token chunk over this
  rank's vocabulary, and the fp32 gradient of the output matrix.
* **Peak**: the larger of the end of forward (activations and the loss buffers alive, no gradients yet) and
  the end of backward (all gradients, only one block's activations); under PP, all of them together.
* **Overhead**: 5% for the caching allocator plus 1.5 GiB (CUDA context, NCCL buffers, workspaces).

Checked on an H200 (torch 2.11) against the trainer's step on the 4B, one GPU, seq 4096 with one image, for
each checkpointing mode (docs/distributed.md has the table): the peak is 2-5% above the measured peak
allocation, the total 5-8% above the memory the allocator reserved. Sharded, context- and pipeline-parallel
layouts, offloading and long sequences are not measured yet: they are the same arithmetic, not a reading.

The recommendation is the simplest layout that fits: FSDP (with TP where the memory needs it, preferring less
recomputation over more TP as before), then the optimizer on the host (one GPU), then context parallelism, then
pipeline stages, then both together last; within each, the one expected to run fastest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gemma3vl.config import Gemma3Config, preset_path
from gemma3vl.errors import Gemma3VLError

GIB = 2**30
LOSS_CHUNK = 4096
AC_MODES = ("none", "selective", "full")
AC_COMPUTE = {"none": 1.0, "selective": 1.05, "full": 1.33}  # forward+backward time relative to no checkpointing
GPUS_PER_NODE = 8  # TP stays within a node: its collectives are on the critical path of every layer
RENDEZVOUS = "--rdzv-backend c10d --rdzv-endpoint FIRST_NODE:29500 --rdzv-id JOB"  # several nodes' torchrun
MAX_SEQ = 131_072  # Gemma 3's context (4B, 12B, 27B): the longest train.seq_length worth planning
DEFAULT_GLOBAL_BATCH = 32  # train.global_batch_size of the recipes (train.config.TrainSettings' default)


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts by where the layout puts them."""

    config: Gemma3Config
    block: int  # one decoder block
    layers: int
    embed: int
    vision: int  # tower + projector (replicated over TP)
    other: int  # final norm (replicated over TP)
    lora_block: int  # LoRA r16 on every text projection of one block
    head: int = 0  # an untied output matrix (``text.lm_head``, vocab-parallel under TP); 0 when tied
    lora_block_replicated: int = 0  # of ``lora_block``, what TP replicates (lora_A of QKV, gate/up; lora_B of o, down)

    @property
    def total(self) -> int:
        return self.block * self.layers + self.embed + self.vision + self.other + self.head

    @property
    def tied(self) -> bool:
        return self.head == 0

    def lora_per_tp_rank(self, tp: int) -> float:
        """One block's adapter parameters on one tensor-parallel rank."""
        return self.lora_block_replicated + (self.lora_block - self.lora_block_replicated) / tp


def load_config(model: str) -> Gemma3Config:
    """``4b`` / ``12b`` / ``27b`` (the shipped hub configs) or a checkpoint directory (one that stores an output
    matrix of its own gets an untied head, as the trainer builds it)."""
    preset = preset_path(model)
    if preset is not None:
        return Gemma3Config.from_file(preset)
    path = Path(model)
    if path.is_dir():
        import dataclasses

        from gemma3vl import bridge

        config = bridge.read_config(path)
        if config.text.tie_word_embeddings and bridge.has_untied_head(path):
            config = config.replace(text=dataclasses.replace(config.text, tie_word_embeddings=False))
        return config
    raise Gemma3VLError(f"--model {model!r}: not 4b, 12b, 27b or a checkpoint directory")


def count_parameters(config: Gemma3Config, lora_rank: int = 16) -> ModelCounts:
    from gemma3vl.model import Gemma3Model

    with torch.device("meta"):
        model = Gemma3Model(config)
    block = sum(p.numel() for p in model.text.layers[0].parameters())
    vision = sum(p.numel() for part in (model.vision, model.projector) if part is not None for p in part.parameters())
    text = config.text
    q, kv = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
    d, i = text.hidden_size, text.intermediate_size
    adapted = [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]  # q k v o gate up down (in, out)
    head = model.text.lm_head
    return ModelCounts(
        config=config, block=block, layers=len(model.text.layers), embed=model.text.embed.weight.numel(),
        vision=vision, other=sum(p.numel() for p in model.text.norm.parameters()),
        lora_block=sum(lora_rank * (a + b) for a, b in adapted),
        head=0 if head is None else head.weight.numel(),
        # column-parallel q k v gate up: lora_A [r, D] whole on every rank; row-parallel o down: lora_B [D, r]
        lora_block_replicated=7 * lora_rank * d,
    )


@dataclass(frozen=True)
class Estimate:
    tp: int
    dp: int
    activation_checkpoint: str
    states: float
    working: float
    activations: float
    loss: float
    overhead: float
    peak: float  # the larger of the end of forward and the end of backward (see ``estimate``)
    cp: int = 1
    pp: int = 1
    cpu_offload: bool = False  # optim.cpu_offload: AdamW's state on the host
    micro_batches: int = 1  # per data-parallel rank and step (the pipeline's micro-batches)
    bubble: float = 0.0  # share of a pipelined step spent idle
    host: float = 0.0  # host bytes of the offloaded optimizer
    stage: int = 0  # under PP, the stage these numbers are for (the one with the largest total)

    @property
    def total(self) -> float:
        return self.peak + self.overhead

    @property
    def tier(self) -> int:
        """How much the layout asks of the run: 0 FSDP/TP, 1 optimizer on the host, 2 context-, 3 pipeline-parallel,
        4 both."""
        if self.pp > 1:
            return 4 if self.cp > 1 else 3
        return 2 if self.cp > 1 else 1 if self.cpu_offload else 0


def pipeline_stage_blocks(layers: int, stages: int) -> list[int]:
    """Blocks per stage, as ``gemma3vl.parallel.pipeline.split_layers`` cuts them (the middle stages take the
    extra blocks first, then the last, then the first)."""
    base, extra = divmod(layers, stages)
    sizes = [base] * stages
    order = list(range(1, stages - 1)) + [stages - 1, 0] if stages > 1 else [0]
    for stage in order[:extra]:
        sizes[stage] += 1
    return sizes


def estimate(
    counts: ModelCounts,
    *,
    gpus: int,
    tp: int,
    activation_checkpoint: str,
    seq: int,
    micro_batch: int = 1,
    mode: str = "sft",
    images: int = 1,
    bf16_weights: bool = False,
    sequence_parallel: bool = True,
    cp: int = 1,
    pp: int = 1,
    micro_batches: int | None = None,
    cpu_offload: bool = False,
    attention: str = "flex",
) -> Estimate:
    """Per-GPU bytes of one layout (``gpus / (tp cp pp)`` data-parallel ranks); under PP the worst stage's,
    with ``micro_batches`` per data-parallel rank and step (default ``4 pp``)."""
    if gpus % (tp * cp * pp):
        raise Gemma3VLError(f"tp={tp} x cp={cp} x pp={pp} does not divide {gpus} GPUs")
    if cpu_offload and (gpus > 1 or mode != "sft"):
        raise Gemma3VLError("optim.cpu_offload is for full fine-tuning in one process "
                            "(under FSDP: parallel.cpu_offload)")
    if attention not in ("flex", "sdpa"):
        raise Gemma3VLError(f"attention={attention!r}: expected flex or sdpa")
    if pp > counts.layers:
        raise Gemma3VLError(f"pp={pp}: more stages than the model's {counts.layers} decoder blocks")
    dp = gpus // (tp * cp * pp)
    m = micro_batches or 4 * pp
    if pp > 1 and m < pp:
        raise Gemma3VLError(f"pp={pp} with {m} micro-batches a step: 1F1B needs at least {pp}")
    sizes = pipeline_stage_blocks(counts.layers, pp)
    stages = [
        _stage(counts, blocks=sizes[s], first=s == 0, last=s == pp - 1, pp=pp, in_flight=min(m, pp - s), tp=tp,
               dp=dp, cp=cp, activation_checkpoint=activation_checkpoint, seq=seq, micro_batch=micro_batch,
               mode=mode, images=images, bf16_weights=bf16_weights, sequence_parallel=sequence_parallel,
               cpu_offload=cpu_offload, attention=attention)
        for s in range(pp)
    ]
    worst = max(range(pp), key=lambda s: stages[s]["peak"])
    parts = stages[worst]
    return Estimate(tp=tp, dp=dp, activation_checkpoint=activation_checkpoint, cp=cp, pp=pp, cpu_offload=cpu_offload,
                    micro_batches=m if pp > 1 else 1, bubble=(pp - 1) / (m + pp - 1) if pp > 1 else 0.0,
                    stage=worst, overhead=0.05 * parts["peak"] + 1.5 * GIB, **parts)


def _stage(counts: ModelCounts, *, blocks: int, first: bool, last: bool, pp: int, in_flight: int, tp: int, dp: int,
           cp: int, activation_checkpoint: str, seq: int, micro_batch: int, mode: str, images: int,
           bf16_weights: bool, sequence_parallel: bool, cpu_offload: bool, attention: str) -> dict[str, float]:
    """The terms of one GPU running ``blocks`` decoder blocks (all of them without PP), the first stage's
    embedding and vision tower, the last stage's loss."""
    text, vision = counts.config.text, counts.config.vision
    shards = dp * cp  # FSDP shards over the data- and context-parallel ranks
    # The output matrix: tied, the embedding (stage 0's, and a copy on the last stage); untied, the last's lm_head.
    embeds = (1 if first else 0) + (1 if last and pp > 1 and counts.tied else 0)
    outputs = counts.embed * embeds + (counts.head if last else 0)
    sharded_text = (counts.block * blocks + outputs) / tp + (counts.other if last else 0)
    vision_here = counts.vision if first else 0
    per_rank = (sharded_text + vision_here) / shards
    weight_bytes = 2 if bf16_weights else 4
    host = 0.0
    if mode == "sft":
        trainable, trainable_block = per_rank, counts.block / tp
        if cpu_offload:  # weights and gradients on the GPU; fp32 master and moments on the host, and in the
            # optimizer step an fp32 copy of every gradient there too (``HostOffloadAdamW.step``)
            states = 2 * weight_bytes * per_rank
            host = 16 * per_rank
        else:  # weights, gradients, two AdamW moments, all in the weights' dtype
            states = 4 * weight_bytes * per_rank
    else:  # adapters in the weights' dtype (made from the base weight), with their gradients and AdamW moments
        trainable_block = counts.lora_per_tp_rank(tp)
        trainable = trainable_block * blocks / shards
        states = weight_bytes * per_rank + 4 * weight_bytes * trainable
    grad_bytes = weight_bytes
    if shards > 1:  # FSDP: gathered root unit for the step, two gathered blocks, one block's gradient in flight
        root = outputs / tp + vision_here
        working = 2 * root + 2 * 2 * counts.block / tp + 6 * trainable_block
    else:  # autocast's bf16 copy of every weight it keeps for the step (none of a frozen vision tower's)
        kept_vision = vision_here if mode == "sft" else 0
        working = 0.0 if bf16_weights else 2 * (sharded_text + kept_vision)

    d, i, hd = text.hidden_size, text.intermediate_size, text.head_dim
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    row_tokens = seq * micro_batch  # one micro-batch, whole rows
    tokens = row_tokens / cp  # this rank's slice of them
    token_split = tp if sequence_parallel else 1  # norms and the residual stream under SP
    # 36 D: four fp32 RMSNorms (sharded under SP); 4 D: the inputs of QKV and gate/up (gathered under TP);
    # then QKV, q/k norms (fp32), rotary, attention, and the MLP's gate/up, GeGLU and down inputs.
    attention_bytes = 4 * (heads + 2 * kv) * hd + 14 * (heads + kv) * hd + 4 * heads * hd
    whole = 36 * d / token_split + 4 * d + (attention_bytes + 8 * i) / tp
    # Kept for backward per micro-batch in flight (``kept``), and once: the block being recomputed (``once``).
    if activation_checkpoint == "none":
        kept_layers, kept, once = blocks, tokens * whole * blocks, 0.0
    elif activation_checkpoint == "selective":
        saved = 2 * (heads + 2 * kv) * hd / tp + 2 * heads * hd / tp + 6 * d / token_split + 4 * i / tp
        kept_layers, kept, once = blocks, tokens * saved * blocks, tokens * whole
    else:
        kept_layers, kept, once = 0, tokens * 2 * d / token_split * blocks, tokens * whole
    kept += tokens * 2 * d * ((1 if first else 0) + (1 if last else 0))  # embeddings / final hidden states
    one_block = tokens * whole  # the working set of the block being recomputed / backpropagated
    if cp > 1:  # the other ranks' keys and values, all-gathered per layer (bf16)
        gathered = 2 * 2 * kv * hd / tp * (row_tokens - tokens)
        kept += gathered * kept_layers
        once += 2 * gathered  # one layer's during its recomputation, and their gradient
        one_block += 2 * gathered
    if attention == "sdpa":  # two dense boolean [Tq, Tk] masks and the kernel's float copy of one
        mask = 4 * micro_batch * (seq / cp) * seq
        kept += mask
        one_block += mask
    if first and vision is not None and images and mode == "sft":  # a frozen tower (LoRA) keeps nothing
        kept += images * micro_batch * vision.num_patches * vision.num_hidden_layers * (
            32 * vision.hidden_size + 6 * vision.intermediate_size)
    activations = in_flight * kept + once
    loss = 0.0
    if last:
        vocab = text.vocab_size / tp
        loss = 8 * min(tokens, LOSS_CHUNK) * vocab + (4 * vocab * d if mode == "sft" else 0) + 4 * tokens * d
    # The peak is the end of forward (activations and the loss's buffers alive, no gradients yet: they are
    # set to None every step) or the end of backward (every gradient, activations gone but one block's).
    # Under PP a stage's gradients accumulate over the step while later micro-batches' activations are alive.
    end_of_forward = states - (grad_bytes * trainable if pp == 1 else 0) + working + activations + loss
    end_of_backward = states + working + one_block
    return {"states": states, "working": working, "activations": activations, "loss": loss, "host": host,
            "peak": max(end_of_forward, end_of_backward)}


def _divisors(n: int, limit: int) -> list[int]:
    return [k for k in range(1, min(n, limit) + 1) if n % k == 0]


def gpus_per_node(gpus: int) -> int:
    """GPUs a node runs: all of them up to ``GPUS_PER_NODE``, else the most (up to that) that divide them
    evenly (torchrun starts the same number of processes on every node: 12 GPUs are 2 nodes of 6)."""
    return max(_divisors(gpus, GPUS_PER_NODE))


def candidates(counts: ModelCounts, gpus: int, *, global_batch_size: int | None = None, **kwargs) -> list[Estimate]:
    """Every layout worth considering, each with each checkpointing mode: TP degrees that divide the KV heads
    and the GPUs (within a node), FSDP over the rest; on one GPU for full fine-tuning, also the
    optimizer on the host; on several, context-parallel degrees (powers of two), pipeline stages (1F1B), and
    both together (each stage's context-parallel ranks splitting every row).

    ``global_batch_size`` (rows a step) sets the pipeline's micro-batches (without it, ``4 pp``) and leaves out the
    layouts whose data-parallel ranks cannot share it in whole micro-batches."""
    mode = kwargs.get("mode", "sft")
    micro_batch = kwargs.get("micro_batch", 1)
    kv = counts.config.text.num_key_value_heads
    degrees = [tp for tp in _divisors(gpus_per_node(gpus), GPUS_PER_NODE) if kv % tp == 0]
    powers = [2**k for k in range(1, gpus.bit_length()) if gpus % 2**k == 0]
    layouts: list[tuple[int, int, int, bool]] = [(tp, 1, 1, False) for tp in degrees]  # tp, cp, pp, offload
    if gpus == 1 and mode == "sft":
        layouts.append((1, 1, 1, True))
    layouts += [(tp, cp, 1, False) for tp in degrees for cp in powers if gpus % (tp * cp) == 0]
    layouts += [(tp, cp, pp, False) for tp in degrees for cp in [1, *powers] for pp in powers
                if gpus % (tp * cp * pp) == 0 and pp <= counts.layers]
    options = []
    for tp, cp, pp, offload in layouts:
        micro_batches = None
        dp = gpus // (tp * cp * pp)
        if global_batch_size and global_batch_size % (micro_batch * dp):
            continue  # train refuses it: each data-parallel rank takes whole micro-batches of the step's rows
        if pp > 1 and global_batch_size:
            micro_batches = global_batch_size // (micro_batch * dp)
            if micro_batches < pp:
                continue  # 1F1B needs at least pp micro-batches a step
        for ac in AC_MODES:
            options.append(estimate(counts, gpus=gpus, tp=tp, cp=cp, pp=pp, cpu_offload=offload,
                                    micro_batches=micro_batches, activation_checkpoint=ac, **kwargs))
    return options


def speed_cost(option: Estimate) -> float:
    """Relative step time: recomputation, each TP and CP degree's collectives on the critical path, the bubble."""
    cost = AC_COMPUTE[option.activation_checkpoint] * (1 + 0.08 * (option.tp - 1)) * (1 + 0.05 * (option.cp - 1))
    return cost / (1 - option.bubble)


def recommend(options: list[Estimate], gpu_memory_bytes: float) -> Estimate | None:
    """The simplest fitting layout (FSDP/TP, then the optimizer on the host, then CP, then PP, then both:
    ``tier``), and among those the one expected to run fastest: least recomputation first, then the least TP
    (each TP degree adds two collectives per layer), then the most headroom."""
    fitting = [o for o in options if o.total <= gpu_memory_bytes]
    if not fitting:
        return None
    return min(fitting, key=lambda o: (o.tier, speed_cost(o), o.total))


def batch_for(choice: Estimate, micro_batch: int, global_batch_size: int | None) -> int | None:
    """The ``train.global_batch_size`` a layout needs set, None when the given one (or the default) fits it: the
    default's rows a step (:data:`DEFAULT_GLOBAL_BATCH`) must split into whole micro-batches over the data-parallel
    ranks (train refuses it otherwise), so the smallest multiple of ``micro_batch x dp`` at least as large."""
    if global_batch_size is not None or choice.pp > 1:  # (a pipeline's is set from its micro-batches)
        return None
    share = micro_batch * choice.dp
    return None if DEFAULT_GLOBAL_BATCH % share == 0 else -(-DEFAULT_GLOBAL_BATCH // share) * share


def settings_of(choice: Estimate, *, seq: int | None = None, micro_batch: int = 1, bf16_weights: bool = False,
                attention: str = "flex", global_batch_size: int | None = None) -> str:
    """The settings that differ from the defaults (``parallel.dp_shard=-1`` already gives FSDP the rest), as
    ``key=value`` overrides for ``gemma3vl train``; ``global_batch_size``: the one ``--global-batch-size`` gave
    (None: the default, set here when the layout's data-parallel ranks cannot share it)."""
    parts = []
    batch = batch_for(choice, micro_batch, global_batch_size)
    if batch is not None:
        parts.append(f"train.global_batch_size={batch}")
    if seq is not None and seq != 4096:
        parts.append(f"train.seq_length={seq}")
    if micro_batch != 1:
        parts.append(f"train.micro_batch_size={micro_batch}")
    if choice.tp > 1:
        parts.append(f"parallel.tp={choice.tp}")
    if choice.cp > 1:
        parts.append(f"parallel.cp={choice.cp}")
    if choice.pp > 1:
        parts.append(f"parallel.pp={choice.pp}")
        parts.append(f"train.global_batch_size={choice.micro_batches * micro_batch * choice.dp}")
    if choice.activation_checkpoint != "none":
        parts.append(f"parallel.activation_checkpoint={choice.activation_checkpoint}")
    if choice.cpu_offload:
        parts.append("optim.cpu_offload=true")
    if bf16_weights:
        parts.append("model.dtype=bfloat16")
    if attention == "sdpa":
        parts.append("model.attention=sdpa")
    return " ".join(parts)


def shown(options: list[Estimate], gpu_memory_bytes: float) -> list[Estimate]:
    """The table's rows: every FSDP/TP (and host-optimizer) row; of each context- or pipeline-parallel layout
    only its best row (the fastest that fits, else the smallest), so that the table stays readable."""
    rows, best = [], {}
    for o in options:
        if o.tier < 2:
            rows.append(o)
            continue
        key = (o.tp, o.cp, o.pp)
        fits = o.total <= gpu_memory_bytes
        rank = (0, speed_cost(o), o.total) if fits else (1, o.total, 0.0)
        if key not in best or rank < best[key][0]:
            best[key] = (rank, o)
    return rows + [o for _, o in best.values()]


def format_plan(counts: ModelCounts, options: list[Estimate], choice: Estimate | None, *, gpus: int,
                gpu_memory_gb: float, seq: int, mode: str, micro_batch: int = 1, bf16_weights: bool = False,
                attention: str = "flex", show_all: bool = False, global_batch_size: int | None = None) -> str:
    lines = [
        f"model: {counts.total / 1e9:.2f}B parameters ({counts.layers} layers; embedding {counts.embed / 1e9:.2f}B, "
        f"vision + projector {counts.vision / 1e9:.2f}B); {mode}, seq {seq}, {gpus} GPU(s) of {gpu_memory_gb:g} GB, "
        f"{'FlexAttention' if attention == 'flex' else 'SDPA with dense masks'}",
        "",
        f"{'tp':>3} {'fsdp':>5} {'cp':>3} {'pp':>3} {'checkpointing':>13} {'states':>8} {'working':>8} {'activ.':>8} "
        f"{'loss':>7} {'other':>7} {'total GiB':>10}  fits  notes",
    ]
    limit = gpu_memory_gb * 1e9
    for o in options if show_all else shown(options, limit):
        notes = []
        if o.cpu_offload:
            notes.append(f"optim.cpu_offload: {o.host / GIB:.0f} GiB on the host")
        if o.pp > 1:
            notes.append(f"{o.micro_batches} micro-batches, bubble {o.bubble:.0%}, stage {o.stage}")
        lines.append(
            f"{o.tp:>3} {o.dp:>5} {o.cp:>3} {o.pp:>3} {o.activation_checkpoint:>13} {o.states / GIB:>8.1f} "
            f"{o.working / GIB:>8.1f} {o.activations / GIB:>8.1f} {o.loss / GIB:>7.1f} {o.overhead / GIB:>7.1f} "
            f"{o.total / GIB:>10.1f}  {'yes' if o.total <= limit else 'no ':<4}  {'; '.join(notes)}".rstrip()
        )
    lines.append("(total: the larger of the end of forward, without gradients, and the end of backward, without most "
                 "activations, plus other; fsdp: data-parallel ranks, FSDP shards over fsdp x cp)")
    if not show_all and len(options) > len(shown(options, limit)):
        lines.append("(context- and pipeline-parallel layouts: their best checkpointing mode only; "
                     "--all shows every row)")
    lines.append("")
    if choice is None:
        levers = ["more GPUs", "a shorter train.seq_length"]
        levers += ["peft (--mode peft)"] * (mode != "peft")
        levers += ["model.dtype=bfloat16 (--bf16-weights)"] * (not bf16_weights)
        levers += ["parallel.cpu_offload=true"]
        lines.append(f"nothing fits: use {', '.join(levers[:-1])}, or {levers[-1]}")
    else:
        settings = settings_of(choice, seq=seq, micro_batch=micro_batch, bf16_weights=bf16_weights,
                               attention=attention, global_batch_size=global_batch_size)
        lines.append(f"recommended: {settings or 'the defaults'}   (~{choice.total / GIB:.1f} GiB per GPU)")
        batch = batch_for(choice, micro_batch, global_batch_size)
        if batch is not None:
            lines.append(f"  (train.global_batch_size: the default {DEFAULT_GLOBAL_BATCH} rows a step do not split "
                         f"into whole micro-batches over {choice.dp} data-parallel ranks; {batch} do. Pass "
                         "--global-batch-size to plan for the layouts your batch fits)")
        per_node = gpus_per_node(gpus)
        # Several nodes: one torchrun per node, meeting at the first one (without a rendezvous endpoint each node's
        # torchrun would wait for the others on its own localhost).
        launch = "gemma3vl train" if gpus == 1 else (
            f"torchrun --nproc-per-node {per_node}"
            f"{f' --nnodes {gpus // per_node} {RENDEZVOUS}' if gpus > per_node else ''} -m gemma3vl train")
        lines.append(f"  {launch} ... {settings}".rstrip())
        if gpus > per_node:
            lines.append(f"  (on each of the {gpus // per_node} nodes; FIRST_NODE: the first node's address, JOB: any "
                         f"name shared by the nodes; --out on a filesystem every node mounts at the same path)")
        if choice.cpu_offload:
            lines.append(f"  (the optimizer needs {choice.host / GIB:.0f} GiB of host memory)")
        if choice.pp > 1:
            lines.append(f"  (the pipeline idles {choice.bubble:.0%} of each step: "
                         "more micro-batches a step shrink it)")
    return "\n".join(lines)
