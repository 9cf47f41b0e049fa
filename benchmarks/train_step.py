"""Training-step throughput, MFU and memory: our trainer against transformers (sdpa), same weights, same batch.

Run from the repository root (no install needed, no network):

    PYTHONPATH=src python benchmarks/train_step.py --model 4b --flex-check 4096 --out "$OUT"   # GPU, 4B, 4,096 tokens
    PYTHONPATH=src python benchmarks/train_step.py --model 4b --mode sft --ours-paths fast \
        --seqs 16384,32768,65536,131072 --warmup 1 --steps 1 --tag=-long --out "$OUT"        # long context
    PYTHONPATH=src python benchmarks/train_step.py --model 27b --mode peft --ours-paths fast --steps 2 --out "$OUT"
    PYTHONPATH=src python benchmarks/train_step.py --tiny --device cpu --out /tmp/bench     # seconds, on a CPU

Method (as ``hf_anchor.py`` took the transformers figures, but a whole optimizer step): random weights at the
real shapes, built on the device (nothing written to disk), one sequence of ``--seq`` tokens per step with one
896 px image (its soft tokens in a ``<start_of_image>``..``<end_of_image>`` block near the start) and labels on
all the text after the image. Each variant runs ``--warmup`` steps (the first compiles, for ``ours fast``), then
``--steps`` timed steps, each between two ``synchronize`` calls; the figure is the median. Peak memory is
``torch.cuda.max_memory_allocated`` since the model was built (weights, gradients, optimizer state and
activations); an out-of-memory error is caught and reported as ``OOM``, and that variant is then not tried at
longer lengths (``skipped: OOM at N tokens``). Variants run one after the other in this process, everything freed
in between.

Variants, each with the ``gemma3_vl_<size>_sft`` / ``_peft`` recipe's optimizer settings (AdamW, fused on CUDA,
grad clip 1.0) at one row per step (``global_batch_size = micro_batch_size = 1``):

* ``ours fast``: ``gemma3vl.train.trainer.Trainer.train_step`` with the speed settings: ``model.attention=auto``
  (FlexAttention with a block-sparse mask on CUDA), ``parallel.compile=true`` (every decoder block compiled, on
  CUDA), activation checkpointing by length (``--ac``; auto: none up to 8,192 tokens, selective up to 16,384,
  full beyond), and the chunked loss (always on: full logits are never built);
* ``ours plain``: the same step with SDPA and a dense mask, eager, no checkpointing: the reference the fast path's
  first-step loss is compared with (same weights, same batch; the bf16 difference is reported);
* weights in bf16 (``model.dtype=bfloat16``: what transformers runs) or fp32 (``--ours-weights fp32``, the recipe
  default on CUDA: fp32 master weights, forward under bf16 autocast); ``--cpu-offload``: AdamW state on the host
  (``optim.cpu_offload``). PEFT: LoRA r16 on the text projections (``gemma3vl.train.lora``);
  ``--freeze-vision``: the SigLIP tower frozen on both sides (ours: ``train.freeze_vision=true``; transformers: its
  tower's parameters without gradients), its MFU counted as a forward only;
* ``transformers``: ``Gemma3ForConditionalGeneration`` (sdpa) in bf16, ``loss.backward()``, clip, AdamW step;
  gradient checkpointing above 4,096 tokens (``--hf-checkpointing``; the anchor needed it to reach 16,384 at
  all); PEFT through ``peft.get_peft_model`` with the same LoRA settings and target modules.

Both models get the same random weights (drawn per tensor from a seed, written through the bridge's name
mapping), so the first step's loss must agree up to bf16 rounding: the table shows it as a check.

MFU = model FLOPs of the step / step time / the card's dense bf16 peak (``gemma3vl.train.metrics``: 989 TFLOP/s
for H100 SXM and H200). Model FLOPs (``gemma3vl.train.flops``, the count the trainer's logged MFU uses too): 2 per
multiply-add of every matmul of the text decoder and LM head, attention as 4 x heads x head_dim per (query, key)
pair actually attended (causal: (T + 1) / 2 keys per query on global layers, at most the window on sliding ones),
the SigLIP tower and projector per image; x3 for full fine-tuning (forward + backward), x2 for the LoRA'd decoder
and x1 for a frozen vision tower; recomputation by checkpointing is not counted.

``--flex-check SEQ`` first compares FlexAttention with SDPA at the model's head shapes on a packed row with
images, both layer types: bf16 forward and backward on CUDA, each against an fp32 reference.

Writes ``train_step-<model><tag>.json`` under ``--out`` (rewritten after every variant) and prints the
comparisons (ours fast / transformers tokens/s; fast vs plain first-step loss) and a table last. ``generate.py``
imports the model-building helpers from here.
"""

from __future__ import annotations

import argparse
import gc
from contextlib import contextmanager
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from gemma3vl.bridge.layouts import detect_layout, get_layout
from gemma3vl.bridge.mapping import Mapping, build_mappings, stores_untied_head
from gemma3vl.bridge.random_checkpoint import LAYER_NORM_STD, NORM_STD
from gemma3vl.config import SLIDING, Gemma3Config, preset_path
from gemma3vl.data.batch import IGNORE, Batch
from gemma3vl.errors import Gemma3VLError
from gemma3vl.model import Gemma3Model, TokenInfo
from gemma3vl.tiny import tiny_hf_config
from gemma3vl.train.flops import forward_flops, keys_per_query, step_flops  # noqa: F401  (the one FLOP count)
from gemma3vl.train.metrics import peak_flops_per_second

WEIGHT_STD = 0.02  # as write_random_hf_checkpoint
DRAW_DTYPE = torch.bfloat16  # weights are drawn in bf16 (like a hub checkpoint), then cast to the model's dtype


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ configs
def hf_config_dict(model: str, tiny: bool) -> dict[str, Any]:
    """The HF config.json of the 4B/12B/27B preset, or of the tiny test model."""
    if tiny:
        return tiny_hf_config()
    path = preset_path(model)
    if path is None:
        raise Gemma3VLError(f"no preset config for {model!r}")
    return json.loads(path.read_text())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Gemma3VLError("--device cuda was asked for, but no CUDA device is available")
    return device


