"""The process group, the device mesh, and what the training loop asks of the other ranks.

``torchrun`` (or Slurm through it) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_distributed` reads them, picks NCCL when there is a GPU and gloo otherwise, and
binds the process to GPU ``LOCAL_RANK`` (the GPU's index on its node; everything else is keyed on the global
``RANK``). Without those variables nothing is initialised and training runs in one process exactly as before.

Several nodes: :func:`check_shared_directory` makes sure every rank sees the directory rank 0 writes to (the
run's ``OUT``: each rank writes its own shards of every checkpoint there), and :func:`node_of_each_rank` tells
which ranks share a node (to warn when a tensor-parallel group spans nodes).
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from gemma3vl.errors import Gemma3VLError
from gemma3vl.parallel.dims import MESH_DIMS, ParallelDims


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(*, use_gpu: bool = True, timeout_s: float = 1800.0) -> torch.device:
    """Join the process group torchrun describes; returns this rank's device (``cuda:LOCAL_RANK`` or cpu)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_gpu and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise Gemma3VLError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): launch at most "
                f"that many processes per node (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if device.type == "cuda":
            kwargs["device_id"] = device  # binds NCCL to this GPU now instead of guessing at the first collective
        dist.init_process_group(**kwargs)
    return device


SHARED_CHECK_WAIT_S = 3.0  # how long a rank looks for rank 0's file (a shared filesystem's slack), failing case only


def node_of_each_rank() -> list[str]:
    """Every rank's node, in global rank order (collective over the whole job): the host name and torchrun's node
    rank (``GROUP_RANK``), so two torchrun agents on one host count as two nodes, as they run apart."""
    here = f"{socket.gethostname()}/{os.environ.get('GROUP_RANK', '?')}"
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, here)
    return nodes


def check_shared_directory(directory: Path, what: str = "--out") -> None:
    """Refuse, on every rank, a ``directory`` that is not the same directory on every node (collective).

    Rank 0 writes a file with a random token there; every rank looks for it (for up to ``SHARED_CHECK_WAIT_S``);
    the ranks' findings are gathered and rank 0 removes the file. Without this, a node-local ``OUT`` trains to
    the end without a word: each node's ranks write their checkpoint shards into their own directory, and rank 0
    marks its checkpoints complete with the other nodes' shards missing."""
    rank = dist.get_rank()
    token: list[Any] = [secrets.token_hex(8) if rank == 0 else None]
    probe = None
    if rank == 0:
        probe = directory / f".gemma3vl-shared-check-{token[0]}"
        try:
            probe.write_text(token[0])
        except OSError as exc:
            token = [OSError(f"{what} {directory}: cannot write there ({exc})")]
    dist.broadcast_object_list(token, src=0)
    if isinstance(token[0], OSError):  # every rank stops with rank 0's reason (rather than waiting for it)
        raise Gemma3VLError(str(token[0]))
    name = directory / f".gemma3vl-shared-check-{token[0]}"
    deadline = time.monotonic() + SHARED_CHECK_WAIT_S
    while True:
        try:
            seen = name.read_text() == token[0]
        except OSError:
            seen = False
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    findings: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(findings, (seen, str(directory.resolve()), socket.gethostname()))
    if probe is not None:
        probe.unlink(missing_ok=True)
    blind = [(r, path, host) for r, (ok, path, host) in enumerate(findings) if not ok]
    if blind:
        shown = ", ".join(f"rank {r} ({path} on {host})" for r, path, host in blind[:8])
        more = f" and {len(blind) - 8} more" if len(blind) > 8 else ""
        raise Gemma3VLError(
            f"{what} {directory} is not one directory shared by every node: rank 0 wrote a file in "
            f"{findings[0][1]} (on {findings[0][2]}) that {shown}{more} cannot see. Every rank writes its own shards "
            f"of each checkpoint there, so {what} must be on a filesystem all nodes mount at the same path (NFS, "
            f"Lustre, GPFS, ...), given as the same path on every node (an absolute path, or the same working "
            f"directory)")


