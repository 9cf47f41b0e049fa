"""Conversion streams: output shards respect max_shard_bytes, and peak memory stays far below the model size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from gemma3vl import bridge
from gemma3vl.bridge.safetensors_io import SafetensorsFile
from gemma3vl.tiny import tiny_hf_config

# ~380 MiB in float32 in many tensors of at most 8 MiB (gate_up, 2 x 2048 x 512): holding the model, or
# even one 100 MiB output shard, shows up at once in the peak RSS measured below.
MEDIUM = dict(vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=24,
              num_attention_heads=8, num_key_value_heads=4, head_dim=64)


def shard_sizes(directory: Path) -> list[int]:
    sizes = []
    for path in sorted(directory.glob("*.safetensors")):
        handle = SafetensorsFile(path)
        sizes.append(sum(t.nbytes for t in handle.tensors.values()))
    return sizes


def test_every_output_shard_respects_max_shard_bytes(tmp_path):
    source = tmp_path / "hf"
    bridge.write_random_hf_checkpoint(tiny_hf_config(), source, dtype=torch.float32, max_shard_bytes=300_000)
    total = sum(shard_sizes(source))
    native = bridge.import_checkpoint(source, tmp_path / "native", max_shard_bytes=200_000, progress=False)
    sizes = shard_sizes(native)
    assert len(sizes) >= 5 and max(sizes) <= 200_000 and sum(sizes) == total
    exported = bridge.export_checkpoint(native, tmp_path / "out", layout="transformers5", max_shard_bytes=150_000,
                                        progress=False)
    sizes = shard_sizes(exported)
    assert len(sizes) >= 7 and max(sizes) <= 150_000 and sum(sizes) == total
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total


_MEASURE = textwrap.dedent(
    """
    import json, sys
    from gemma3vl import bridge

    def rss_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    what, source, out, shard = sys.argv[1:5]
    # One-time library costs (lazy imports, first allocations) go before the baseline.
    bridge.native_tensor_specs(bridge.read_config(source))
    before = rss_kib("VmRSS")
    if what == "import":
        bridge.import_checkpoint(source, out, max_shard_bytes=int(shard), progress=False)
    else:
        bridge.export_checkpoint(source, out, layout="source", progress=False)
    print(json.dumps({"before": before, "peak": rss_kib("VmHWM")}))
    """
)


def peak_growth_bytes(*args: str) -> int:
    """Peak RSS reached during one conversion, above the RSS before it, in a fresh process."""
    result = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, check=True)
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    return (numbers["peak"] - numbers["before"]) * 1024


def test_peak_memory_stays_near_one_tensor(tmp_path):
    config = tiny_hf_config(**MEDIUM)
    source = bridge.write_random_hf_checkpoint(config, tmp_path / "hf", dtype=torch.float32,
                                               max_shard_bytes=150 * 2**20)
    total = sum(shard_sizes(source))
    assert total > 360 * 2**20 and len(shard_sizes(source)) == 3
    native = tmp_path / "native"
    grew_import = peak_growth_bytes("import", str(source), str(native), str(100 * 2**20))
    grew_export = peak_growth_bytes("export", str(native), str(tmp_path / "out"), "0")
    # Holding the whole model would grow by >= 360 MiB, holding one output shard by >= 100 MiB. Streaming
    # holds a fused tensor and its parts (2 x 8 MiB) plus what the allocator keeps: a few tens of MiB.
    print(f"peak RSS growth: import {grew_import / 2**20:.0f} MiB, export {grew_export / 2**20:.0f} MiB, "
          f"model {total / 2**20:.0f} MiB")
    assert grew_import < total / 5, (grew_import, total)
    assert grew_export < total / 5, (grew_export, total)