# ------------------------------------------------------------------------------------------------ device
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes: the model size, the tiny CPU smoke mode, the device."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", default="4b", choices=["4b", "12b", "27b"])
    parser.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke test); sizes only")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    return parser


def start_stack_watchdog(interval_s: float) -> None:
    """A thread that prints every other thread's Python stack to stderr each ``interval_s`` seconds.
    Pure Python (``sys._current_frames``): faulthandler's own timer reads frames without the GIL and was seen to
    crash a process in the middle of an import. Stopped and joined at exit: a daemon thread still running while
    the interpreter finalizes was seen to abort the process ("terminate called without an active exception")."""
    import atexit
    import threading

    stop = threading.Event()

    def watch() -> None:
        me = threading.get_ident()
        names = {}
        while not stop.wait(interval_s):
            names.update((t.ident, t.name) for t in threading.enumerate())
            lines = [f"--- stacks after {interval_s:.0f} s more (BENCH_STACKS_AFTER_S) ---"]
            for ident, frame in sys._current_frames().items():
                if ident != me:
                    lines.append(f"thread {names.get(ident, ident)} (most recent call last):")
                    lines += [line.rstrip() for line in traceback.format_stack(frame)]
            print("\n".join(lines), file=sys.stderr, flush=True)

    thread = threading.Thread(target=watch, name="stack-watchdog", daemon=True)
    thread.start()

    def finish() -> None:
        stop.set()
        thread.join(timeout=10)

    atexit.register(finish)


def benchmark_setup(args) -> tuple[torch.device, Path, dict[str, Any], Gemma3Config, dict[str, Any]]:
    """The device, the output folder (made), the HF config dict and our config of ``--model``/``--tiny``, and
    the environment every JSON records.

    With ``BENCH_STACKS_AFTER_S`` set (run_all_gpu.sh sets it to a little under each step's timeout), every
    thread's Python stack is printed to stderr after that many seconds (and again each time as long again
    passes): a step that hangs or crawls then says where, instead of only timing out."""
    stacks_after = float(os.environ.get("BENCH_STACKS_AFTER_S") or 0)
    if stacks_after > 0:
        start_stack_watchdog(stacks_after)
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = hf_config_dict(args.model, args.tiny)
    return device, out, raw, Gemma3Config.from_hf_dict(raw), environment(device)


@contextmanager
def row_guard(row: Any, device: torch.device):
    """Run one benchmark row: running out of memory, or any other error, becomes the row's ``status`` (printed
    with its traceback) and the other rows still run."""
    try:
        yield
    except torch.OutOfMemoryError:
        row.status = "OOM"
        row.peak_gib = peak_gib(device)
    except Exception as exc:  # reported, and the other rows still run
        row.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        traceback.print_exc()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    def version(module: str) -> str | None:
        try:
            return __import__(module).__version__
        except Exception:  # not installed, or broken: reported as absent
            return None

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""

    return {
        "device": device_name(device),
        "device_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30
        if device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "commit": git("describe", "--always", "--dirty") or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ------------------------------------------------------------------------------------------------ weights
def draw(mapping: Mapping, device: torch.device, seed: int) -> torch.Tensor:
    """The random value of one native tensor: the same numbers for ours and for transformers' model, since
    it depends only on the tensor's native name, shape and ``seed`` (and the device's generator)."""
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(mapping.native.encode()))
    tensor = torch.empty(mapping.native_shape, device=device, dtype=DRAW_DTYPE)
    if mapping.init == "layer_norm":
        return tensor.normal_(1.0, LAYER_NORM_STD, generator=generator)
    return tensor.normal_(0.0, NORM_STD if mapping.init == "rms_norm" else WEIGHT_STD, generator=generator)


def native_mappings(config: Gemma3Config) -> list[Mapping]:
    return build_mappings(config, get_layout("hub" if config.is_vision_language else "text"))


@torch.no_grad()
def build_ours(config: Gemma3Config, device: torch.device, dtype: torch.dtype, seed: int) -> Gemma3Model:
    """Our model on ``device`` in ``dtype`` with random weights: built on the meta device and materialised
    there directly (no fp32 copy of a bf16 model, nothing on the host)."""
    with torch.device("meta"):
        model = Gemma3Model(config)
        if stores_untied_head(config):
            model.text.add_untied_head()
    model = model.to(dtype).to_empty(device=device)
    params = model.state_dict(keep_vars=True)
    mappings = native_mappings(config)
    names = {m.native for m in mappings}
    if names != set(params):
        raise Gemma3VLError(f"model and mapping table disagree: {sorted(names ^ set(params))[:5]}")
    for m in mappings:
        params[m.native].copy_(draw(m, device, seed))
    return model.eval()