@dataclass
class ParallelContext:
    """The layout of the ranks and the few collective operations the trainer needs.

    ``dp_mesh`` is the data-parallel group (replicas x FSDP shards): its ranks read different data. The
    ranks of one data-parallel rank along ``cp``, ``tp`` and ``pp`` read the same data. ``batch_mesh`` is
    data parallel x context parallel: the ranks that together hold the step's tokens (each CP rank a slice of
    every sequence), over which the step's loss and token counts are summed.
    """

    dims: ParallelDims
    mesh: DeviceMesh
    dp_mesh: DeviceMesh  # dp_replicate x dp_shard flattened: the ranks that read different data
    batch_mesh: DeviceMesh  # dp_replicate x dp_shard x cp flattened: the ranks that share the step's tokens
    device: torch.device
    sequence_parallel: bool = False  # on only with tp > 1

    @classmethod
    def create(cls, dims: ParallelDims, device: torch.device, *, sequence_parallel: bool) -> "ParallelContext":
        shape = tuple(getattr(dims, name) for name in MESH_DIMS)
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS)
        dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        batch_mesh = mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")  # FSDP's shard dimension (see fsdp_mesh)
        return cls(dims=dims, mesh=mesh, dp_mesh=dp_mesh, batch_mesh=batch_mesh, device=device,
                   sequence_parallel=sequence_parallel and dims.tp_enabled)

    # ------------------------------------------------------------------ meshes
    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    @property
    def cp_mesh(self) -> DeviceMesh:
        return self.mesh["cp"]

    @property
    def pp_mesh(self) -> DeviceMesh:
        return self.mesh["pp"]

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """1-D for FSDP; 2-D (replicate, shard) for HSDP. The shard dimension is ``dp_shard x cp``: context-
        parallel ranks hold the same parameters, so FSDP shards over them too and sums their gradients."""
        if self.dims.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard_cp"]
        return self.mesh["dp_shard_cp"]

    def tp_groups_across_nodes(self) -> list[list[int]]:
        """The tensor-parallel groups whose ranks are on more than one node (collective over the whole job).
        TP is the mesh's innermost dimension, so its groups are consecutive global ranks and torchrun gives a
        node consecutive ranks: a group stays on one node when ``tp`` divides the processes per node."""
        if self.dims.tp == 1:
            return []
        nodes = node_of_each_rank()
        groups = self.mesh.mesh.reshape(-1, self.dims.tp).tolist()  # (tp is the last mesh dimension)
        return [group for group in groups if len({nodes[rank] for rank in group}) > 1]

    # ------------------------------------------------------------------ collectives
    def sum_over_batch(self, *values: float) -> list[float]:
        """Sums over the ranks that share the step's tokens, data x context parallel (float64, so token
        counts stay exact)."""
        return self._sum(values, self.batch_mesh)

    def sum_over_batch_on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed in place over the ranks that share the step's tokens, without a read on the host."""
        dist.all_reduce(tensor, group=self.batch_mesh.get_group())
        return tensor

    def sum_over_cp(self, *values: float) -> list[float]:
        """Sums over the context-parallel ranks of this data-parallel rank (the slices of the same rows)."""
        return self._sum(values, self.cp_mesh)

    def _sum(self, values, mesh: DeviceMesh) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=mesh.get_group())
        return tensor.tolist()

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank of the whole job (every rank gets the same answer)."""
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def gather_over_dp(self, value: Any) -> list[Any]:
        """Every data-parallel rank's ``value`` (a picklable object), in data-parallel rank order."""
        gathered: list[Any] = [None] * self.dims.dp
        dist.all_gather_object(gathered, value, group=self.dp_mesh.get_group())
        return gathered


def total_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The 2-norm of the whole model's gradient, as a plain tensor; for DTensor parameters (sharded by FSDP and/or
    TP) the same value on every rank."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # the sum over every shard (a Partial or Replicate norm -> one value)
    return total


def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for parameters that are DTensors (sharded by FSDP and/or TP): the
    norm of the whole model's gradient, the same on every rank, then the same scaling everywhere."""
    parameters = [p for p in parameters if p.grad is not None]
    total = total_grad_norm(parameters)
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total
