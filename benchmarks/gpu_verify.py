"""GPU parity at real shapes: random Gemma 3 weights (bf16, hub layout, sharded like the hub), imported
to the native format, then our model against transformers (sdpa) on the same synthetic batch.

Run on a GPU machine from the repository root (no install needed, no network):

    PYTHONPATH=src python benchmarks/gpu_verify.py --model 4b --work /tmp/g3 --out "$OUT"

Prints a table last and writes ``verify-<model>.json`` under --out. Goal (issue 2): greedy tokens equal,
cosine >= 0.999 in bf16.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from gemma3vl import bridge, verify
from gemma3vl.config import preset_path
from gemma3vl.infer.loading import load_model


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="4b", choices=["4b", "12b", "27b"])
    parser.add_argument("--work", default="/tmp/gemma3vl-gpu")
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--greedy-tokens", type=int, default=16)
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    raw = json.loads(preset_path(args.model).read_text())
    device, dtype = torch.device("cuda"), torch.bfloat16
    rows = []

    started = time.perf_counter()
    bridge.write_random_hf_checkpoint(raw, work / "hf", layout="hub", dtype=dtype, max_shard_bytes=5 * 10**9)
    rows.append(("write random checkpoint", f"{time.perf_counter() - started:.1f} s"))
    started = time.perf_counter()
    bridge.import_checkpoint(work / "hf", work / "native", progress=False)
    rows.append(("import", f"{time.perf_counter() - started:.1f} s"))

    config = bridge.read_config(work / "hf")
    started = time.perf_counter()
    reference = verify.load_reference(work / "hf", config, dtype, device)
    ours, _ = load_model(work / "native", device=device, dtype=dtype)
    rows.append(("load both models", f"{time.perf_counter() - started:.1f} s"))
    torch.cuda.synchronize()
    started = time.perf_counter()
    report = verify.compare(ours, reference, config, dtype=dtype, device=device, greedy_tokens=args.greedy_tokens)
    rows.append(("compare (logits + greedy)", f"{time.perf_counter() - started:.1f} s"))
    rows.append(("peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"))

    result = verify.report_dict(report) | {
        "model": args.model,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / f"verify-{args.model}.json").write_text(json.dumps(result, indent=2))
    print(verify.format_report(report))
    print(f"\n| step | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"| device | {result['device']} (torch {result['torch']}, transformers {result['transformers']}) |")
    return 0 if report.passed and report.greedy_equal else 1


if __name__ == "__main__":
    sys.exit(main())