@torch.no_grad()
def build_reference(raw: dict[str, Any], config: Gemma3Config, device: torch.device, dtype: torch.dtype, seed: int):
    """transformers' Gemma3ForConditionalGeneration (sdpa) on ``device`` with the very weights of
    ``build_ours(config, device, ..., seed)``: each native tensor is split into its HF tensors by the bridge's op."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = transformers.Gemma3Config.from_dict(raw)
        with torch.device(device):
            model = transformers.Gemma3ForConditionalGeneration._from_config(
                hf_config, dtype=dtype, attn_implementation="sdpa"
            )
    state = model.state_dict(keep_vars=True)
    layout = detect_layout(state.keys(), config.is_vision_language, "transformers' model in memory")
    written: set[int] = set()
    for m in build_mappings(config, layout):
        native = draw(m, device, seed)
        for key, part in zip(m.hf, m.op.to_hf(native)):
            state[key].copy_(part)
            written.add(id(state[key]))
    missed = [name for name, param in model.named_parameters() if id(param) not in written]
    if missed:
        raise Gemma3VLError(f"transformers' model has parameters the mapping table does not fill: {missed[:5]}")
    return model.eval()


# ------------------------------------------------------------------------------------------------ inputs
def image_sequence(config: Gemma3Config, length: int, generator: torch.Generator, text_before: int = 4) -> torch.Tensor:
    """``<bos>`` + a little text + one image block + random text, ``length`` ids in all."""
    image = config.mm_tokens_per_image
    if length < 1 + text_before + image + 2 + 1:
        raise Gemma3VLError(f"a sequence of {length} tokens cannot hold one image ({image} soft tokens) and text")
    text = config.text
    special = {text.pad_token_id, text.bos_token_id, config.boi_token_id, config.eoi_token_id,
               config.image_token_id, *config.stop_token_ids}
    low, high = 10, text.vocab_size
    ids = torch.randint(low, high, (length,), generator=generator)
    for token in special:
        ids[ids == token] = low
    start = 1 + text_before
    ids[0] = text.bos_token_id
    ids[start] = config.boi_token_id
    ids[start + 1:start + 1 + image] = config.image_token_id
    ids[start + 1 + image] = config.eoi_token_id
    return ids


def random_pixels(config: Gemma3Config, count: int, generator: torch.Generator) -> torch.Tensor:
    size = config.vision.image_size
    return torch.rand(count, config.vision.num_channels, size, size, generator=generator) * 2 - 1


@dataclass
class TrainInputs:
    """One row of ``seq`` tokens with one image; labels on the text after the image."""

    input_ids: torch.Tensor  # [1, T]
    labels: torch.Tensor  # [1, T], unshifted (transformers shifts them itself)
    pixel_values: torch.Tensor  # [1, 3, S, S] float32
    image_token_id: int

    @classmethod
    def make(cls, config: Gemma3Config, seq: int, device: torch.device, seed: int) -> "TrainInputs":
        generator = torch.Generator().manual_seed(seed)
        ids = image_sequence(config, seq, generator)
        labels = ids.clone()
        last_image_token = int((ids == config.eoi_token_id).nonzero()[0])
        labels[: last_image_token + 1] = IGNORE
        pixels = random_pixels(config, 1, generator)
        return cls(ids[None].to(device), labels[None].to(device), pixels.to(device), config.image_token_id)

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def target_count(self) -> int:
        """Positions with a target (after the shift): the rows the loss projects onto the vocabulary."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def ours(self, dtype: torch.dtype) -> Batch:
        targets = torch.full_like(self.labels, IGNORE)
        targets[:, :-1] = self.labels[:, 1:]
        info = TokenInfo.for_tokens(self.input_ids, image_token_id=self.image_token_id)
        return Batch(self.input_ids, targets, info, self.pixel_values.to(dtype))

    def transformers(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "pixel_values": self.pixel_values.to(dtype),
            "token_type_ids": (self.input_ids == self.image_token_id).long(),
        }


# ------------------------------------------------------------------------------------------------ variants
@dataclass
class Variant:
    impl: str  # ours | transformers
    mode: str  # sft | peft
    weights: str  # bf16 | fp32 (ours only: fp32 master weights under bf16 autocast)
    path: str = "plain"  # ours: plain (SDPA, eager) | fast (FlexAttention, compiled blocks, checkpointing by length)

    @property
    def label(self) -> str:
        return f"{self.impl}{' ' + self.path if self.impl == 'ours' else ''} {self.mode} {self.weights}"

    @property
    def family(self) -> str:
        """The variant apart from its length: one that ran out of memory is not tried at longer lengths."""
        return self.label


@dataclass
class Result:
    impl: str
    mode: str
    weights: str  # bf16 | fp32 + bf16 autocast (fp32 on a CPU)
    recipe: str
    seq: int
    path: str = ""  # ours: plain | fast; transformers: ""
    settings: str = ""  # attention kernel, compile, activation checkpointing, optimizer as run
    status: str = "ok"  # ok | OOM | skipped: OOM at N tokens | error: ...
    step_s: float | None = None
    steps_per_s: float | None = None
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    model_gib: float | None = None  # allocated right after building (weights, adapters)
    first_loss: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_dtypes: list[str] = field(default_factory=list)  # peft keeps adapters in fp32 on a bf16 model
    step_times_s: list[float] = field(default_factory=list)
    leftover_gib: float | None = None  # still allocated after the variant was freed
    flops_per_step: float | None = None  # model FLOPs of one step (see step_flops)
    mfu: float | None = None  # flops_per_step / step_s / the card's dense bf16 peak
    profile: list[dict[str, Any]] = field(default_factory=list)  # --profile: one more step's top operators


class RepeatBatch:
    """Stands in for ``StepFeed``: every optimizer step gets the same micro-batches (one one-row batch here;
    ``packing_gain.py`` hands a whole set of packed or padded micro-batches)."""

    def __init__(self, batch: Batch | list[Batch]):
        self.batches = batch if isinstance(batch, list) else [batch]

    def next_step(self) -> list[Batch]:
        return list(self.batches)

    def state_dict(self) -> dict[str, Any]:
        return {}


