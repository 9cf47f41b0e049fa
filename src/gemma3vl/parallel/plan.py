"""Will it fit? Per-GPU memory of a training run in each candidate layout, and the layout to use.

An estimate from the model's shapes, not a measurement: parameter counts are exact (the model is built on
the meta device), the rest is the accounting below. Every term is per GPU, in bytes.

* **States.** Full SFT keeps fp32 master weights, fp32 gradients and AdamW's two fp32 moments: 16 bytes per
  parameter. LoRA keeps the base weights (4 bytes in fp32, 2 with ``model.dtype=bfloat16``) and 16 bytes per
  adapter parameter. Tensor parallelism divides the decoder and the embedding by ``tp`` (the vision tower is
  replicated over TP); FSDP divides everything by the data-parallel degree.
* **Working copies.** Under FSDP the root unit (embedding, vision tower, projector) stays gathered in bf16 for
  the whole step (``parallel/fsdp.py`` says why), plus two gathered blocks (the current one and the prefetched
  one) and one block's gradients before they are reduce-scattered. Without FSDP, bf16 autocast caches a bf16
  copy of every weight for the step instead.
* **Activations** of one micro-batch (``train.micro_batch_size`` rows of ``seq`` tokens), counted per token
  and layer from what our block saves for backward (the RMSNorms work in fp32, so they dominate): about
  ``40 D + 4 (H + 2K) hd + 14 (H + K) hd + 4 H hd + 8 I`` bytes without checkpointing; with ``selective``
  only the matmul, attention and collective outputs (``2 (H + 2K) hd + 2 H hd + 6 D + 4 I``), with ``full``
  only the block input
  (``2 D``) — both plus one whole block during its recomputation. Sequence parallelism divides the
  token-wise terms by ``tp``. The vision tower is never checkpointed: about ``32 Dv + 6 Iv`` bytes per patch
  and layer per image.
* **Loss**: the chunked cross-entropy's fp32 logits and their gradient for one 4,096-token chunk over this
  rank's vocabulary, and the fp32 gradient of the output matrix.
* **Peak**: the larger of the end of forward (activations and the loss buffers alive, no gradients yet) and
  the end of backward (all gradients, only one block's activations).
* **Overhead**: 5% for the caching allocator plus 1.5 GiB (CUDA context, NCCL buffers, workspaces).

Checked on an H200 (torch 2.11) against the trainer's step on the 4B, one GPU, seq 4096 with one image, for
each checkpointing mode (docs/distributed.md has the table): the peak is 2-5% above the measured peak
allocation, the total 5-8% above the memory the allocator reserved. Sharded layouts are not measured yet.
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


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts by where the layout puts them."""

    config: Gemma3Config
    block: int  # one decoder block
    layers: int
    embed: int
    vision: int  # tower + projector (replicated over TP)
    other: int  # final norm, untied head
    lora_block: int  # LoRA r16 on every text projection of one block

    @property
    def total(self) -> int:
        return self.block * self.layers + self.embed + self.vision + self.other


def load_config(model: str) -> Gemma3Config:
    """``4b`` / ``12b`` / ``27b`` (the shipped hub configs) or a checkpoint directory."""
    preset = preset_path(model)
    if preset is not None:
        return Gemma3Config.from_file(preset)
    path = Path(model)
    if path.is_dir():
        from gemma3vl import bridge

        return bridge.read_config(path)
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
    adapted = [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]  # q k v o gate up down
    return ModelCounts(
        config=config, block=block, layers=len(model.text.layers), embed=model.text.embed.weight.numel(),
        vision=vision, other=sum(p.numel() for p in model.text.norm.parameters()),
        lora_block=sum(lora_rank * (a + b) for a, b in adapted),
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

    @property
    def total(self) -> float:
        return self.peak + self.overhead


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
) -> Estimate:
    """Per-GPU bytes of one layout (``gpus / tp`` data-parallel ranks)."""
    text, vision = counts.config.text, counts.config.vision
    dp = gpus // tp
    sharded_text = (counts.block * counts.layers + counts.embed) / tp + counts.other
    per_rank = (sharded_text + counts.vision) / dp
    weight_bytes = 2 if bf16_weights else 4
    if mode == "sft":
        trainable, trainable_block = per_rank, counts.block / tp
        states = 16 * per_rank  # fp32 weights, gradients, two AdamW moments
    else:
        trainable, trainable_block = counts.lora_block * counts.layers / tp / dp, counts.lora_block / tp
        states = weight_bytes * per_rank + 16 * trainable
    if dp > 1:  # FSDP: gathered root unit for the step, two gathered blocks, one block's gradient in flight
        root = counts.embed / tp + counts.vision
        working = 2 * root + 2 * 2 * counts.block / tp + 6 * trainable_block
    else:  # autocast's bf16 copy of every weight
        working = 0.0 if bf16_weights else 2 * sharded_text + 2 * counts.vision

    d, i, hd = text.hidden_size, text.intermediate_size, text.head_dim
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    tokens = seq * micro_batch
    token_split = tp if sequence_parallel else 1  # norms and the residual stream under SP
    # 36 D: four fp32 RMSNorms (sharded under SP); 4 D: the inputs of QKV and gate/up (gathered under TP);
    # then QKV, q/k norms (fp32), rotary, attention, and the MLP's gate/up, GeGLU and down inputs.
    attention = 4 * (heads + 2 * kv) * hd + 14 * (heads + kv) * hd + 4 * heads * hd
    whole = 36 * d / token_split + 4 * d + (attention + 8 * i) / tp
    if activation_checkpoint == "none":
        per_layer = whole * counts.layers
    elif activation_checkpoint == "selective":
        kept = 2 * (heads + 2 * kv) * hd / tp + 2 * heads * hd / tp + 6 * d / token_split + 4 * i / tp
        per_layer = kept * counts.layers + whole
    else:
        per_layer = 2 * d / token_split * counts.layers + whole
    activations = tokens * per_layer + tokens * 4 * d  # + embeddings and final hidden states
    if vision is not None and images:
        patches = vision.num_patches
        activations += images * micro_batch * patches * vision.num_hidden_layers * (
            32 * vision.hidden_size + 6 * vision.intermediate_size)
    vocab = text.vocab_size / tp
    loss = 8 * min(tokens, LOSS_CHUNK) * vocab + (4 * vocab * d if mode == "sft" else 0) + 4 * tokens * d
    # The peak is the end of forward (activations and the loss's buffers alive, no gradients yet: they are
    # set to None every step) or the end of backward (every gradient, activations gone but one block's).
    end_of_forward = states - 4 * trainable + working + activations + loss
    end_of_backward = states + working + tokens * whole
    peak = max(end_of_forward, end_of_backward)
    return Estimate(tp=tp, dp=dp, activation_checkpoint=activation_checkpoint, states=states, working=working,
                    activations=activations, loss=loss, overhead=0.05 * peak + 1.5 * GIB, peak=peak)


