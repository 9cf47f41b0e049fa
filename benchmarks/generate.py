"""Generation speed and memory: ours against transformers' ``generate`` (sdpa) on the same card, same weights.

Run from the repository root (no install needed, no network):

    PYTHONPATH=src python benchmarks/generate.py --model 4b --out "$OUT"                # GPU
    PYTHONPATH=src python benchmarks/generate.py --tiny --device cpu --out /tmp/bench     # seconds, on a CPU

Method: random bf16 weights at the real shapes, built on the device (the same numbers in both models, see
``train_step.build_ours`` / ``build_reference``); prompts of ``--prompt-len`` tokens (default 300), each
``<bos>`` + a little text + one 896 px image (256 soft tokens) + text; greedy decoding of exactly
``--new-tokens`` tokens (default 128, no stop token: ours with no ``stop_token_ids``, transformers with
``eos_token_id=[]`` as ``gemma3vl.verify.reference_greedy`` does) at batch 1 and 8 (distinct prompts).

* time to first token (TTFT): from the call to the moment the first new token is on the host (prefill with the
  image, first argmax), through ours' ``on_step`` callback and a transformers streamer;
* decode: ``(N - 1)`` steps over the time from the first to the last new token; tokens/s per sequence and in
  total (x batch);
* memory: ``torch.cuda.max_memory_allocated`` during the call (weights, KV cache, activations);
* bandwidth: each decode step must at least read the text decoder's weights once (the tied embedding counted
  once, as the output matrix) and the KV cache of the real context (global layers: every position so far;
  sliding layers: at most the window), so

      fraction of the bandwidth limit = steps/s x (W + KV) / peak
      W  = text-decoder parameters x 2 bytes (bf16)
      KV = batch x 2 (K and V) x kv_heads x head_dim x 2 bytes x sum over layers of the positions it attends,
           averaged over the N - 1 decode steps (context P + 1 .. P + N - 1)

  and ``peak / (W + KV)`` is the step rate the memory bandwidth allows (the limit in tokens/s per sequence).
  The vision tower is not read during decoding. The peak is taken from the device name (H100 SXM 3.35 TB/s,
  H100 PCIe 2.0, H100 NVL 3.9, H200 4.8) or ``--peak-bandwidth``; the table says which figure was assumed.

One warmup call (``--warmup-tokens`` new tokens) precedes the ``--repeats`` timed calls of each row; the
figures are medians. Our greedy tokens are compared with transformers' (reported, not asserted: bf16 kernels
may round differently, and a near tie can then flip one token). When ``gemma3vl.infer.generate.generate``
takes a ``compile`` argument, ours is also timed with ``compile=True`` (its warmup call, which compiles, is
reported separately and given the full ``--new-tokens``), with one ``StaticKVCache`` reused by all calls of a row
as ``generate`` asks, so that they replay the CUDA graph the warmup captured. Eager ours reuses a cache of the
same size in the same way.

Compiled against eager, bf16: both of ours run every call of a row on a cache of the same size (the compiled
one's, so the attention kernels reduce over the same columns; cache length alone changes bf16 rounding), so
their greedy tokens must be equal; the JSON's ``compiled_vs_eager`` and the summary give, per batch, whether they
are and otherwise the first token index where a row differs, with ``near_tie``: the eager model's top two logits
at that step (one full forward over the prompt and the eager tokens before it) and their gap in bf16 spacings of
the top logit, which tells a last-bit tie-break from a different computation. A compiled row whose compiling
fails is reported as failed, never timed eagerly.

The server's engine (continuous batching, ``gemma3vl.infer.engine``), with the compiled model's weights: the
``max(--batches)`` prompts join one by one, two decode steps apart, into that many slots, and each decodes
``--new-tokens`` tokens. Reported under ``engine`` (eager and ``compile=True``): time to first token of each join
(its prefill alone + the step that samples it), decode tokens/s while every slot is busy, and whether the
compiled engine's greedy tokens equal the eager engine's (same schedule, same shapes). ``--engine off`` skips it.

Writes ``generate-<model>.json`` under ``--out`` (rewritten after every row) and prints a table last.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import (  # noqa: E402  (the shared model-building helpers live in train_step.py)
    allocated_gib, benchmark_parser, benchmark_setup, build_ours, build_reference, fmt_gib, free_memory,
    image_sequence, markdown_table, peak_gib, profile_step, random_pixels, reset_peak, row_guard, say, synchronize,
)

from gemma3vl.bridge.mapping import native_tensor_specs  # noqa: E402
from gemma3vl.config import SLIDING, Gemma3Config  # noqa: E402
from gemma3vl.infer.decode import prefill_backend, prefill_chunk_tokens  # noqa: E402
from gemma3vl.infer.generate import Sampling, generate  # noqa: E402
from gemma3vl.model import TokenInfo  # noqa: E402

DTYPE = torch.bfloat16
GRAPH_IMPL = "ours (CUDA graph, not compiled)"  # the eager decode step captured: GEMMA3VL_DECODE_GRAPH=1

# Peak HBM bandwidth in bytes/s by device name (vendor datasheets); first match wins.
PEAK_BANDWIDTH = (
    ("h200", 4.8e12, "H200"),
    ("h100 nvl", 3.9e12, "H100 NVL"),
    ("h100 pcie", 2.0e12, "H100 PCIe"),
    ("h100", 3.35e12, "H100 SXM"),
)


def peak_bandwidth(name: str, override_tb_s: float | None) -> tuple[float | None, str]:
    """(bytes/s, how it was chosen) for the device called ``name``."""
    if override_tb_s:
        return override_tb_s * 1e12, f"{override_tb_s:g} TB/s (--peak-bandwidth)"
    lowered = name.lower()
    for key, value, label in PEAK_BANDWIDTH:
        if key in lowered:
            return value, f"{value / 1e12:g} TB/s ({label}, from the device name {name!r})"
    return None, f"unknown for {name!r}: no bandwidth fraction (pass --peak-bandwidth TB/s)"


# ------------------------------------------------------------------------------------------------ bytes
def text_weight_bytes(config: Gemma3Config) -> int:
    """Bytes of the text decoder's weights in bf16: what every decode step reads once."""
    count = sum(torch.Size(shape).numel() for name, shape in native_tensor_specs(config).items()
                if name.startswith("text."))
    return count * DTYPE.itemsize


