"""Packing gain: useful tokens per second of whole optimizer steps, packed rows against padded rows (issue 5).

Run from the repository root (no install needed, no network):

    PYTHONPATH=src python benchmarks/packing_gain.py --model 4b --out "$OUT"          # GPU (~1.5 min, estimated)
    PYTHONPATH=src python benchmarks/packing_gain.py --tiny --device cpu --out /tmp/bench   # seconds, on a CPU

One fixed set of synthetic conversations (``--conversations``, default 48, seeded), each ``<bos>`` + a short
prompt + one 896 px image (256 soft tokens in a ``<start_of_image>``..``<end_of_image>`` block) + text, of
``--min-len`` to ``--max-len`` tokens in all (default 300-2,000, drawn log-uniformly: more short conversations
than long ones, as in chat SFT data); labels on the answer (the last two thirds of the text after the image),
none on the prompt and the image block. One optimizer step takes the whole set, in two layouts:

* ``packed``: first-fit into rows of ``--seq-length`` tokens (4,096), one row per micro-batch
  (``gemma3vl.data.collate.pack`` + ``collate_packed``: what ``gemma3vl train`` does with ``data.packing=true``,
  the default); conversations in a row see only themselves (block-sparse FlexAttention mask from the segment ids);
* ``padded``: one conversation per row, ``--padded-rows`` rows per micro-batch (2: at most 2 x 2,000 = 4,000
  token slots, no more than a packed row holds), each micro-batch right-padded to its longest conversation
  (``collate_padded``: what ``data.packing=false`` does), in the data's order.

Timed with ``train_step.py``'s machinery (model building, the recipe's settings, ``time_steps``): ``ours fast``
(FlexAttention, compiled blocks, chunked loss; ``gemma3_vl_<size>_sft``, bf16 weights, AdamW, clip 1.0) on each
layout, and ``transformers`` (sdpa, the anchor's way: no packing) on the padded micro-batches, with the step's
loss the token-weighted mean over its micro-batches on both sides. Each runs ``--warmup`` whole steps (the first
compiles), then ``--steps`` timed steps; the median gives:

* useful tokens/s: non-padding tokens of the step (the same in every layout) / step time;
* target tokens/s: tokens with a label (the same in every layout) / step time;
* rows, micro-batches, token slots (rows x row length) and the padding fraction (1 - useful / slots);
* peak memory (``torch.cuda.max_memory_allocated`` since the model was built), MFU (``step_flops`` with each
  conversation at its own length) and the first step's loss: all layouts have the same weights and
  conversations, so it must agree up to bf16 rounding (a check of the packed mask, not only a timing);
* the gain: packed useful tokens/s / padded useful tokens/s (ours), and packed (ours) / padded (transformers).

Packed rows all have one shape; padded micro-batches have as many lengths as micro-batches, so ours' compiled
blocks may recompile for them (the warmup step pays that) and, past dynamo's recompile limit, run some eagerly:
the row's ``compiled_graphs`` (graphs torch.compile made during the variant) says whether that happened, and
``--pad-multiple M`` (round each padded micro-batch's length up to a multiple of M) trades padding for fewer shapes.

An out-of-memory error is caught and reported as ``OOM``; the JSON (``packing_gain-<model><tag>.json`` under
``--out``) is rewritten after every layout, so a run stopped by its timeout keeps the layouts it finished.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step.py, run as a script or imported by a test

from train_step import (  # noqa: E402  (the shared model-building and timing helpers live in train_step.py)
    RepeatBatch,
    Result,
    Variant,
    allocated_gib,
    benchmark_parser,
    benchmark_setup,
    device_name,
    fmt_gib,
    fmt_mfu,
    free_memory,
    image_sequence,
    markdown_table,
    peak_gib,
    prepare_ours,
    prepare_transformers,
    random_pixels,
    recipe_config,
    reset_peak,
    row_guard,
    say,
    time_steps,
)

from gemma3vl.config import Gemma3Config  # noqa: E402
from gemma3vl.data.batch import IGNORE, Batch, Sample  # noqa: E402
from gemma3vl.data.collate import collate_packed, collate_padded, pack  # noqa: E402
from gemma3vl.errors import Gemma3VLError  # noqa: E402
from gemma3vl.train.flops import batch_step_flops  # noqa: E402
from gemma3vl.train.metrics import peak_flops_per_second  # noqa: E402

LAYOUTS = ("packed", "padded", "transformers")
# (conversations, min length, max length, packed row length) when not given: the 4B/12B/27B sizes, the tiny model
TINY_DEFAULTS = (12, 16, 64, 128)
REAL_DEFAULTS = (48, 300, 2000, 4096)


# ------------------------------------------------------------------------------------------------ data
def conversation_lengths(count: int, low: int, high: int, seed: int) -> list[int]:
    """``count`` lengths in ``[low, high]``, log-uniform (seeded): more short conversations than long ones."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(count, generator=generator, dtype=torch.float64)
    return [min(high, max(low, round(math.exp(math.log(low) + float(u) * (math.log(high) - math.log(low))))))
            for u in draws]


