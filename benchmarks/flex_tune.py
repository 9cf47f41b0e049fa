"""FlexAttention kernel options at Gemma 3's head shapes: forward + backward time of each candidate, on one GPU.

The 4B SFT step's profile (docs/benchmarks.md, H200) has FlexAttention's backward at 35.5 ms of a 0.32 s step,
about 100 TFLOP/s: inductor's default Triton tiles for head_dim 256 are not tuned for this mask. This script
times candidate ``kernel_options`` on the benchmark's packed row with images (``train_step.check_row_info``),
both layer types, bf16, and checks each candidate's output and gradients against the default's. The winner goes
into ``GEMMA3VL_FLEX_KERNEL_OPTIONS`` (read by ``gemma3vl.model.flex.kernel_options``), printed last. The last
candidate is not a set of options but inductor's own search (``torch.compile(mode="max-autotune-no-cudagraphs")``,
what ``parallel.compile_mode`` sets for training): it times its candidate tiles itself (a minute or two).

    python benchmarks/flex_tune.py --model 4b --seq 4096 --out bench-out      # CUDA only

Each candidate compiles its own kernels (~10-20 s on an H200); one that cannot compile (too much shared memory,
an option this torch does not know) is reported as failed and the rest go on. Writes ``flex_tune-<model>.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import benchmark_parser, benchmark_setup, check_row_info, markdown_table, say  # noqa: E402

from gemma3vl.config import SLIDING, Gemma3Config  # noqa: E402
from gemma3vl.errors import Gemma3VLError  # noqa: E402
from gemma3vl.model.attention import TokenInfo  # noqa: E402
from torch.nn.attention.flex_attention import flex_attention  # noqa: E402

from gemma3vl.model.flex import KERNEL_OPTIONS_ENV, block_mask, compiled_flex_attention  # noqa: E402

MODE = "compile_mode"  # a candidate {MODE: mode}: flex compiled with that torch.compile mode, default options
# Backward first (it is 6x the forward's time in the profile); block sizes must divide the BlockMask's 128.
CANDIDATES: list[dict[str, Any]] = [
    {},  # inductor's defaults: the reference the others are checked against
    {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32, "bwd_num_warps": 4,
     "bwd_num_stages": 2},
    {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64, "bwd_num_warps": 8,
     "bwd_num_stages": 1},
    {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 32, "bwd_num_warps": 8,
     "bwd_num_stages": 1},
    {"bwd_BLOCK_M1": 16, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 16, "bwd_num_warps": 4,
     "bwd_num_stages": 3},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 2},
    # not kernel options: inductor's own search (``parallel.compile_mode=max-autotune-no-cudagraphs`` in training)
    {MODE: "max-autotune-no-cudagraphs"},
]


def parse_candidates(text: str | None) -> list[dict[str, Any]]:
    """``--candidates``: a JSON list of option objects (the default first is added when missing)."""
    if text is None:
        return [dict(c) for c in CANDIDATES]
    try:
        given = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Gemma3VLError(f"--candidates: not JSON ({exc})") from None
    if not isinstance(given, list) or not all(isinstance(c, dict) for c in given):
        raise Gemma3VLError("--candidates: expected a JSON list of objects, e.g. '[{\"bwd_BLOCK_M1\": 32}]'")
    return given if given and given[0] == {} else [{}, *given]


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().float(), ref.detach().float()
    return float((x - ref).abs().max()) / (float(ref.abs().max()) or 1.0)


def run_candidate(options: dict[str, Any], inputs, masks, scale: float, repeats: int) -> dict[str, Any]:
    """Forward + backward over both layer types with ``options``: median ms per layer type, and the outputs."""
    options = dict(options)
    mode = options.pop(MODE, None)
    flex = torch.compile(flex_attention, mode=mode) if mode else compiled_flex_attention()
    q, k, v, grad = inputs
    timings, outputs = {}, {}
    for layer_type, mask in masks.items():
        def step():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            out = flex(qq, kk, vv, block_mask=mask, scale=scale, enable_gqa=True, kernel_options=options or None)
            grads = torch.autograd.grad(out, (qq, kk, vv), grad)
            return out, grads

        for _ in range(2):  # compile, then one warm run
            result = step()
        torch.cuda.synchronize()
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        timings[layer_type] = statistics.median(samples)
        outputs[layer_type] = [result[0], *result[1]]
    return {"ms": timings, "outputs": outputs}


def parse_args(argv: list[str] | None = None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=10, help="timed forward+backward runs per layer type")
    parser.add_argument("--candidates", default=None, help="a JSON list of kernel_options objects to try")
    parser.add_argument("--out", default="bench-out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, out, _raw, config, env = benchmark_setup(args)
    if device.type != "cuda":
        print("flex_tune.py needs CUDA: FlexAttention's kernel options are Triton's (no CPU backward either)",
              file=sys.stderr)
        return 2
    return tune(args, device, out, config, env)


def tune(args, device: torch.device, out, config, env: dict[str, Any]) -> int:
    """Time every candidate, check it against the defaults, write the JSON and print the table and the best."""
    candidates = parse_candidates(args.candidates)
    model_name = "tiny" if args.tiny else args.model
    text = config.text
    info = check_row_info(config, args.seq)
    info = TokenInfo(*(t.to(device) for t in (info.positions, info.segment_ids, info.image_block_ids)))
    live = (info.segment_ids != 0)[0]
    masks = {layer_type: block_mask(info, info, text.sliding_window if layer_type == SLIDING else None)
             for layer_type in (SLIDING, "full_attention")}
    generator = torch.Generator(device=device).manual_seed(0)
    shape_q = (1, text.num_attention_heads, args.seq, text.head_dim)
    shape_kv = (1, text.num_key_value_heads, args.seq, text.head_dim)
    inputs = [torch.randn(s, generator=generator, device=device, dtype=torch.bfloat16)
              for s in (shape_q, shape_kv, shape_kv)]
    inputs.append(torch.randn(shape_q, generator=generator, device=device, dtype=torch.bfloat16)
                  * live[None, None, :, None])
    say(f"{env['device']}, torch {env['torch']}, commit {env['commit']}: flex fwd+bwd at {model_name} head shapes "
        f"(H {text.num_attention_heads}, KV {text.num_key_value_heads}, hd {text.head_dim}), seq {args.seq:,}, "
        f"{len(candidates)} candidates")
    counts = {SLIDING: text.layer_types.count(SLIDING)}
    counts["full_attention"] = len(text.layer_types) - counts[SLIDING]
    rows, reference = [], None
    for index, options in enumerate(candidates):
        started = time.perf_counter()
        row: dict[str, Any] = {"options": options}
        try:
            result = run_candidate(options, inputs, masks, text.attention_scale, args.repeats)
        except Exception as exc:  # reported; the other candidates go on
            row.update(status=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            say(f"[{index}] {json.dumps(options)}: {row['status']}")
            rows.append(row)
            torch.cuda.empty_cache()
            continue
        if reference is None:
            reference = result["outputs"]
        errors = {layer_type: max(relative_error(x, ref) for x, ref in zip(result["outputs"][layer_type], refs))
                  for layer_type, refs in reference.items()}
        agree = all(e <= 1e-2 for e in errors.values())
        # per step of the model: each layer type's time times its number of layers
        total = sum(result["ms"][t] * counts[t] for t in counts)
        row.update(status="ok" if agree else "DIFFERS from the default", ms=result["ms"],
                   total_ms=total, max_error_vs_default=errors,
                   seconds_with_compile=time.perf_counter() - started)
        say(f"[{index}] {json.dumps(options)}: sliding {result['ms'][SLIDING]:.3f} ms, global "
            f"{result['ms']['full_attention']:.3f} ms, error vs default {max(errors.values()):.1e}")
        rows.append(row)
    good = [r for r in rows if r["status"] == "ok"]
    best = min(good, key=lambda r: r["total_ms"]) if good else None
    payload = {"benchmark": "flex_tune", "model": model_name, "seq": args.seq, **env, "rows": rows,
               "best": best and best["options"], "layers": counts}
    (out / f"flex_tune-{model_name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = [[json.dumps(r["options"]), r["status"],
              *(f"{r['ms'][t]:.3f}" if "ms" in r else "-" for t in (SLIDING, "full_attention")),
              f"{r['total_ms']:.1f}" if "total_ms" in r else "-"] for r in rows]
    print(markdown_table(["kernel_options", "status", "sliding ms (fwd+bwd)", "global ms (fwd+bwd)",
                          f"per step ({counts[SLIDING]} + {counts['full_attention']} layers)"], table))
    if best is not None:
        default = rows[0].get("total_ms")
        gain = f" ({default / best['total_ms']:.2f}x the default)" if default else ""
        setting = (f"parallel.compile_mode={best['options'][MODE]}" if MODE in best["options"]
                   else f"{KERNEL_OPTIONS_ENV}='{json.dumps(best['options'])}'")
        print(f"\nbest{gain}: {setting}")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