def card_bytes(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def fast_settings(seq: int, device: torch.device, ac: str, *, config: Gemma3Config | None = None,
                  card: int | None = None, mode: str = "sft", bf16_weights: bool = True,
                  cpu_offload: bool = False) -> dict[str, Any]:
    """What ``ours fast`` runs: FlexAttention (``model.attention=auto``: flex on CUDA), every block compiled on CUDA,
    and activation checkpointing chosen unless ``--ac`` says otherwise. With the card's memory (``card`` bytes),
    ``auto`` asks the planner (``gemma3vl plan``'s estimate for one GPU) for the least recomputation whose estimate
    fits in 90% of the card; without it: none up to 8,192 tokens, selective up to 16,384, full beyond."""
    if ac == "auto" and config is not None and card:
        from gemma3vl.parallel.plan import AC_MODES, count_parameters, estimate

        counts = count_parameters(config)
        for mode_ac in AC_MODES:
            guess = estimate(counts, gpus=1, tp=1, activation_checkpoint=mode_ac, seq=seq, mode=mode,
                             bf16_weights=bf16_weights, cpu_offload=cpu_offload)
            if guess.total <= 0.90 * card:
                ac = mode_ac
                break
        else:
            ac = "full"  # nothing fits by the estimate: the least memory, and the run reports what happens
    if ac == "auto":
        ac = "none" if seq <= 8192 else "selective" if seq <= 16384 else "full"
    return {"attention": "auto", "compile": device.type == "cuda", "activation_checkpoint": ac}


def recipe_config(model: str, mode: str, seq: int, weights: str):
    """The size's recipe, at one row of ``seq`` tokens per optimizer step (tiny runs use the 4B recipe)."""
    from gemma3vl.train.config import recipe

    cfg = recipe(f"gemma3_vl_{model if model != 'tiny' else '4b'}_{mode}")
    cfg.train.global_batch_size = 1
    cfg.train.micro_batch_size = 1
    cfg.train.seq_length = seq
    cfg.model.dtype = "bfloat16" if weights == "bf16" else "float32"
    cfg.validate()
    return cfg


def peft_config_for(config: Gemma3Config, cfg):
    """peft's LoraConfig with the targets our LoRA puts adapters on (read off a meta-device copy of ours)."""
    from gemma3vl.train.lora import apply_lora
    from gemma3vl.train.peft_export import peft_lora_config
    from gemma3vl.train.run import lora_config

    with torch.device("meta"):
        shadow = Gemma3Model(config)
        apply_lora(shadow, lora_config(cfg))
    peft_config = peft_lora_config(shadow, lora_config(cfg))
    peft_config.inference_mode = False
    return peft_config


def describe_params(model: torch.nn.Module, result: Result) -> None:
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    result.trainable_params = sum(p.numel() for p in trainable)
    result.total_params = sum(p.numel() for p in params)
    result.trainable_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainable})


def time_steps(step: Callable[[], float], warmup: int, steps: int, device: torch.device) -> tuple[list[float], float]:
    """Run ``warmup + steps`` steps; return the timed steps' durations and the first step's loss."""
    times, first_loss = [], None
    for index in range(warmup + steps):
        synchronize(device)
        started = time.perf_counter()
        loss = step()
        synchronize(device)
        elapsed = time.perf_counter() - started
        if first_loss is None:
            first_loss = loss
        if index >= warmup:
            times.append(elapsed)
        say(f"    step {index + 1}/{warmup + steps}: {elapsed:.3f} s, loss {loss:.4f}")
    return times, first_loss