def mean_kv_bytes(config: Gemma3Config, batch: int, prompt: int, new_tokens: int) -> float:
    """KV-cache bytes read per decode step, averaged over the N - 1 decode steps (context P + 1 .. P + N - 1)."""
    text = config.text
    per_token = 2 * text.num_key_value_heads * text.head_dim * DTYPE.itemsize  # K and V, one layer
    sliding = sum(1 for kind in text.layer_types if kind == SLIDING)
    full = len(text.layer_types) - sliding
    steps = range(1, new_tokens)
    if not steps:
        return 0.0
    total = sum(full * (prompt + i) + sliding * min(prompt + i, text.sliding_window) for i in steps)
    return batch * per_token * total / len(steps)


# ------------------------------------------------------------------------------------------------ prompts
@dataclass
class Prompts:
    input_ids: torch.Tensor  # [B, P], distinct rows, one image each
    pixel_values: torch.Tensor  # [B, 3, S, S]
    image_token_id: int

    @classmethod
    def make(cls, config: Gemma3Config, rows: int, length: int, device: torch.device, seed: int) -> "Prompts":
        generator = torch.Generator().manual_seed(seed)
        ids = torch.stack([image_sequence(config, length, generator) for _ in range(rows)])
        pixels = random_pixels(config, rows, generator)
        return cls(ids.to(device), pixels.to(device, DTYPE), config.image_token_id)

    def take(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[:batch], self.pixel_values[:batch]


# ------------------------------------------------------------------------------------------------ timing
@dataclass
class Call:
    tokens: list[list[int]]
    ttft_s: float
    decode_s: float  # first new token -> last new token
    peak_gib: float | None


class StampStreamer:
    """A transformers streamer that only notes when each new token reached the host. Its first ``put`` is
    the prompt."""

    def __init__(self):
        self.stamps: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def reusable_cache(model, batch: int, length: int):
    """One ``StaticKVCache`` for every call of a row, when ``generate`` takes one: with ``compile=True`` reusing
    it keeps the captured CUDA graph across calls (see ``generate``'s docstring). Sized as ``generate`` sizes its
    own compiled cache (the length rounded up to 256)."""
    if "cache" not in inspect.signature(generate).parameters:
        return None
    try:
        from gemma3vl.infer.cache import StaticKVCache
    except ImportError:
        return None
    weight = model.text.embed.weight
    return StaticKVCache(model.config.text, batch, -(-length // 256) * 256, weight.device, weight.dtype)


def compile_failed(why: str) -> None:
    """generate's and the engine's compile-failure listener here: the row fails, naming why (decoding would
    otherwise go on eagerly and be timed as the compiled row)."""
    raise RuntimeError(f"compiling the decode step failed: {why}")


def ours_call(model, ids, pixels, new_tokens: int, pad: int, device, compiled: bool, cache=None,
              graph: bool = False) -> Call:
    """``graph``: the row of the eager step captured into a CUDA graph (``GEMMA3VL_DECODE_GRAPH=1``, set by the
    caller), whose failure to capture fails the row as a compiled row's does."""
    stamps: list[float] = []
    extra = {"compile": True} if compiled else {}
    if (compiled or graph) and "on_compile_failure" in inspect.signature(generate).parameters:
        extra["on_compile_failure"] = compile_failed  # a compiled row that decoded eagerly would time eager
    if cache is not None:
        extra["cache"] = cache
    reset_peak(device)
    synchronize(device)
    started = time.perf_counter()
    # generate reads every step's tokens to the host before on_step is called.
    tokens = generate(model, ids, pixel_values=pixels, sampling=Sampling(max_new_tokens=new_tokens, pad_token_id=pad),
                      on_step=lambda _tokens, _finished: stamps.append(time.perf_counter()), **extra)
    synchronize(device)
    return Call(tokens, stamps[0] - started, stamps[-1] - stamps[0], peak_gib(device))


def transformers_call(model, ids, pixels, new_tokens: int, pad: int, image_token_id: int, device) -> Call:
    from transformers import GenerationConfig

    generation = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=pad)
    streamer = StampStreamer()
    reset_peak(device)
    synchronize(device)
    started = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             token_type_ids=(ids == image_token_id).long(), generation_config=generation,
                             streamer=streamer)
    synchronize(device)
    stamps = streamer.stamps
    return Call(out[:, ids.shape[1]:].tolist(), stamps[0] - started, stamps[-1] - stamps[0], peak_gib(device))


# ------------------------------------------------------------------------------------------------ engine
class _NoText:
    """A tokenizer stand-in for the engine's text bookkeeping: random weights have no tokenizer, and the
    benchmark only needs token ids."""

    all_special_ids: list[int] = []

    def get_vocab(self) -> dict[str, int]:
        return {}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def engine_run(model, prompts: "Prompts", rows: int, new_tokens: int, compiled: bool, device) -> dict[str, Any]:
    """Rows join ``ContinuousBatcher`` two steps apart; TTFT per join, decode tokens/s with all slots busy."""
    from gemma3vl.infer.completion import Row as EngineRow
    from gemma3vl.infer.conversation import EncodedPrompt
    from gemma3vl.infer.engine import ContinuousBatcher

    length = prompts.input_ids.shape[1] + new_tokens
    engine = ContinuousBatcher(model, _NoText(), slots=rows, max_length=-(-length // 256) * 256, compile=compiled,
                               **({"report": compile_failed}
                                  if "report" in inspect.signature(ContinuousBatcher).parameters else {}))
    started = time.perf_counter()
    engine.warm_up()
    synchronize(device)
    warmup_s = time.perf_counter() - started
    done: dict[int, list[int]] = {}
    first_token: dict[int, float] = {}  # when each row's first token reached the host (its first is_cancelled call)
    joined_at: dict[int, float] = {}
    busy_steps, busy_s = 0, 0.0
    waiting = list(range(rows))
    while waiting or engine.active:
        joined = None
        if waiting and engine.steps >= 2 * (rows - len(waiting)):
            joined = waiting.pop(0)
            prompt = EncodedPrompt(prompts.input_ids[joined], prompts.pixel_values[joined:joined + 1])
            row = EngineRow(prompt=prompt, max_new_tokens=new_tokens,
                            on_finish=lambda c, n=joined: done.__setitem__(n, c.token_ids),
                            is_cancelled=lambda n=joined: first_token.setdefault(n, time.perf_counter()) and False)
            synchronize(device)
            joined_at[joined] = time.perf_counter()
            engine.add(row, Sampling(max_new_tokens=new_tokens), tag=joined)
        full = engine.active == rows
        step_began = time.perf_counter()
        engine.step()  # its tokens reach the host inside (tolist)
        if joined is None and full and engine.active == rows:
            busy_steps += 1
            busy_s += time.perf_counter() - step_began
    ttft = [first_token[n] - joined_at[n] for n in range(rows)]
    return {
        "compiled": engine.compiled,
        "slots": rows,
        "warmup_s": warmup_s,
        "ttft_ms_median": statistics.median(ttft) * 1e3,
        "ttft_ms_all": [t * 1e3 for t in ttft],
        "busy_steps": busy_steps,
        "tokens_per_s_total_busy": rows * busy_steps / busy_s if busy_s else None,
        "tokens": [done[n] for n in range(rows)],
    }


# ------------------------------------------------------------------------------------------------ rows
@dataclass
class Row:
    impl: str  # ours | ours (compile=True) | transformers
    batch: int
    compiled: bool = False
    status: str = "ok"
    ttft_ms: float | None = None
    decode_ms_per_step: float | None = None
    tokens_per_s_per_seq: float | None = None
    tokens_per_s_total: float | None = None
    peak_gib: float | None = None
    bandwidth_fraction: float | None = None
    bandwidth_limit_tokens_per_s: float | None = None  # per sequence
    new_tokens: int | None = None  # per row, as generated
    warmup_s: float | None = None
    ttft_s_all: list[float] = field(default_factory=list)
    decode_s_all: list[float] = field(default_factory=list)


def measure(row: Row, call, args, config: Gemma3Config, bandwidth: float | None) -> list[list[int]]:
    """Warm up, then ``args.repeats`` timed calls; fill ``row`` with medians. Returns the last call's tokens."""
    started = time.perf_counter()
    call(args.new_tokens if row.compiled else args.warmup_tokens)
    row.warmup_s = time.perf_counter() - started
    calls = [call(args.new_tokens) for _ in range(args.repeats)]
    lengths = {len(t) for c in calls for t in c.tokens}
    if lengths != {args.new_tokens}:
        raise RuntimeError(f"expected exactly {args.new_tokens} new tokens per row, got lengths {sorted(lengths)}")
    row.new_tokens = args.new_tokens
    row.ttft_s_all = [c.ttft_s for c in calls]
    row.decode_s_all = [c.decode_s for c in calls]
    ttft, decode = statistics.median(row.ttft_s_all), statistics.median(row.decode_s_all)
    steps = args.new_tokens - 1
    row.ttft_ms = ttft * 1e3
    if steps and decode > 0:
        steps_per_s = steps / decode
        row.decode_ms_per_step = 1e3 / steps_per_s
        row.tokens_per_s_per_seq = steps_per_s
        row.tokens_per_s_total = steps_per_s * row.batch
        step_bytes = text_weight_bytes(config) + mean_kv_bytes(config, row.batch, args.prompt_len, args.new_tokens)
        if bandwidth:
            row.bandwidth_fraction = steps_per_s * step_bytes / bandwidth
            row.bandwidth_limit_tokens_per_s = bandwidth / step_bytes
    peaks = [c.peak_gib for c in calls if c.peak_gib is not None]
    row.peak_gib = max(peaks) if peaks else None
    return calls[-1].tokens


def run_row(rows: list[Row], impl: str, batch: int, call, args, config, bandwidth, device, save,
            compiled: bool = False) -> list[list[int]] | None:
    row = Row(impl, batch, compiled)
    say(f"[{impl} batch {batch}] generating {args.new_tokens} tokens x {args.repeats} (+ warmup)")
    tokens = None
    with row_guard(row, device):
        tokens = measure(row, lambda n: call(batch, n), args, config, bandwidth)
    free_memory(device)
    rows.append(row)
    save()
    shown = f"TTFT {row.ttft_ms:.0f} ms, {row.tokens_per_s_total:,.1f} tok/s" if row.tokens_per_s_total else ""
    say(f"[{impl} batch {batch}] {row.status} {shown}")
    return tokens


def profile_call(call, device: torch.device) -> dict[str, Any]:
    """One generate call under ``torch.profiler`` (``train_step.profile_step``): its top operators by device time;
    with a compiled step, the device time of one replay of the decode graph (``graph_ms_per_call``), to set against
    the measured ms per step: the rest of a step is the host's and the eager sampling kernels'."""
    calls: list[Call] = []
    top, total_ms = profile_step(lambda: calls.append(call()), device)
    summary = {"ttft_ms": calls[0].ttft_s * 1e3, "decode_ms": calls[0].decode_s * 1e3,
               "steps": len(calls[0].tokens[0]), "device_ms_all_events": total_ms, "top": top}
    graphs = [row for row in top if row["name"].startswith("## Call CompiledFxGraph")]
    if graphs and graphs[0]["calls"]:
        summary["graph_ms_per_call"] = graphs[0]["device_ms"] / graphs[0]["calls"]
        say(f"    profiled call: decode {calls[0].decode_s * 1e3 / max(summary['steps'] - 1, 1):.2f} ms/step under the "
            f"profiler; the compiled graph's device time {summary['graph_ms_per_call']:.2f} ms per replay")
    return summary


def first_divergence(ours: list[list[int]] | None, theirs: list[list[int]] | None) -> dict[str, Any] | None:
    """Whether two runs' greedy tokens are equal, and if not the first differing token index (and its row)."""
    if ours is None or theirs is None:
        return None
    firsts = []
    for row, (a, b) in enumerate(zip(ours, theirs)):
        index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if index is None and len(a) != len(b):
            index = min(len(a), len(b))
        if index is not None:
            firsts.append((index, row))
    if not firsts:
        return {"equal": True, "first_divergence": None, "row": None, "rows": len(ours)}
    index, row = min(firsts)
    return {"equal": False, "first_divergence": index, "row": row, "rows": len(ours)}


def agreement(ours: list[list[int]] | None, theirs: list[list[int]] | None) -> dict[str, Any] | None:
    """Whether the greedy tokens are equal, and the shortest common prefix over the rows."""
    if ours is None or theirs is None:
        return None
    prefixes = []
    for a, b in zip(ours, theirs):
        same = 0
        while same < min(len(a), len(b)) and a[same] == b[same]:
            same += 1
        prefixes.append(same)
    return {"equal": ours == theirs, "min_common_prefix": min(prefixes), "rows": len(prefixes)}


# ------------------------------------------------------------------------------------------------ output
TABLE_HEADERS = ["impl", "batch", "TTFT", "decode ms/step", "tok/s per seq", "tok/s total", "peak mem",
                 "of bandwidth limit", "status"]


def table_row(r: Row) -> list[str]:
    ok = r.status == "ok" and r.tokens_per_s_total is not None
    fraction = "n/a" if r.bandwidth_fraction is None else (
        f"{r.bandwidth_fraction:.1%} (limit {r.bandwidth_limit_tokens_per_s:,.0f} tok/s/seq)")
    return [
        r.impl, str(r.batch),
        f"{r.ttft_ms:,.0f} ms" if ok else "-",
        f"{r.decode_ms_per_step:.1f}" if ok else "-",
        f"{r.tokens_per_s_per_seq:,.1f}" if ok else "-",
        f"{r.tokens_per_s_total:,.1f}" if ok else "-",
        fmt_gib(r.peak_gib) if ok else "-",
        fraction if ok else "-",
        r.status + (f" (warmup, compiling: {r.warmup_s:.0f} s)" if r.compiled and r.warmup_s else ""),
    ]


def summary_rows(rows: list[Row], model: str, compiled_vs_eager: dict[str, Any] | None = None) -> list[list[str]]:
    out = []
    for r in rows:
        if r.status == "ok" and r.tokens_per_s_total is not None:
            bandwidth = "" if r.bandwidth_fraction is None else f", {r.bandwidth_fraction:.1%} of bandwidth limit"
            result = f"TTFT {r.ttft_ms:,.0f} ms, {r.tokens_per_s_total:,.1f} tok/s ({r.decode_ms_per_step:.1f} ms/step)"
            out.append([f"generate {model}", f"{r.impl}, batch {r.batch}", result, fmt_gib(r.peak_gib),
                        bandwidth.lstrip(", ")])
        else:
            out.append([f"generate {model}", f"{r.impl}, batch {r.batch}", r.status, fmt_gib(r.peak_gib), ""])
    for batch, match in (compiled_vs_eager or {}).items():
        if match is not None:
            out.append([f"generate {model}", f"greedy tokens ours compile=True vs eager (bf16), {batch}",
                        describe_divergence(match), "", ""])
    return out


def engine_rows(summary: dict[str, Any], model: str) -> list[list[str]]:
    out = []
    for label in ("eager", "compiled"):
        result = summary.get(label)
        if result is None:
            continue
        if "error" in result:
            out.append([f"generate {model}", f"server engine ({label})", result["error"], "", ""])
            continue
        rate = result["tokens_per_s_total_busy"]
        out.append([f"generate {model}", f"server engine ({label}), {result['slots']} rows joining",
                    f"TTFT {result['ttft_ms_median']:,.0f} ms (median of joins), "
                    + (f"{rate:,.1f} tok/s with every slot busy" if rate else "no step with every slot busy"), "", ""])
    match = summary.get("compiled_vs_eager")
    if match is not None:
        out.append([f"generate {model}", "greedy tokens server engine compiled vs eager", describe_divergence(match),
                    "", ""])
    return out


def describe_divergence(match: dict[str, Any]) -> str:
    if match["equal"]:
        return "equal"
    text = f"differ: first at token {match['first_divergence']} (row {match['row']})"
    tie = match.get("near_tie")
    if tie and "error" in tie:
        text += f"; near-tie check failed ({tie['error']})"
    elif tie:
        text += (f"; eager's top-2 logit gap there {tie['top2_gap']:.3g} = {tie['gap_in_bf16_spacings']:.2g} bf16 "
                 f"spacings of the top logit")
    return text


@torch.no_grad()
def near_tie(model, prompts: "Prompts", row: int, index: int, eager_tokens: list[list[int]]) -> dict[str, Any]:
    """Where two greedy runs part ways: the top two logits there, from one full forward (no cache) over the row's
    prompt and the eager run's tokens before the divergence. A gap of about one bf16 spacing of the top logit (the
    logits are bf16 matmul outputs) says the runs parted at a near-tie, where a last-bit difference in any
    reduction picks the other token; a gap of many spacings would mean they computed different things."""
    ids = prompts.input_ids[row]
    ids = torch.cat([ids, torch.tensor(eager_tokens[row][:index], dtype=ids.dtype, device=ids.device)])[None]
    info = TokenInfo.for_tokens(ids, attention_mask=torch.ones_like(ids), image_token_id=prompts.image_token_id)
    logits = model(ids, prompts.pixel_values[row:row + 1], info=info, logits_to_keep=1)[0, -1].float()
    top = logits.topk(2)
    first = top.values[0].to(torch.bfloat16)
    spacing = float(torch.nextafter(first, torch.tensor(float("inf"), dtype=torch.bfloat16, device=first.device))
                    - first)
    gap = float(top.values[0] - top.values[1])
    return {"top2_tokens": top.indices.tolist(), "top2_logits": top.values.tolist(), "top2_gap": gap,
            "bf16_spacing": spacing, "gap_in_bf16_spacings": gap / spacing if spacing else None}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row (default 128; tiny 16)")
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="prompt tokens, image included (default 300; tiny 32)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per row (median reported)")
    parser.add_argument("--warmup-tokens", type=int, default=8, help="new tokens of the warmup call")
    parser.add_argument("--only", default="both", choices=["ours", "hf", "both"])
    parser.add_argument("--compile", default="auto", choices=["auto", "off"],
                        help="auto: also time ours with compile=True when generate() takes that argument")
    parser.add_argument("--peak-bandwidth", type=float, default=None, help="TB/s; default from the device name")
    parser.add_argument("--engine", default="auto", choices=["auto", "off"],
                        help="auto: also run the server's continuous-batching engine, eager and compiled")
    parser.add_argument("--order", default="eager,transformers,compiled,engine",
                        help="which parts run, in this order (a timeout cuts the last): eager (ours), transformers, "
                             "compiled (ours, compile=True), graph (ours, the eager step captured into a CUDA "
                             "graph: GEMMA3VL_DECODE_GRAPH=1; CUDA only), engine (the server's, eager and "
                             "compiled), long (a --long-prompt prefill, FlexAttention against SDPA)")
    parser.add_argument("--long-prompt", type=int, default=None,
                        help="tokens of the 'long' part's prompt (default 32768, where generate's prefill turns to "
                             "FlexAttention on CUDA; tiny 48)")
    parser.add_argument("--profile", action="store_true",
                        help="ours: after each implementation's first batch size, one more call under torch.profiler: "
                             "its top operators by device time and the device-busy share of its wall time (in the "
                             "JSON's 'profiles')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)
    args.new_tokens = args.new_tokens or (16 if args.tiny else 128)
    args.prompt_len = args.prompt_len or (32 if args.tiny else 300)
    if args.new_tokens < 2 or args.repeats < 1 or args.warmup_tokens < 1:
        parser.error("--new-tokens must be >= 2, --repeats and --warmup-tokens >= 1")
    model_name = "tiny" if args.tiny else args.model
    batches = [int(b) for b in args.batches.split(",")]
    order = [part.strip() for part in args.order.split(",") if part.strip()]
    unknown = sorted(set(order) - {"eager", "transformers", "compiled", "graph", "engine", "long"})
    if unknown or len(set(order)) != len(order):
        parser.error(f"--order {args.order!r}: each of eager, transformers, compiled, graph, engine, long at most "
                     "once")
    args.long_prompt = args.long_prompt or (48 if args.tiny else 32768)

    device, out, raw, config, env = benchmark_setup(args)
    bandwidth, bandwidth_note = peak_bandwidth(env["device"], args.peak_bandwidth)
    can_compile = "compile" in inspect.signature(generate).parameters
    say(f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, commit {env['commit']}; "
        f"peak bandwidth {bandwidth_note}; generate(compile=...) {'available' if can_compile else 'not available'}")
    prompts = Prompts.make(config, max(batches), args.prompt_len, device, args.seed)
    pad = config.text.pad_token_id
    rows: list[Row] = []
    tokens: dict[tuple[str, int], list[list[int]] | None] = {}
    json_path = out / f"generate-{model_name}.json"

    engine: dict[str, Any] = {}
    profiles: dict[str, Any] = {}

    def engine_summary() -> dict[str, Any]:
        summary = {label: {k: v for k, v in result.items() if k != "tokens"} for label, result in engine.items()}
        eager, compiled = engine.get("eager", {}), engine.get("compiled", {})
        if "tokens" in eager and "tokens" in compiled:
            summary["compiled_vs_eager"] = first_divergence(compiled["tokens"], eager["tokens"])
        return summary

    ties: dict[int, dict[str, Any]] = {}  # batch -> near_tie at the compiled-vs-eager divergence

    def compiled_vs_eager() -> dict[str, Any]:
        out = {}
        for b in batches:
            if ("ours (compile=True)", b) not in tokens:
                continue
            match = first_divergence(tokens.get(("ours (compile=True)", b)), tokens.get(("ours", b)))
            if match is not None and b in ties:
                match["near_tie"] = ties[b]
            out[f"batch {b}"] = match
        return out

    def graph_vs_eager() -> dict[str, Any]:
        """The captured eager step runs the eager step's kernels: its tokens must equal eager's exactly."""
        return {f"batch {b}": first_divergence(tokens.get((GRAPH_IMPL, b)), tokens.get(("ours", b)))
                for b in batches if (GRAPH_IMPL, b) in tokens}

    def save() -> None:
        payload = {
            "benchmark": "generate",
            "model": model_name,
            "settings": {**vars(args), "batches": batches},
            **env,
            "peak_bandwidth": bandwidth_note,
            "text_weight_bytes": text_weight_bytes(config),
            "compile_available": can_compile,
            "greedy_agreement": {f"batch {b}": agreement(tokens.get(("ours", b)), tokens.get(("transformers", b)))
                                 for b in batches},
            "compiled_vs_eager": compiled_vs_eager(),
            "graph_vs_eager": graph_vs_eager(),
            "long_prefill_chunked_vs_whole": (first_divergence(long_tokens.get("flex"), long_tokens.get("whole"))
                                              if long_tokens.get("flex") and long_tokens.get("whole") else None),
            "long_prefill_flex_vs_sdpa": (first_divergence(long_tokens.get("flex"), long_tokens.get("sdpa"))
                                          if long_tokens.get("flex") and long_tokens.get("sdpa") else None),
            "engine": engine_summary(),
            "profiles": profiles,
            "rows": [asdict(r) for r in rows],
            "summary_rows": summary_rows(rows, model_name, compiled_vs_eager()) + engine_rows(engine_summary(),
                                                                                              model_name)
                            + [[f"generate {model_name}", f"greedy tokens ours CUDA graph vs eager (bf16), {b}",
                                describe_divergence(match), "", ""]
                               for b, match in graph_vs_eager().items() if match is not None]
                            + long_prefill_rows_summary(),
        }
        json_path.write_text(json.dumps(payload, indent=2) + "\n")

    def ours_rows(compiled: bool, graph: bool = False) -> None:
        impl = "ours (compile=True)" if compiled else GRAPH_IMPL if graph else "ours"
        say(f"[{impl}] building our model")
        model = build_ours(config, device, DTYPE, args.seed)
        say(f"[{impl}] weights {fmt_gib(allocated_gib(device))}")
        for batch in batches:
            # One cache for the warmup and the timed calls: compiled, so they replay the graph the warmup captured;
            # eager too, so that both reduce attention over the same columns and their tokens must agree.
            cache = reusable_cache(model, batch, args.prompt_len + args.new_tokens)
            tokens[(impl, batch)] = run_row(
                rows, impl, batch,
                lambda b, n: ours_call(model, *prompts.take(b), n, pad, device, compiled, cache, graph),
                args, config, bandwidth, device, save, compiled,
            )
            save()  # with its tokens: the compiled-vs-eager comparison survives a timeout in a later part
            match = first_divergence(tokens.get(("ours (compile=True)", batch)), tokens.get(("ours", batch)))
            if not compiled and match is not None and not match["equal"]:
                try:  # how close a call the divergence was, with this (eager) model while it is here
                    ties[batch] = near_tie(model, prompts, match["row"], match["first_divergence"],
                                           tokens[("ours", batch)])
                except Exception as exc:  # a diagnostic: the rows stand without it
                    ties[batch] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                save()
            if args.profile and batch == batches[0] and tokens[(impl, batch)] is not None:
                profiles[f"{impl}, batch {batch}"] = profile_call(
                    lambda: ours_call(model, *prompts.take(batch), args.new_tokens, pad, device, compiled, cache),
                    device)
                save()
            del cache
        del model
        free_memory(device)

    def graph_rows() -> None:
        """Ours with the eager decode step captured into a CUDA graph, nothing compiled (GEMMA3VL_DECODE_GRAPH=1):
        the speed without the minute of compiling, and whether its tokens equal the eager step's."""
        with patch.dict(os.environ, {"GEMMA3VL_DECODE_GRAPH": "1"}):
            ours_rows(compiled=False, graph=True)

    def engine_rows_run() -> None:
        model = build_ours(config, device, DTYPE, args.seed)
        for engine_compiled in (False, True):
            label = "compiled" if engine_compiled else "eager"
            say(f"[engine, {label}] {max(batches)} rows joining two steps apart")
            try:
                engine[label] = engine_run(model, prompts, max(batches), args.new_tokens, engine_compiled, device)
            except Exception as exc:  # reported; the rows above are kept
                engine[label] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                traceback.print_exc()
            free_memory(device)
            save()
        del model
        free_memory(device)

    long_tokens: dict[str, list[list[int]] | None] = {}

    def long_prefill_rows_summary() -> list[list[str]]:
        if not (long_tokens.get("flex") and long_tokens.get("sdpa")):
            return []
        match = first_divergence(long_tokens["flex"], long_tokens["sdpa"])
        first = "flex" if prefill_backend(args.long_prompt, device) else "sdpa (as chosen here)"
        out = [[f"generate {model_name}", f"greedy tokens, {args.long_prompt:,}-token prompt, {first} vs sdpa prefill",
                "equal" if match["equal"] else describe_divergence(match), "", ""]]
        if long_tokens.get("whole"):
            match = first_divergence(long_tokens["flex"], long_tokens["whole"])
            out.append([f"generate {model_name}", f"greedy tokens, {args.long_prompt:,}-token prompt, chunked vs "
                        "whole prefill", "equal" if match["equal"] else describe_divergence(match), "", ""])
        return out

    def long_prefill_rows() -> None:
        """One prompt of ``--long-prompt`` tokens (one image), 8 greedy tokens, eager: generate's prefill as it
        chooses (FlexAttention on CUDA from GEMMA3VL_FLEX_PREFILL_MIN_TOKENS tokens; in chunks past
        GEMMA3VL_PREFILL_CHUNK tokens), then forced to SDPA with the dense mask, and for a prompt longer than a
        chunk also the whole prompt at once; TTFT, peak memory and whether their tokens agree."""
        long_args = argparse.Namespace(**{**vars(args), "new_tokens": 8, "repeats": 1, "warmup_tokens": 2,
                                          "prompt_len": args.long_prompt})
        model = build_ours(config, device, DTYPE, args.seed)
        long_prompts = Prompts.make(config, 1, args.long_prompt, device, args.seed + 1)
        variants = [("flex", {}), ("sdpa", {"GEMMA3VL_FLEX_PREFILL_MIN_TOKENS": "0"})]
        chunk = prefill_chunk_tokens()
        if chunk and args.long_prompt > chunk:  # chunked above: the whole prompt at once beside it
            variants.insert(1, ("whole", {"GEMMA3VL_PREFILL_CHUNK": "0"}))
        for label, forced in variants:
            with patch.dict(os.environ, forced):  # the first as generate chooses, the second SDPA always
                chosen = prefill_backend(args.long_prompt, device) or model.text.attention_backend
                chunks = prefill_chunk_tokens()
                chunked = f", in chunks of {chunks:,}" if chunks and args.long_prompt > chunks else ", at once"
                impl = f"ours, {args.long_prompt:,}-token prompt, prefill {chosen}{chunked}"
                long_tokens[label] = run_row(
                    rows, impl, 1, lambda b, n: ours_call(model, *long_prompts.take(b), n, pad, device, False),
                    long_args, config, bandwidth, device, save)
        save()  # run_row saved before its tokens were stored: the flex-vs-sdpa comparison needs both
        del model
        free_memory(device)

    def transformers_rows() -> None:
        say("[transformers] building transformers' model (same weights)")
        model = build_reference(raw, config, device, DTYPE, args.seed)
        for batch in batches:
            tokens[("transformers", batch)] = run_row(
                rows, "transformers", batch,
                lambda b, n: transformers_call(model, *prompts.take(b), n, pad, config.image_token_id, device),
                args, config, bandwidth, device, save,
            )
            save()  # with its tokens (the greedy agreement)
        del model
        free_memory(device)

    # Default order: eager ours, then transformers, then the compiled ours and the engine last: compiling may take
    # long, and a timeout then still leaves the other rows in the JSON.
    ours_wanted, hf_wanted = args.only in ("ours", "both"), args.only in ("hf", "both")
    parts = {
        "eager": (ours_wanted, lambda: ours_rows(compiled=False)),
        "transformers": (hf_wanted, transformers_rows),
        "compiled": (ours_wanted and can_compile and args.compile == "auto", lambda: ours_rows(compiled=True)),
        "graph": (ours_wanted and device.type == "cuda", graph_rows),
        "engine": (ours_wanted and can_compile and args.compile == "auto" and args.engine == "auto", engine_rows_run),
        "long": (ours_wanted, long_prefill_rows),
    }
    for part in order:
        wanted, run = parts[part]
        if wanted:
            run()
    save()

    print(f"\nGeneration, Gemma 3 {model_name} shapes, random bf16 weights, prompt {args.prompt_len} tokens with one "
          f"{config.vision.image_size} px image, greedy, {args.new_tokens} new tokens, median of {args.repeats}; "
          f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, commit {env['commit']}, "
          f"{env['date']}")
    print(f"Peak bandwidth assumed: {bandwidth_note}. Fraction of the bandwidth limit = steps/s x (W + KV) / peak, "
          f"W = text weights {text_weight_bytes(config) / 1e9:.2f} GB (bf16), KV = the real context's keys and values "
          f"read per step (mean over the decode steps). TTFT = prefill (image + prompt) to the first token on the "
          f"host.")
    for batch in batches:
        match = agreement(tokens.get(("ours", batch)), tokens.get(("transformers", batch)))
        if match is not None:
            verdict = ("equal" if match["equal"]
                       else f"differ (all rows agree on the first {match['min_common_prefix']})")
            print(f"Greedy tokens, batch {batch}, ours vs transformers: {verdict}")
    for batch, match in compiled_vs_eager().items():
        if match is not None:
            print(f"Greedy tokens, {batch}, ours compile=True vs eager: {describe_divergence(match)}")
    print()
    print(markdown_table(TABLE_HEADERS, [table_row(r) for r in rows]))
    return 0 if all(r.status in ("ok", "OOM") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