def candidates(counts: ModelCounts, gpus: int, **kwargs) -> list[Estimate]:
    """Every layout worth considering: TP degrees that divide the KV heads and the GPUs (within a node; only
    1 for LoRA), FSDP over the rest, each checkpointing mode."""
    kv = counts.config.text.num_key_value_heads
    degrees = [tp for tp in range(1, min(gpus, GPUS_PER_NODE) + 1) if kv % tp == 0 and gpus % tp == 0]
    if kwargs.get("mode") == "peft":
        degrees = [1]  # adapters are not tensor-parallel yet (ParallelDims.validate refuses it)
    return [estimate(counts, gpus=gpus, tp=tp, activation_checkpoint=mode, **kwargs)
            for tp in degrees for mode in AC_MODES]


def recommend(options: list[Estimate], gpu_memory_bytes: float) -> Estimate | None:
    """The fitting layout expected to run fastest: least recomputation first, then the least TP (each TP
    degree adds two collectives per layer), then the most headroom."""
    fitting = [o for o in options if o.total <= gpu_memory_bytes]
    if not fitting:
        return None
    return min(fitting, key=lambda o: (AC_COMPUTE[o.activation_checkpoint] * (1 + 0.08 * (o.tp - 1)), o.total))


def settings_of(choice: Estimate) -> str:
    """The settings that differ from the defaults (``parallel.dp_shard=-1`` already gives FSDP the rest)."""
    parts = []
    if choice.tp > 1:
        parts.append(f"parallel.tp={choice.tp}")
    if choice.activation_checkpoint != "none":
        parts.append(f"parallel.activation_checkpoint={choice.activation_checkpoint}")
    return " ".join(parts)


def format_plan(counts: ModelCounts, options: list[Estimate], choice: Estimate | None, *, gpus: int,
                gpu_memory_gb: float, seq: int, mode: str) -> str:
    lines = [
        f"model: {counts.total / 1e9:.2f}B parameters ({counts.layers} layers; embedding {counts.embed / 1e9:.2f}B, "
        f"vision + projector {counts.vision / 1e9:.2f}B); {mode}, seq {seq}, {gpus} GPU(s) of {gpu_memory_gb:g} GB",
        "",
        f"{'tp':>3} {'fsdp':>5} {'checkpointing':>13} {'states':>8} {'working':>8} {'activ.':>8} {'loss':>7} "
        f"{'other':>7} {'total GiB':>10}  fits",
    ]
    limit = gpu_memory_gb * 1e9
    for o in options:
        lines.append(
            f"{o.tp:>3} {o.dp:>5} {o.activation_checkpoint:>13} {o.states / GIB:>8.1f} {o.working / GIB:>8.1f} "
            f"{o.activations / GIB:>8.1f} {o.loss / GIB:>7.1f} {o.overhead / GIB:>7.1f} {o.total / GIB:>10.1f}  "
            f"{'yes' if o.total <= limit else 'no'}"
        )
    lines.append("(total: the larger of the end of forward, without gradients, and the end of backward, without most "
                 "activations, plus other)")
    lines.append("")
    if choice is None:
        lines.append("nothing fits: use more GPUs, a shorter train.seq_length, peft (--mode peft), "
                     "model.dtype=bfloat16, or parallel.cpu_offload=true")
    else:
        settings = settings_of(choice)
        lines.append(f"recommended: {settings or 'the defaults'}   (~{choice.total / GIB:.1f} GiB per GPU)")
        launch = "gemma3vl train" if gpus == 1 else (
            f"torchrun --nproc-per-node {min(gpus, GPUS_PER_NODE)}"
            f"{f' --nnodes {gpus // GPUS_PER_NODE}' if gpus > GPUS_PER_NODE else ''} -m gemma3vl train")
        lines.append(f"  {launch} ... {settings}".rstrip())
    return "\n".join(lines)