def profile_step(step: Callable[[], Any], device: torch.device, top: int = 30) -> tuple[list[dict[str, Any]], float]:
    """One more step under ``torch.profiler``: the ``top`` operators by device time (CPU time on a CPU), each with
    its calls, total device and CPU milliseconds and share of the step's device time; and that total in ms. Printed
    as a table too: where a step's time goes, for the next optimisation (issue 5's 2x and 50% MFU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        step()
        synchronize(device)

    def device_us(event) -> float:
        return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0) or 0)

    events = list(prof.key_averages())
    on_device = device.type == "cuda"
    key = device_us if on_device else (lambda e: float(e.self_cpu_time_total))
    total = sum(key(e) for e in events) or 1.0
    rows = [{"name": e.key, "calls": int(e.count), "device_ms": device_us(e) / 1e3,
             "cpu_ms": float(e.self_cpu_time_total) / 1e3, "share": key(e) / total}
            for e in sorted(events, key=key, reverse=True)[:top]]
    say(f"    profile of one step: top {len(rows)} operators by self {'device' if on_device else 'CPU'} time "
        f"(total {total / 1e3:.1f} ms)")
    for row in rows:
        say(f"      {row['share']:6.1%}  {row['device_ms'] if on_device else row['cpu_ms']:9.2f} ms  "
            f"{row['calls']:6d}x  {row['name'][:110]}")
    return rows, total / 1e3


def weights_dtype(variant: Variant) -> torch.dtype:
    return torch.bfloat16 if variant.weights == "bf16" else torch.float32


def prepare_ours(variant: Variant, config: Gemma3Config, row_tokens: int, cfg, device, args, result) -> Gemma3Model:
    """Our model with ``variant``'s settings applied to it and to ``cfg`` (attention kernel, compiled blocks,
    checkpointing chosen for rows of ``row_tokens``; LoRA); ``result.settings`` and its parameter counts filled."""
    from gemma3vl.parallel import parallelize
    from gemma3vl.train.lora import apply_lora
    from gemma3vl.train.run import lora_config
    from gemma3vl.train.trainer import freeze

    model = build_ours(config, device, weights_dtype(variant), args.seed)
    freeze(model, cfg)
    if variant.mode == "peft":
        torch.manual_seed(args.seed)
        apply_lora(model, lora_config(cfg))
    if variant.path == "fast":
        chosen = fast_settings(row_tokens, device, args.ac, config=config, card=card_bytes(device),
                               mode=variant.mode, bf16_weights=variant.weights == "bf16",
                               cpu_offload=bool(args.cpu_offload))
        cfg.model.attention = chosen["attention"]
        cfg.parallel.compile = chosen["compile"]
        cfg.parallel.compile_mode = getattr(args, "compile_mode", "default")  # (packing_gain.py has no flag)
        cfg.parallel.activation_checkpoint = chosen["activation_checkpoint"]
    else:
        cfg.model.attention = "sdpa"
    cfg.optim.cpu_offload = bool(args.cpu_offload)
    model.text.attention_backend = cfg.model.attention
    if cfg.parallel.compile or cfg.parallel.activation_checkpoint != "none":
        parallelize(model, None, activation_checkpoint=cfg.parallel.activation_checkpoint,
                    compile=cfg.parallel.compile, compile_mode=cfg.parallel.compile_mode)
    from gemma3vl.model.flex import use_flex

    kernel = "flex" if use_flex(cfg.model.attention, device, row_tokens) else "sdpa"
    compiled = "compiled blocks and loss" + ("" if cfg.parallel.compile_mode == "default"
                                             else f" ({cfg.parallel.compile_mode})")
    result.settings = ", ".join([kernel, compiled if cfg.parallel.compile else "eager",
                                 f"AC {cfg.parallel.activation_checkpoint}",
                                 "AdamW on host" if cfg.optim.cpu_offload else "AdamW",
                                 *(["vision frozen"] if cfg.train.freeze_vision else [])])
    describe_params(model, result)
    result.model_gib = allocated_gib(device)
    return model


def run_ours(variant: Variant, config: Gemma3Config, inputs: TrainInputs, cfg, device, args, result: Result):
    from gemma3vl.train.trainer import Trainer

    began = time.perf_counter()
    model = prepare_ours(variant, config, inputs.tokens, cfg, device, args, result)
    trainer = Trainer(cfg, model, RepeatBatch(inputs.ours(weights_dtype(variant))), Path(args.out), device)
    if trainer.fold_clipping:
        result.settings += " (fused, clipping inside its kernel)"
    say(f"    built in {time.perf_counter() - began:.1f} s ({result.settings})"
        + ("; step 1 builds the masks and compiles the blocks" if cfg.parallel.compile else ""))
    reset_peak(device)
    timed = time_steps(lambda: trainer.train_step()["loss"], args.warmup, args.steps, device)
    if getattr(args, "profile", False):
        result.profile = profile_step(lambda: trainer.train_step()["loss"], device)[0]
    return timed


def prepare_transformers(variant: Variant, raw, config: Gemma3Config, row_tokens: int, cfg, device, args, result):
    """transformers' model (bf16, sdpa; peft for LoRA) and its optimizer, gradient checkpointing chosen for rows
    of ``row_tokens``; returns the step function for batches of transformers' keyword arguments."""
    from gemma3vl.train.schedule import build_optimizer, build_scheduler

    model = build_reference(raw, config, device, torch.bfloat16, args.seed)
    if variant.mode == "peft":
        import peft

        torch.manual_seed(args.seed)
        model = peft.get_peft_model(model, peft_config_for(config, cfg))
    if cfg.train.freeze_vision:
        vision_tower_of(model).requires_grad_(False)
    model.train()
    checkpointing = args.hf_checkpointing == "on" or (args.hf_checkpointing == "auto" and row_tokens > 4096)
    if checkpointing:  # what the anchor needed to reach 16,384 tokens at all
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    result.settings = ("sdpa" + (", gradient checkpointing" if checkpointing else "") + ", AdamW"
                       + (", vision frozen" if cfg.train.freeze_vision else ""))
    describe_params(model, result)
    result.model_gib = allocated_gib(device)
    optimizer = build_optimizer(model, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)  # our trainer's warmup + cosine: like losses
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(batches: list[dict[str, torch.Tensor]], weights: list[float]) -> float:
        """One optimizer step over micro-batches: each one's mean loss times its weight (its share of the step's
        target tokens: the token-weighted mean over the step, as our trainer), one clip, one AdamW step and
        the learning-rate schedule of our trainer (so both sides' losses can be compared step by step)."""
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for batch, weight in zip(batches, weights):
            loss = model(**batch).loss * weight
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        return total

    return step


