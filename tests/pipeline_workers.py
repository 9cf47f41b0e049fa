"""Work for ranks spawned by tests/test_parallel_pipeline.py, kept apart from it so that each spawned process
imports only this (the test module imports the CLI and the layout tests' fixtures: seconds per process)."""

from pathlib import Path

import torch
import torch.distributed as dist

from gemma3vl import bridge
from gemma3vl.model import Gemma3Model
from gemma3vl.parallel import ParallelContext, ParallelDims
from gemma3vl.parallel.export import gather_pipeline_state
from gemma3vl.parallel.pipeline import build_pipeline
from gemma3vl.parallel.sharded_load import load_sharded


def load_stages(rank: int, world: int, init_file: str, model_dir: str, out: str) -> None:
    """One rank of PP2 x TP2: the model on meta, this rank's stage parallelized and filled by load_sharded;
    saves (bytes read, bytes of its stage's local shards, names held) and, on rank 0, the gathered state."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dims = ParallelDims.resolve({"dp_replicate": 1, "dp_shard": 1, "tp": 2, "pp": 2, "cp": 1}, world)
        context = ParallelContext.create(dims, torch.device("cpu"), sequence_parallel=True)
        with torch.device("meta"):
            model = Gemma3Model(bridge.read_config(model_dir))
        view = build_pipeline(model, context, schedule="1f1b", stages_per_rank_setting=1, micro_batches=2,
                              micro_batch_size=1, seq_length=16,
                              load=lambda stage: load_sharded(model_dir, stage, part_of=model))
        pipeline = view.pipeline
        own = sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size()
                  for module in pipeline.stage_modules for t in module.state_dict().values())
        held = sorted({name for module in pipeline.stage_modules for name in module.state_dict()})
        state = gather_pipeline_state(view, context, skip=pipeline.duplicate_names)
        if rank == 0:
            torch.save(state, Path(out) / "state.pt")
        torch.save((pipeline.bytes_read, own, held), Path(out) / f"read{rank}.pt")
    finally:
        dist.destroy_process_group()
