"""Sharded loading (parallel/sharded_load.py): each rank reads only the boxes of the checkpoint it owns, and the
sharded model holds exactly the checkpoint's weights.

Region reads are checked against whole-tensor reads for every mapping of the tiny HF checkpoint (q/k/v fusion,
stacks, renames); then gloo process groups on the CPU load the tiny model under FSDP2 (from a native directory) and TP2 x FSDP2 (from
an HF one; FSDP over TP shards q/k/v with a strided placement) and
check (a) the gathered weights equal a single-process load bit for bit and (b) the bytes each rank read from the
checkpoint: its share, not the whole model — the memory bound of the issue, measured where it is decided.
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gemma3vl.bridge.checkpoint import open_checkpoint
from gemma3vl.bridge.convert import import_checkpoint
from gemma3vl.infer.loading import load_model
from gemma3vl.tiny import write_tiny_checkpoint

import launch_ranks

LAYOUTS = {  # name: (world size, dp_shard, tp, largest share of the checkpoint one rank may read)
    "fsdp2": (2, 2, 1, 0.55),
    "tp2_fsdp2": (4, 2, 2, 0.40),  # the text 1/4 each, the (TP-replicated) vision tower 1/2
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    write_tiny_checkpoint(root / "hf")
    import_checkpoint(root / "hf", root / "native")
    return root


def test_region_reads_equal_slices_of_whole_reads(checkpoints):
    generator = torch.Generator().manual_seed(0)
    for directory in (checkpoints / "hf", checkpoints / "native"):
        with open_checkpoint(directory) as checkpoint:
            for mapping in checkpoint.mappings:
                whole = checkpoint.read_native(mapping)
                for _ in range(4):
                    region = []
                    for size in whole.shape:
                        lo = int(torch.randint(0, size + 1, (), generator=generator))
                        hi = int(torch.randint(lo, size + 1, (), generator=generator))
                        region.append(slice(lo, hi))
                    got = checkpoint.read_native_region(mapping, region)
                    assert torch.equal(got, whole[tuple(region)]), (directory.name, mapping.native, region)


def _rank(rank: int, world: int, init_file: str, model_dir: str, dp_shard: int, tp: int, out: str) -> None:
    from gemma3vl.parallel import ParallelContext, ParallelDims, parallelize
    from gemma3vl.parallel.export import gather_full_state
    from gemma3vl.parallel.sharded_load import load_sharded
    from gemma3vl import bridge
    from gemma3vl.model import Gemma3Model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        degrees = {"dp_replicate": 1, "dp_shard": dp_shard, "tp": tp, "pp": 1, "cp": 1}
        dims = ParallelDims.resolve(degrees, world)
        context = ParallelContext.create(dims, torch.device("cpu"), sequence_parallel=tp > 1)
        with torch.device("meta"):
            model = Gemma3Model(bridge.read_config(model_dir))
        parallelize(model, context, activation_checkpoint="full")  # the wrapper must not change the names
        model.to_empty(device="cpu")
        read = load_sharded(model_dir, model)
        own = sum(p.to_local().numel() * p.element_size() if hasattr(p, "to_local") else p.numel() * p.element_size()
                  for p in model.parameters())
        state = gather_full_state(model, torch.device("cpu"))
        if rank == 0:
            torch.save(state, Path(out) / "state.pt")
        torch.save((read, own), Path(out) / f"read{rank}.pt")
    finally:
        dist.destroy_process_group()


def assert_gathered_state_is_the_checkpoint(model_dir: Path, state_file: Path) -> int:
    """The state gathered from the ranks (saved by rank 0) equals a single-process load bit for bit; returns the
    checkpoint's size in bytes."""
    reference, _ = load_model(model_dir, device="cpu", dtype=torch.float32)
    expected = reference.state_dict()
    state = torch.load(state_file, weights_only=True)
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    return sum(t.numel() * t.element_size() for t in expected.values())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_load_reads_only_its_share_and_gives_the_checkpoint(checkpoints, tmp_path, layout):
    world, dp_shard, tp, share = LAYOUTS[layout]
    model_dir = checkpoints / ("native" if layout == "fsdp2" else "hf")
    launch_ranks.spawn(_rank, args=(world, str(tmp_path / "init"), str(model_dir), dp_shard, tp, str(tmp_path)), nprocs=world)
    total = assert_gathered_state_is_the_checkpoint(model_dir, tmp_path / "state.pt")
    for rank in range(world):
        read, own = torch.load(tmp_path / f"read{rank}.pt", weights_only=True)
        assert read == own, f"rank {rank} read {read} bytes of the checkpoint for {own} bytes of shards"
        assert 0 < read <= share * total, f"rank {rank} read {read} of {total} bytes"