def vision_tower_of(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' SigLIP tower inside ``Gemma3ForConditionalGeneration`` (or a peft model around it)."""
    for name, module in model.named_modules():
        if name.endswith("vision_tower"):
            return module
    raise Gemma3VLError(f"no vision_tower in {type(model).__name__}")


def run_transformers(
    variant: Variant, raw, config: Gemma3Config, inputs: TrainInputs, cfg, device, args, result: Result
):
    step = prepare_transformers(variant, raw, config, inputs.tokens, cfg, device, args, result)
    batch = inputs.transformers(torch.bfloat16)
    reset_peak(device)
    return time_steps(lambda: step([batch], [1.0]), args.warmup, args.steps, device)


def run_variant(variant: Variant, raw, config: Gemma3Config, seq: int, device: torch.device, args) -> Result:
    cfg = recipe_config(args.model_name, variant.mode, seq, variant.weights)
    cfg.train.freeze_vision = bool(getattr(args, "freeze_vision", False))  # (packing_gain.py has no flag)
    # The trainer autocasts fp32 weights to bf16 on CUDA only (gemma3vl.train.trainer.autocast_for).
    weights = "fp32 + bf16 autocast" if variant.weights == "fp32" and device.type == "cuda" else variant.weights
    result = Result(variant.impl, variant.mode, weights, cfg.recipe, seq,
                    path=variant.path if variant.impl == "ours" else "")
    say(f"[{variant.label} seq {seq}] building")
    with row_guard(result, device):
        inputs = TrainInputs.make(config, seq, device, args.seed)
        if variant.impl == "ours":
            times, first_loss = run_ours(variant, config, inputs, cfg, device, args, result)
        else:
            times, first_loss = run_transformers(variant, raw, config, inputs, cfg, device, args, result)
        step_s = statistics.median(times)
        result.step_times_s = times
        result.step_s = step_s
        result.steps_per_s = 1.0 / step_s
        result.tokens_per_s = seq / step_s
        result.first_loss = first_loss
        result.peak_gib = peak_gib(device)
        # the LM head counted on the positions with a target, as the trainer's logged MFU counts it
        result.flops_per_step = step_flops(config, seq, 1, variant.mode, targets=inputs.target_count,
                                           vision_trained=variant.mode == "sft" and not cfg.train.freeze_vision)
        peak = peak_flops_per_second(device_name(device))
        result.mfu = result.flops_per_step / step_s / peak if peak else None
    # Everything the variant built was local to the runner: gone once its frames (and any traceback) are.
    free_memory(device)
    result.leftover_gib = allocated_gib(device)
    say(f"[{variant.label} seq {seq}] {result.status}"
        + (f": {result.tokens_per_s:,.0f} tok/s, peak {fmt_gib(result.peak_gib)}" if result.status == "ok" else ""))
    return result


def skipped(variant: Variant, config: Gemma3Config, seq: int, args, shorter: int) -> Result:
    """The row of a variant not run at ``seq`` because it already ran out of memory at a shorter length."""
    cfg = recipe_config(args.model_name, variant.mode, seq, variant.weights)
    return Result(variant.impl, variant.mode, variant.weights, cfg.recipe, seq,
                  path=variant.path if variant.impl == "ours" else "", status=f"skipped: OOM at {shorter:,} tokens")


def variants(args) -> list[Variant]:
    modes = ["sft", "peft"] if args.mode == "both" else [args.mode]
    weights = [w.strip() for w in args.ours_weights.split(",") if w.strip()]
    if not weights or any(w not in ("bf16", "fp32") for w in weights):
        raise Gemma3VLError(f"--ours-weights {args.ours_weights!r}: expected bf16, fp32 or bf16,fp32")
    paths = [p.strip() for p in args.ours_paths.split(",") if p.strip()]
    if not paths or any(p not in ("fast", "plain") for p in paths):
        raise Gemma3VLError(f"--ours-paths {args.ours_paths!r}: expected fast, plain or fast,plain")
    chosen = []
    for mode in modes:
        # Per mode, like for like first: ours in each path (first weights), then transformers.
        if args.only in ("ours", "both"):
            chosen += [Variant("ours", mode, weights[0], path) for path in paths]
        if args.only in ("hf", "both"):
            chosen.append(Variant("transformers", mode, "bf16"))
    # Then ours in the other weights (fp32 master weights take the most memory: an OOM there comes last).
    if args.only in ("ours", "both"):
        chosen += [Variant("ours", mode, w, paths[0]) for w in weights[1:] for mode in modes]
    return chosen


# ------------------------------------------------------------------------------------------------ output
def fmt_gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} GiB"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


TABLE_HEADERS = [
    "impl", "path", "recipe", "weights", "seq", "steps/s", "tokens/s", "MFU", "peak mem", "loss step 1", "trainable",
    "settings", "status",
]