def conversations(config: Gemma3Config, lengths: list[int], seed: int) -> list[Sample]:
    """One synthetic conversation per length: ``<bos>``, a little text, one image block, text; the labels on the
    answer, the last two thirds of the text after the image (the prompt, the image block and ``<bos>`` have none)."""
    generator = torch.Generator().manual_seed(seed + 1)
    samples = []
    for index, length in enumerate(lengths):
        ids = image_sequence(config, length, generator)
        after_image = int((ids == config.eoi_token_id).nonzero()[0]) + 1
        answer = after_image + (length - after_image) // 3
        labels = torch.full_like(ids, IGNORE)
        labels[answer:] = ids[answer:]
        samples.append(Sample(ids, labels, random_pixels(config, 1, generator), source=f"synthetic:{index}"))
    return samples


@dataclass
class Layout:
    """The micro-batches of one optimizer step over the whole set, and what they hold."""

    name: str  # packed | padded
    batches: list[Batch]
    rows: int
    slots: int  # rows x their length: the token positions the model computes
    useful_tokens: int  # non-padding
    target_tokens: int
    longest_row: int

    @property
    def padding_fraction(self) -> float:
        return 1 - self.useful_tokens / self.slots

    def describe(self) -> dict[str, Any]:
        return {"layout": self.name, "rows": self.rows, "micro_batches": len(self.batches), "slots": self.slots,
                "useful_tokens": self.useful_tokens, "target_tokens": self.target_tokens,
                "padding_fraction": self.padding_fraction, "row_shapes": sorted({tuple(b.input_ids.shape)
                                                                                 for b in self.batches})}


def layout_of(name: str, batches: list[Batch]) -> Layout:
    return Layout(
        name, batches,
        rows=sum(int(b.input_ids.shape[0]) for b in batches),
        slots=sum(b.input_ids.numel() for b in batches),
        useful_tokens=sum(b.num_tokens for b in batches),
        target_tokens=sum(b.num_target_tokens for b in batches),
        longest_row=max(int(b.input_ids.shape[1]) for b in batches),
    )


def packed_layout(samples: list[Sample], config: Gemma3Config, seq_length: int) -> Layout:
    """First-fit rows of ``seq_length`` tokens (all padded to it), one row per micro-batch."""
    pad, image = config.text.pad_token_id, config.image_token_id
    rows = pack(samples, seq_length)
    return layout_of("packed", [collate_packed([row], seq_length, pad, image_token_id=image) for row in rows])


