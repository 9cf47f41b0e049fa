"""CPU benchmark of the HF <-> native bridge at the real Gemma 3 4B shapes.

Writes a random bf16 checkpoint with the 4B config (hub layout, sharded at 5 GB like the Hub: 2 files,
~8.6 GB), then times a plain ``cp -r`` of it (the baseline a user would otherwise run), ``import`` and
``export`` (layout source), each in its own process so its peak RSS is its own, and checks that the
exported files are byte-for-byte the source files. Prints a markdown table. Needs ~35 GB free under WORKDIR.

    python benchmarks/convert_cpu.py /tmp/gemma3vl-bench [--keep]

Conversions fsync every file before renaming the directory into place; ``cp -r`` does not, so the table
shows ``cp -r`` alone and ``cp -r && sync`` (the like-for-like baseline). Caches are not dropped: every step
reads files that were just written, as a conversion right after a download would.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

PRESET = Path(__file__).resolve().parents[1] / "src" / "gemma3vl" / "presets" / "gemma-3-4b-it.json"
HUB_SHARD_BYTES = 5 * 10**9

_CHILD = """
import json, resource, sys, time
from gemma3vl import bridge
what, source, out = sys.argv[1:4]
started = time.perf_counter()
if what == "import":
    bridge.import_checkpoint(source, out, progress=False)
else:
    bridge.export_checkpoint(source, out, layout="source", progress=False)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def timed_command(command: list[str]) -> float:
    subprocess.run(["sync"], check=True)  # start every step with no dirty pages left by the previous one
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def convert_in_child(what: str, source: Path, out: Path) -> dict:
    """Run one conversion in a fresh interpreter; its own ru_maxrss is the peak RSS of that conversion
    (interpreter and torch included). Wall time is measured around the whole process, startup included."""
    subprocess.run(["sync"], check=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, what, str(source), str(out)], check=True,
                          capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - started
    return result


def weight_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    args = parser.parse_args()
    import torch

    from gemma3vl import bridge

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    hf, copy, native, exported = work / "hf", work / "hf-copy", work / "native", work / "exported"
    for path in (hf, copy, native, exported):
        shutil.rmtree(path, ignore_errors=True)

    started = time.perf_counter()
    config = json.loads(PRESET.read_text())
    bridge.write_random_hf_checkpoint(config, hf, layout="hub", dtype=torch.bfloat16, max_shard_bytes=HUB_SHARD_BYTES)
    generated = time.perf_counter() - started
    size = weight_bytes(hf)
    files = sorted(p.name for p in hf.glob("*.safetensors"))
    print(f"random 4B checkpoint: {size / 1e9:.2f} GB in {files} ({generated:.0f}s to generate)", file=sys.stderr)

    copy_seconds = timed_command(["cp", "-r", str(hf), str(copy)])
    sync_started = time.perf_counter()
    subprocess.run(["sync"], check=True)
    copy_sync_seconds = copy_seconds + time.perf_counter() - sync_started
    shutil.rmtree(copy)

    imported = convert_in_child("import", hf, native)
    exported_result = convert_in_child("export", native, exported)

    identical = sorted(p.name for p in exported.iterdir()) == sorted(p.name for p in hf.iterdir()) and all(
        filecmp.cmp(hf / name, exported / name, shallow=False) for name in sorted(os.listdir(hf))
    )

    gb = size / 1e9
    rows = [
        ("cp -r (baseline)", copy_seconds, None),
        ("cp -r && sync", copy_sync_seconds, None),
        ("import (HF hub -> native)", imported["wall"], imported["peak_rss_kib"]),
        ("export (native -> HF, source layout)", exported_result["wall"], exported_result["peak_rss_kib"]),
    ]
    print(f"\nGemma 3 4B shapes, random bf16, {gb:.2f} GB in {len(files)} files; {date.today()}, "
          f"{platform.machine()} {os.cpu_count()}-core CPU, python {platform.python_version()}, torch {torch.__version__}\n")
    print("| step | wall s | GB/s | vs cp -r | vs cp -r && sync | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds, rss in rows:
        peak = f"{rss / 2**20:.2f} GiB" if rss else "-"
        print(f"| {name} | {seconds:.1f} | {gb / seconds:.2f} | {seconds / copy_seconds:.2f}x | "
              f"{seconds / copy_sync_seconds:.2f}x | {peak} |")
    print(f"\nexported files byte-identical to the source: {'yes' if identical else 'NO'}")
    print("(conversion wall times include interpreter + torch start-up and the fsync of every file; peak RSS "
          "is the converting process's ru_maxrss)")

    if not args.keep:
        for path in (hf, native, exported):
            shutil.rmtree(path, ignore_errors=True)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