def fmt_mfu(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def table_row(r: Result) -> list[str]:
    ok = r.status == "ok"
    return [
        r.impl, r.path or "-", r.recipe, r.weights, f"{r.seq:,}",
        f"{r.steps_per_s:.3f}" if ok else "-",
        f"{r.tokens_per_s:,.0f}" if ok else "-",
        fmt_mfu(r.mfu) if ok else "-",
        fmt_gib(r.peak_gib) if ok else (f"≥ {fmt_gib(r.peak_gib)}" if r.peak_gib else "-"),
        f"{r.first_loss:.4f}" if ok else "-",
        f"{r.trainable_params / 1e6:,.1f} M ({'/'.join(r.trainable_dtypes)})" if r.trainable_params else "-",
        r.settings or "-",
        r.status,
    ]


def comparisons(results: list[Result]) -> list[dict[str, Any]]:
    """Per (mode, weights, seq): ours fast against transformers (tokens/s ratio) and against ours plain (the bf16
    difference of the first step's loss, same weights and batch: the fast path must track the plain one)."""
    found = []
    keys = sorted({(r.mode, r.weights, r.seq) for r in results}, key=lambda k: (k[2], k[0], k[1]))
    for mode, weights, seq in keys:
        def pick(impl: str, path: str = "") -> Result | None:
            for r in results:
                if (r.impl, r.path, r.mode, r.weights, r.seq) == (impl, path, mode, weights, seq) and r.status == "ok":
                    return r
            return None

        fast, plain, theirs = pick("ours", "fast"), pick("ours", "plain"), pick("transformers")
        if fast is None:
            continue
        entry: dict[str, Any] = {"mode": mode, "weights": weights, "seq": seq}
        if theirs is not None:
            entry["speedup_vs_transformers"] = fast.tokens_per_s / theirs.tokens_per_s
        if plain is not None:
            entry["speedup_vs_plain"] = fast.tokens_per_s / plain.tokens_per_s
            entry["loss_fast"], entry["loss_plain"] = fast.first_loss, plain.first_loss
            entry["loss_difference"] = fast.first_loss - plain.first_loss
        if len(entry) > 3:
            found.append(entry)
    return found


def comparison_lines(entries: list[dict[str, Any]]) -> list[str]:
    lines = []
    for e in entries:
        parts = [f"{e['mode']} {e['weights']} seq {e['seq']:,}:"]
        if "speedup_vs_transformers" in e:
            parts.append(f"ours fast = {e['speedup_vs_transformers']:.2f}x transformers tokens/s;")
        if "speedup_vs_plain" in e:
            parts.append(f"{e['speedup_vs_plain']:.2f}x ours plain; first-step loss fast {e['loss_fast']:.5f} vs "
                         f"plain {e['loss_plain']:.5f} (difference {e['loss_difference']:+.2e})")
        lines.append(" ".join(parts))
    return lines


def summary_rows(results: list[Result], model: str, flex: dict[str, Any] | None = None) -> list[list[str]]:
    """Rows for run_all_gpu.sh's combined table: benchmark, variant, throughput, memory, note."""
    rows = []
    for r in results:
        path = f" {r.path}" if r.path else ""
        variant = f"{r.impl}{path} {r.recipe} ({r.weights}), seq {r.seq:,}"
        throughput = (f"{r.steps_per_s:.2f} steps/s, {r.tokens_per_s:,.0f} tok/s, MFU {fmt_mfu(r.mfu)}"
                      if r.status == "ok" else r.status)
        memory = fmt_gib(r.peak_gib) if r.status == "ok" or r.peak_gib is None else f"≥ {fmt_gib(r.peak_gib)}"
        note = "; ".join(x for x in (f"loss@1 {r.first_loss:.3f}" if r.first_loss is not None else "", r.settings) if x)
        rows.append([f"train step {model}", variant, throughput, memory, note])
    for line in comparison_lines(comparisons(results)):
        rows.append([f"train step {model}", "comparison", line, "", ""])
    if flex is not None:
        rows.append([f"flex check {model}", flex.get("what", ""), flex.get("verdict", ""), "", flex.get("detail", "")])
    return rows


def write_json(path: Path, env: dict, args, results: list[Result], flex: dict[str, Any] | None = None) -> None:
    payload = {
        "benchmark": "train_step",
        "model": args.model_name,
        "settings": {k: v for k, v in vars(args).items() if k != "model_name"},
        **env,
        "peak_flops_per_s": peak_flops_per_second(env["device"]),
        "flops_formula": forward_flops.__doc__.strip() + "\n" + step_flops.__doc__.strip(),
        "results": [asdict(r) for r in results],
        "comparisons": comparisons(results),
        "flex_check": flex,
        "summary_rows": summary_rows(results, args.model_name, flex),
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ flex check
def check_row_info(config: Gemma3Config, seq: int) -> TokenInfo:
    """One packed row of ``seq`` tokens: three conversations, the first two with an image block each, and 5%
    padding at the end."""
    image = config.mm_tokens_per_image
    used = seq - seq // 20
    bounds = [0, used // 3, (2 * used) // 3, used]
    positions = torch.zeros(1, seq, dtype=torch.long)
    segments = torch.zeros(1, seq, dtype=torch.long)
    blocks = torch.full((1, seq), -1, dtype=torch.long)
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        positions[0, start:end] = torch.arange(end - start)
        segments[0, start:end] = index + 1
        if index < 2 and end - start > image + 8:
            blocks[0, start + 5:start + 5 + image] = index
    return TokenInfo(positions, segments, blocks)


def flex_attend(q, k, v, info: TokenInfo, window: int | None, scale: float) -> torch.Tensor:
    from gemma3vl.model.flex import attend_flex, block_mask

    return attend_flex(q, k, v, block_mask(info, info, window), scale)


def flex_check(config: Gemma3Config, seq: int, device: torch.device, seed: int, *, backward: bool | None = None,
               low: torch.dtype | None = None, candidate: Callable = flex_attend) -> dict[str, Any]:
    """FlexAttention against SDPA with the dense mask, at the model's head shapes (GQA) on a packed row with images,
    for both layer types: forward and backward in bf16 (CUDA; compiled flex), each measured against an fp32 SDPA
    reference. Agreement: flex's error is within 2x SDPA's own bf16 error (+1e-3). On a CPU: forward only, fp32
    (FlexAttention has no CPU backward).

    Padding rows (no key allowed) are outside the comparison, as they are outside the model's loss: flex gives them
    0 while the dense mask opens them to keep the softmax finite, so the incoming gradient is zero there (as in
    training, where no target sits on padding) and ``out``/``dq`` are compared on the live rows. (The H200 run of
    2026-11-28 drew the gradient on every row: the padding rows' own dq and their share of dk/dv in the reference
    showed up as a 5% "disagreement" that was the check's, not flex's.)

    ``backward``, ``low`` and ``candidate`` (the kernel under test, flex by default) let a CPU test run the
    backward comparison with a stand-in."""
    from gemma3vl.model.attention import attend, dense_mask

    text = config.text
    info = check_row_info(config, seq)
    info = TokenInfo(*(t.to(device) for t in (info.positions, info.segment_ids, info.image_block_ids)))
    live = (info.segment_ids != 0)[0]
    generator = torch.Generator(device=device).manual_seed(seed)
    shape_q = (1, text.num_attention_heads, seq, text.head_dim)
    shape_kv = (1, text.num_key_value_heads, seq, text.head_dim)
    base = [torch.randn(shape, generator=generator, device=device) for shape in (shape_q, shape_kv, shape_kv)]
    grad_out = torch.randn(shape_q, generator=generator, device=device) * live[None, None, :, None]
    backward = device.type == "cuda" if backward is None else backward
    low = low or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    report: dict[str, Any] = {"seq": seq, "dtype": str(low).removeprefix("torch."), "backward": backward, "layers": {}}
    agree = True
    for layer_type in (SLIDING, "full_attention"):
        window = text.sliding_window if layer_type == SLIDING else None
        dense = dense_mask(info, info, window)
        outputs = {}
        for name, dtype in (("reference", torch.float32), ("sdpa", low), ("flex", low)):
            q, k, v = (t.to(dtype).requires_grad_(backward) for t in base)
            if name == "flex":
                out = candidate(q, k, v, info, window, text.attention_scale)
            else:
                out = attend(q, k, v, dense, text.attention_scale)
            grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype)) if backward else ()
            if grads:  # queries on live rows only; keys/values get nothing from padding rows on either side
                grads = (grads[0][:, :, live], *grads[1:])
            outputs[name] = [out[:, :, live].float(), *(g.float() for g in grads)]
        errors = {}
        for index, tensor_name in enumerate(("out", "dq", "dk", "dv")[: len(outputs["flex"])]):
            ref = outputs["reference"][index]
            scale = float(ref.abs().max()) or 1.0
            flex_err = float((outputs["flex"][index] - ref).abs().max()) / scale
            sdpa_err = float((outputs["sdpa"][index] - ref).abs().max()) / scale
            ok = flex_err <= 2 * sdpa_err + 1e-3
            agree &= ok
            errors[tensor_name] = {"flex_vs_fp32": flex_err, "sdpa_vs_fp32": sdpa_err, "ok": ok}
        report["layers"][layer_type] = errors
        del outputs
    report["agree"] = agree
    report["what"] = (f"flex vs sdpa, {report['dtype']} {'forward+backward' if backward else 'forward'}, "
                      f"seq {seq:,}, packed row with images, both layer types")
    worst = max(e["flex_vs_fp32"] for layer in report["layers"].values() for e in layer.values())
    worst_sdpa = max(e["sdpa_vs_fp32"] for layer in report["layers"].values() for e in layer.values())
    report["verdict"] = "agree" if agree else "DISAGREE"
    report["detail"] = f"max error / max |ref|: flex {worst:.2e}, sdpa {worst_sdpa:.2e} (vs fp32 sdpa)"
    return report


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--seq", type=int, default=None, help="tokens per step (default 4096; tiny: 64)")
    parser.add_argument("--seqs", default=None, help="comma-separated sweep, e.g. 4096,16384,32768")
    parser.add_argument("--only", default="both", choices=["ours", "hf", "both"])
    parser.add_argument("--mode", default="both", choices=["sft", "peft", "both"])
    parser.add_argument("--ours-weights", default="bf16",
                        help="bf16 (model.dtype=bfloat16), fp32 (the recipe default on CUDA: fp32 master weights "
                             "under bf16 autocast), or both: bf16,fp32")
    parser.add_argument("--ours-paths", default="fast,plain",
                        help="fast (FlexAttention, compiled blocks, checkpointing by length), plain (SDPA, eager), "
                             "or both (fast,plain: the first-step loss of each is compared)")
    parser.add_argument("--compile-mode", default="default", choices=["default", "max-autotune-no-cudagraphs"],
                        help="ours fast: parallel.compile_mode (max-autotune-no-cudagraphs: inductor times its "
                             "candidate kernels at the first step, minutes more compiling)")
    parser.add_argument("--ac", default="auto", choices=["auto", "none", "full", "selective"],
                        help="activation checkpointing of ours fast (auto: on a GPU the least the planner says fits the card; "
                             "elsewhere none <= 8,192 tokens, selective <= 16,384, full beyond)")
    parser.add_argument("--hf-checkpointing", default="auto", choices=["auto", "on", "off"],
                        help="transformers' gradient checkpointing (auto: on above 4,096 tokens, as the anchor)")
    parser.add_argument("--cpu-offload", action="store_true", help="ours: AdamW state on the host (optim.cpu_offload)")
    parser.add_argument("--freeze-vision", action="store_true",
                        help="the SigLIP tower frozen on both sides (ours: train.freeze_vision=true)")
    parser.add_argument("--profile", action="store_true",
                        help="ours: after the timed steps, one more step under torch.profiler; its top operators by "
                             "device time are printed and kept in the JSON (not part of the timings)")
    parser.add_argument("--flex-check", type=int, default=0, metavar="SEQ",
                        help="first compare FlexAttention with SDPA at SEQ tokens (model head shapes; 0: skip)")
    parser.add_argument("--tag", default="", help="appended to the JSON file name (train_step-<model><tag>.json)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    args.model_name = "tiny" if args.tiny else args.model
    default_seq = 64 if args.tiny else 4096
    seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else [args.seq or default_seq]
    try:
        chosen = variants(args)
    except Gemma3VLError as exc:
        parser.error(str(exc))

    device, out, raw, config, env = benchmark_setup(args)
    say(f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"commit {env['commit']}")
    json_path = out / f"train_step-{args.model_name}{args.tag}.json"
    results: list[Result] = []
    flex = None
    if args.flex_check:
        try:
            flex = flex_check(config, args.flex_check, device, args.seed)
        except Exception as exc:  # reported; the timings still run
            traceback.print_exc()
            flex = {"what": f"flex vs sdpa, seq {args.flex_check:,}", "agree": False,
                    "verdict": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        free_memory(device)
        say(f"[flex check] {flex.get('verdict')}; {flex.get('detail', '')}")
        write_json(json_path, env, args, results, flex)
    ran_out: dict[str, int] = {}  # variant family -> the shortest length it ran out of memory at
    for seq in seqs:  # any order: the longest first gets the most wanted row in before a timeout
        for variant in chosen:
            if variant.family in ran_out and seq > ran_out[variant.family]:
                results.append(skipped(variant, config, seq, args, ran_out[variant.family]))
            else:
                results.append(run_variant(variant, raw, config, seq, device, args))
                if results[-1].status == "OOM":
                    ran_out[variant.family] = min(seq, ran_out.get(variant.family, seq))
            write_json(json_path, env, args, results, flex)

    peak = peak_flops_per_second(env["device"])
    print(f"\nTraining step, Gemma 3 {args.model_name} shapes, random weights, one {config.vision.image_size} px image "
          f"per sequence, batch 1; median of {args.steps} steps after {args.warmup} warmup; {env['device']}, "
          f"torch {env['torch']}, transformers {env['transformers']}, commit {env['commit']}, {env['date']}. "
          f"MFU: model FLOPs of the step (attention with its causal/sliding extent, the vision tower included; "
          f"see step_flops) / step time / "
          + (f"{peak / 1e12:.0f} TFLOP/s dense bf16 peak.\n" if peak else "the card's peak (unknown here: no MFU).\n"))
    for line in comparison_lines(comparisons(results)):
        print(line)
    if flex is not None:
        print(f"FlexAttention check: {flex.get('what')}: {flex.get('verdict')}; {flex.get('detail', '')}")
    print()
    print(markdown_table(TABLE_HEADERS, [table_row(r) for r in results]))
    settled = ("ok", "OOM")
    return 0 if all(r.status in settled or r.status.startswith("skipped") for r in results) and (
        flex is None or flex.get("agree")) else 1


if __name__ == "__main__":
    sys.exit(main())
