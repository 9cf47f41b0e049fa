"""Parallel layouts applied from outside the plain model (torchtitan's split): the mesh and its checks
(``dims``), tensor + sequence parallelism (``tensor``, ``loss``), FSDP2 (``fsdp``), activation checkpointing
and compile (``activation``), composed in one fixed order by ``parallelize``."""

from gemma3vl.parallel.dims import ParallelDims
from gemma3vl.parallel.distributed import ParallelContext, clip_grad_norm_, init_distributed, launched_by_torchrun
from gemma3vl.parallel.parallelize import parallelize

__all__ = ["ParallelContext", "ParallelDims", "clip_grad_norm_", "init_distributed", "launched_by_torchrun",
           "parallelize"]