def padded_layout(samples: list[Sample], config: Gemma3Config, rows_per_micro_batch: int, multiple: int = 1
                  ) -> Layout:
    """One conversation per row, ``rows_per_micro_batch`` rows per micro-batch in the data's order, each
    micro-batch padded to its longest conversation, rounded up to a multiple of ``multiple`` (1: the loader's
    way; larger: fewer distinct shapes for the compiled blocks, at the cost of more padding)."""
    pad, image = config.text.pad_token_id, config.image_token_id
    chunks = [samples[i:i + rows_per_micro_batch] for i in range(0, len(samples), rows_per_micro_batch)]
    return layout_of("padded", [
        collate_padded(chunk, pad, -(-max(len(s) for s in chunk) // multiple) * multiple, image_token_id=image)
        for chunk in chunks])


def transformers_inputs(batch: Batch, image_token_id: int, dtype: torch.dtype, device: torch.device
                        ) -> dict[str, torch.Tensor]:
    """A padded micro-batch (one conversation per row) as transformers' keyword arguments: the attention mask
    from the segment ids, the labels unshifted (``labels[t + 1] = targets[t]``: transformers shifts them itself;
    position 0 is ``<bos>``, never a target)."""
    if bool((batch.info.segment_ids > 1).any()):
        raise Gemma3VLError("transformers_inputs takes padded batches (one conversation per row), not packed rows")
    labels = torch.full_like(batch.targets, IGNORE)
    labels[:, 1:] = batch.targets[:, :-1]
    ids = batch.input_ids
    return {
        "input_ids": ids.to(device),
        "attention_mask": (batch.info.segment_ids != 0).long().to(device),
        "labels": labels.to(device),
        "pixel_values": batch.pixel_values.to(device, dtype),
        "token_type_ids": (ids == image_token_id).long().to(device),
    }


# ------------------------------------------------------------------------------------------------ timing
@dataclass
class LayoutResult(Result):
    layout: str = ""  # packed | padded | transformers (padded)
    rows: int = 0
    micro_batches: int = 0
    slots: int = 0
    useful_tokens: int = 0
    target_tokens: int = 0
    padding_fraction: float = 0.0
    target_tokens_per_s: float | None = None
    # graphs torch.compile made during the variant (ours fast on CUDA): padded micro-batches of many lengths may
    # recompile, and past dynamo's recompile limit run eagerly; a count far above 1-2 says so
    compiled_graphs: int | None = None


def compiled_graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_layout(name: str, layout: Layout, raw, config: Gemma3Config, device: torch.device, args) -> LayoutResult:
    """Whole optimizer steps over ``layout``'s micro-batches: ours fast, or transformers (sdpa) for
    ``name == "transformers"``; everything built here is freed before returning."""
    from gemma3vl.train.trainer import Trainer

    variant = Variant("transformers", "sft", "bf16") if name == "transformers" else Variant("ours", "sft", "bf16",
                                                                                            "fast")
    cfg = recipe_config(args.model_name, "sft", layout.longest_row, "bf16")
    result = LayoutResult(variant.impl, "sft", "bf16", cfg.recipe, layout.longest_row,
                          path=variant.path if variant.impl == "ours" else "", layout=name, rows=layout.rows,
                          micro_batches=len(layout.batches), slots=layout.slots, useful_tokens=layout.useful_tokens,
                          target_tokens=layout.target_tokens, padding_fraction=layout.padding_fraction)
    say(f"[{name}: {variant.label}, {layout.rows} rows in {len(layout.batches)} micro-batches] building")
    graphs_before = compiled_graph_count()

    def measure() -> tuple[list[float], float]:
        # Its own frame: the model, optimizer and batches it builds are gone once it returns, before the
        # ``free_memory`` below (held by this function's locals, 32 GiB of the 4B stayed allocated into the next
        # layout's run on the H200 of 2026-11-28).
        if variant.impl == "ours":
            model = prepare_ours(variant, config, layout.longest_row, cfg, device, args, result)
            trainer = Trainer(cfg, model, RepeatBatch(layout.batches), Path(args.out), device)
            reset_peak(device)
            return time_steps(lambda: trainer.train_step()["loss"], args.warmup, args.steps, device)
        step = prepare_transformers(variant, raw, config, layout.longest_row, cfg, device, args, result)
        batches = [transformers_inputs(b, config.image_token_id, torch.bfloat16, device) for b in layout.batches]
        weights = [b.num_target_tokens / max(layout.target_tokens, 1) for b in layout.batches]
        reset_peak(device)
        return time_steps(lambda: step(batches, weights), args.warmup, args.steps, device)

    with row_guard(result, device):
        times, first_loss = measure()
        step_s = statistics.median(times)
        result.step_times_s, result.step_s, result.steps_per_s = times, step_s, 1.0 / step_s
        result.tokens_per_s = layout.useful_tokens / step_s
        result.target_tokens_per_s = layout.target_tokens / step_s
        result.first_loss = first_loss
        result.peak_gib = peak_gib(device)
        result.flops_per_step = batch_step_flops(config, layout.batches, "sft")
        peak = peak_flops_per_second(device_name(device))
        result.mfu = result.flops_per_step / step_s / peak if peak else None
        result.compiled_graphs = compiled_graph_count() - graphs_before
    free_memory(device)
    result.leftover_gib = allocated_gib(device)
    say(f"[{name}] {result.status}" + (f": {result.tokens_per_s:,.0f} useful tok/s, peak {fmt_gib(result.peak_gib)}"
                                       if result.status == "ok" else ""))
    return result


# ------------------------------------------------------------------------------------------------ output
def gains(results: list[LayoutResult]) -> dict[str, Any]:
    """Useful tokens/s of packed (ours) over padded (ours, and transformers), with the first-step losses."""
    ok = {r.layout: r for r in results if r.status == "ok"}
    found: dict[str, Any] = {}
    packed = ok.get("packed")
    if packed is not None:
        for other in ("padded", "transformers"):
            if other in ok:
                found[f"packed_vs_{other}"] = packed.tokens_per_s / ok[other].tokens_per_s
    if len(ok) > 1:
        losses = [r.first_loss for r in ok.values()]
        found["first_loss_spread"] = max(losses) - min(losses)
    return found


TABLE_HEADERS = ["layout", "impl", "rows", "micro-batches", "padding", "useful tok/s", "target tok/s", "step s", "MFU",
                 "peak mem", "loss step 1", "settings", "status"]


def table_row(r: LayoutResult) -> list[str]:
    ok = r.status == "ok"
    impl = f"{r.impl}{' ' + r.path if r.path else ''}"
    return [r.layout if r.layout != "transformers" else "padded", impl, str(r.rows), str(r.micro_batches),
            f"{r.padding_fraction:.1%}",
            f"{r.tokens_per_s:,.0f}" if ok else "-", f"{r.target_tokens_per_s:,.0f}" if ok else "-",
            f"{r.step_s:.3f}" if ok else "-", fmt_mfu(r.mfu) if ok else "-",
            fmt_gib(r.peak_gib) if ok else (f"≥ {fmt_gib(r.peak_gib)}" if r.peak_gib else "-"),
            f"{r.first_loss:.4f}" if ok else "-", settings_note(r), r.status]


def settings_note(r: LayoutResult) -> str:
    graphs = f", {r.compiled_graphs} compiled graphs" if r.compiled_graphs else ""
    return (r.settings or "-") + graphs


def gain_lines(found: dict[str, Any]) -> list[str]:
    lines = []
    if "packed_vs_padded" in found:
        lines.append(f"packing gain (ours fast): {found['packed_vs_padded']:.2f}x useful tokens/s, packed over padded")
    if "packed_vs_transformers" in found:
        lines.append(f"ours packed = {found['packed_vs_transformers']:.2f}x transformers (sdpa, padded) "
                     "useful tokens/s")
    if "first_loss_spread" in found:
        lines.append(f"first-step loss, same weights and conversations: spread {found['first_loss_spread']:.2e}")
    return lines


def summary_rows(results: list[LayoutResult], model: str) -> list[list[str]]:
    """Rows for run_all_gpu.sh's combined table: benchmark, variant, throughput, memory, note."""
    rows = []
    for r in results:
        layout = "padded" if r.layout == "transformers" else r.layout
        variant = f"{r.impl}{' ' + r.path if r.path else ''}, {layout}: {r.rows} rows, {r.padding_fraction:.1%} padding"
        throughput = (f"{r.tokens_per_s:,.0f} useful tok/s, {r.target_tokens_per_s:,.0f} target tok/s, "
                      f"MFU {fmt_mfu(r.mfu)}" if r.status == "ok" else r.status)
        memory = fmt_gib(r.peak_gib) if r.status == "ok" or r.peak_gib is None else f"≥ {fmt_gib(r.peak_gib)}"
        note = "; ".join(x for x in (f"loss@1 {r.first_loss:.3f}" if r.first_loss is not None else "",
                                     settings_note(r)) if x)
        rows.append([f"packing gain {model}", variant, throughput, memory, note])
    for line in gain_lines(gains(results)):
        rows.append([f"packing gain {model}", "comparison", line, "", ""])
    return rows


def write_json(path: Path, env: dict, args, layouts: list[Layout], results: list[LayoutResult]) -> None:
    payload = {
        "benchmark": "packing_gain",
        "model": args.model_name,
        "settings": {k: v for k, v in vars(args).items() if k != "model_name"},
        **env,
        "peak_flops_per_s": peak_flops_per_second(env["device"]),
        "conversation_lengths": args.lengths,
        "layouts": [layout.describe() for layout in layouts],
        "results": [asdict(r) for r in results],
        "gains": gains(results),
        "summary_rows": summary_rows(results, args.model_name),
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--conversations", type=int, default=None, help="how many (default 48; tiny: 12)")
    parser.add_argument("--min-len", type=int, default=None, help="shortest conversation, image included (300)")
    parser.add_argument("--max-len", type=int, default=None, help="longest conversation, image included (2000)")
    parser.add_argument("--seq-length", type=int, default=None, help="packed row length (4096; tiny: 128)")
    parser.add_argument("--padded-rows", type=int, default=2, help="rows per padded micro-batch")
    parser.add_argument("--pad-multiple", type=int, default=1,
                        help="round each padded micro-batch's length up to a multiple of this (1: to its longest)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help="which to time, in order: packed, padded (ours fast), transformers (padded)")
    parser.add_argument("--ac", default="auto", choices=["auto", "none", "full", "selective"],
                        help="activation checkpointing of ours fast (auto: by row length, as train_step.py)")
    parser.add_argument("--hf-checkpointing", default="auto", choices=["auto", "on", "off"],
                        help="transformers' gradient checkpointing (auto: on above 4,096 tokens per row)")
    parser.add_argument("--tag", default="", help="appended to the JSON file name")
    parser.add_argument("--warmup", type=int, default=1, help="whole steps before timing (the first compiles)")
    parser.add_argument("--steps", type=int, default=2, help="timed whole steps (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)
    defaults = TINY_DEFAULTS if args.tiny else REAL_DEFAULTS
    for name, value in zip(("conversations", "min_len", "max_len", "seq_length"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    chosen = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if not chosen or any(x not in LAYOUTS for x in chosen):
        parser.error(f"--layouts {args.layouts!r}: expected some of {', '.join(LAYOUTS)}")
    if min(args.steps, args.conversations, args.padded_rows, args.pad_multiple) < 1 or args.warmup < 0:
        parser.error("--steps, --conversations, --padded-rows and --pad-multiple must be >= 1, --warmup >= 0")
    if not 0 < args.min_len <= args.max_len <= args.seq_length:
        parser.error(f"need 0 < --min-len ({args.min_len}) <= --max-len ({args.max_len}) <= --seq-length "
                     f"({args.seq_length}): every conversation must fit in a packed row")
    args.cpu_offload = False  # what prepare_ours reads; the recipe's AdamW on the device
    args.model_name = "tiny" if args.tiny else args.model

    device, out, raw, config, env = benchmark_setup(args)
    args.lengths = conversation_lengths(args.conversations, args.min_len, args.max_len, args.seed)
    try:
        samples = conversations(config, args.lengths, args.seed)
    except Gemma3VLError as exc:
        parser.error(str(exc))
    layouts = [packed_layout(samples, config, args.seq_length),
               padded_layout(samples, config, args.padded_rows, args.pad_multiple)]
    by_name = {"packed": layouts[0], "padded": layouts[1], "transformers": layouts[1]}
    say(f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, commit {env['commit']}; "
        f"{args.conversations} conversations, {layouts[0].useful_tokens:,} tokens, {layouts[0].target_tokens:,} "
        f"with labels; packed {layouts[0].rows} rows ({layouts[0].padding_fraction:.1%} padding), padded "
        f"{layouts[1].rows} rows ({layouts[1].padding_fraction:.1%} padding)")
    json_path = out / f"packing_gain-{args.model_name}{args.tag}.json"
    results: list[LayoutResult] = []
    write_json(json_path, env, args, layouts, results)
    for name in chosen:
        results.append(run_layout(name, by_name[name], raw, config, device, args))
        write_json(json_path, env, args, layouts, results)

    print(f"\nPacking gain, Gemma 3 {args.model_name} shapes, random weights, SFT (bf16 weights, AdamW): one optimizer "
          f"step = {args.conversations} conversations of {args.min_len:,}-{args.max_len:,} tokens (one "
          f"{config.vision.image_size} px image each; {layouts[0].useful_tokens:,} tokens, "
          f"{layouts[0].target_tokens:,} with labels), packed into rows of {args.seq_length:,} or padded "
          f"{args.padded_rows} rows per micro-batch; median of {args.steps} steps after {args.warmup} warmup; "
          f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, commit {env['commit']}, "
          f"{env['date']}.\n")
    for line in gain_lines(gains(results)):
        print(line)
    print()
    print(markdown_table(TABLE_HEADERS, [table_row(r) for r in results]))
    return 0 if all(r.status in ("ok", "OOM") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
