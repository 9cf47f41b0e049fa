"""Several nodes, simulated on one machine: two ``torchrun`` agents, each with its own working directory and
``--node-rank``, meeting at one rendezvous, as ``torchrun --nnodes=2`` on two hosts would. On each "node" LOCAL_RANK
starts from 0, RANK is global and LOCAL_WORLD_SIZE (1) is not WORLD_SIZE (2).

Three launches (torchrun's start is most of the cost), each checking several things:

1. FSDP over the 2 nodes computes one process's losses, gradient norms, held-out loss and weights (to 1e-5, the
   layout tests' helpers); every file in OUT is written by one global rank (rank 1 writes only its own checkpoint
   shards), messages are printed once, and the two ranks read disjoint samples that together are one epoch.
   An audit hook (``sitecustomize`` on the workers' PYTHONPATH) records every file each rank opens or renames.
2. OUT given as a different directory on each node (not shared) fails at start on both nodes, saying so.
3. ``--resume`` of (1)'s checkpoint on the 2 nodes under TP2 (a tensor-parallel group across the nodes: warned
   once), continuing with one process's next step; SIGTERM reaching only rank 1 (node 1) stops both nodes after the
   same step, with one complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from gemma3vl.cli import main
from gemma3vl.data.dataset import ConversationDataset
from gemma3vl.data.settings import DataConfig
from gemma3vl.errors import Gemma3VLError
from gemma3vl.shapes import write_shapes_dataset
from gemma3vl.tiny import write_tiny_checkpoint
import launch_ranks
from launch_ranks import free_port
from test_parallel_layouts import (COMMON, TIMEOUT_S, _worker_pid, assert_losses_match, assert_weights_match,
                                   exported, losses)

RECORDS = 12  # 3 steps of 4 rows: one epoch
SETTINGS = [*COMMON, "logging.tensorboard=true"]

# Installed on the workers (they have RANK; the torchrun agents do not): every file opened for writing or reading,
# and every rename, as "write|read|rename <tab> path [<tab> new path]" lines in AUDIT_DIR/rank<RANK>.log.
AUDIT_HOOK = r'''
import os, sys, threading
_DIR, _RANK = os.environ.get("AUDIT_DIR"), os.environ.get("RANK")
if _DIR and _RANK is not None:
    _fd = os.open(os.path.join(_DIR, f"rank{_RANK}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    _state = threading.local()  # per thread: one thread inside the hook must not hide another thread's opens
    _WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args):
        if getattr(_state, "busy", False) or event not in ("open", "os.rename", "os.replace"):
            return
        _state.busy = True
        try:
            if event == "open":
                path, mode, flags = args
                if path is None or isinstance(path, int):
                    return
                writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITES)
                line = ("write" if writes else "read") + "\t" + os.path.abspath(os.fsdecode(path))
            else:
                line = "rename\t" + os.path.abspath(os.fsdecode(args[0])) + "\t" + os.path.abspath(os.fsdecode(args[1]))
            os.write(_fd, (line + "\n").encode())
        finally:
            _state.busy = False

    sys.addaudithook(_hook)
'''
# What the trainer prints (rank 0 alone, once each).
MESSAGES = ("parallel:", "model:", "sharded loading:", "eval at step", "checkpoint:", "data:", "HF checkpoint:",
            "loss curves:", "trained ", "stopped:", "warning:")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    write_tiny_checkpoint(root / "base")
    write_shapes_dataset(root / "data", RECORDS, seed=0, name="train")
    write_shapes_dataset(root / "data", 4, seed=0, name="eval")
    (root / "hooks").mkdir()
    (root / "hooks" / "sitecustomize.py").write_text(AUDIT_HOOK)
    return root


def inputs(root: Path, *, evaluate: bool = True) -> list[str]:
    args = ["--model", str(root / "base"), "--data", str(root / "data" / "train.jsonl")]
    return args + ["--eval-data", str(root / "data" / "eval.jsonl")] * evaluate


def start_two_nodes(root: Path, name: str, outs: tuple[Path, Path], *args: str, rendezvous: str = "static"):
    """Two torchrun agents of 1 process each, as on two nodes: their own working directories, one rendezvous
    (``static``: --master-addr/--master-port and --node-rank; ``c10d``: --rdzv-endpoint, ranks by arrival).
    Returns the agents (Popen, stderr piped) and the audit directory."""
    port, audit = free_port(), root / f"{name}-audit"
    audit.mkdir()
    agents = []
    for node, out in enumerate(outs):
        cwd = root / f"{name}-node{node}"
        cwd.mkdir()
        meet = ([f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}"] if rendezvous == "static"
                else ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={name}"])
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", *meet,
                   "-m", "gemma3vl", "train", "--recipe", "tiny_sft", "--out", str(out), *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
               "PYTHONPATH": os.pathsep.join([str(root / "hooks"), os.environ.get("PYTHONPATH", "")]),
               "AUDIT_DIR": str(audit)}
        agents.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True))
    return agents, audit


def finish(agents) -> list[tuple[int, str]]:
    """Each agent's exit code and standard error."""
    try:
        errors = [agent.communicate(timeout=TIMEOUT_S)[1] for agent in agents]
        return [(agent.returncode, stderr) for agent, stderr in zip(agents, errors)]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()


def printed(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(MESSAGES)]


def audit_log(audit: Path) -> dict[int, list[list[str]]]:
    return {int(path.stem[4:]): [line.split("\t") for line in path.read_text().splitlines()]
            for path in audit.glob("rank*.log")}


# ---------------------------------------------------------------------------------------------- 1. FSDP on 2 nodes
@pytest.fixture(scope="module")
def reference(workdir):
    out = workdir / "single"
    assert main(["train", "--out", str(out), "--recipe", "tiny_sft", *inputs(workdir), *SETTINGS]) == 0
    return out


@pytest.fixture(scope="module")
def fsdp_two_nodes(workdir):
    out = workdir / "fsdp"
    # data.prefetch=0: the audit compares the records each rank read with its share of one epoch, and a prefetching
    # thread reads a step or two ahead, into the next epoch, as far as it got before the run ended (the layouts'
    # tests cover prefetching under torchrun)
    agents, audit = start_two_nodes(workdir, "fsdp", (out, out), *inputs(workdir), *SETTINGS, "parallel.dp_shard=2",
                                    "data.prefetch=0")
    results = finish(agents)
    for code, stderr in results:
        assert code == 0, stderr[-4000:]
    return out, [stderr for _, stderr in results], audit_log(audit)


def test_fsdp_over_two_nodes_computes_what_one_process_computes(fsdp_two_nodes, reference):
    out, _, _ = fsdp_two_nodes
    assert sorted(losses(reference)) == [1, 2, 3]
    for key in ("loss", "grad_norm", "eval_loss"):
        assert_losses_match(losses(out, key), losses(reference, key))
    assert_weights_match(exported(out), exported(reference))
    for step in ("step-00000002", "step-00000003"):  # both nodes' shards in each checkpoint
        files = {p.name for p in (out / "checkpoints" / step).iterdir()}
        assert {"COMPLETE", ".metadata", "__0_0.distcp", "__1_0.distcp"} <= files, files


def test_every_file_is_written_by_one_rank_and_messages_are_printed_once(fsdp_two_nodes):
    out, (node0, node1), log = fsdp_two_nodes
    assert sorted(log) == [0, 1]
    written = {rank: {entry[1] for entry in entries if entry[0] == "write" and entry[1].startswith(str(out))}
               for rank, entries in log.items()}
    renamed = {rank: [entry for entry in entries if entry[0] == "rename" and entry[1].startswith(str(out))]
               for rank, entries in log.items()}
    assert not written[0] & written[1]
    # Rank 1 writes its own shard of each checkpoint into the staging directory rank 0 names, and nothing else.
    assert written[1] and all(Path(path).name == "__1_0.distcp" and Path(path).parent.name.startswith(".step-")
                              for path in written[1]), sorted(written[1])
    assert not renamed[1]
    finals = {Path(entry[2]).relative_to(out) for entry in renamed[0]}
    assert {Path("hf"), Path("checkpoints/step-00000002"), Path("checkpoints/step-00000003")} <= finals
    names = {Path(path).relative_to(out).parts[0] for path in written[0]}
    assert {"metrics.jsonl", "train_config.json", "data_summary.json", "loss.png", "tensorboard"} <= names
    assert len(list((out / "tensorboard").iterdir())) == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "loss" in r) for r in records] == [(0, False), (1, True), (2, True), (3, True), (3, False)]
    # Messages: rank 0's (node 0) once each; none from node 1.
    lines = printed(node0)
    assert printed(node1) == [], printed(node1)
    assert len(lines) == len(set(lines)) and any(line.startswith("trained 3 steps") for line in lines), lines
    assert sum(line.startswith("checkpoint:") for line in lines) == 2


def test_the_two_nodes_read_disjoint_shares_of_one_epoch(fsdp_two_nodes, workdir):
    """Data-parallel rank r of 2 reads records order[r::2] of the epoch: by global rank, not by the local rank
    (0 on both nodes)."""
    _, _, log = fsdp_two_nodes
    images = workdir / "data" / "images-train"
    read = {rank: {Path(entry[1]).name for entry in entries if entry[0] == "read"
                   and Path(entry[1]).parent == images} for rank, entries in log.items()}
    order = ConversationDataset.for_checkpoint(DataConfig(workdir / "data" / "train.jsonl"), workdir / "base").order(0)
    records = [json.loads(line) for line in (workdir / "data" / "train.jsonl").read_text().splitlines()]

    def pictures(indices):
        return {Path(part["image"]).name for i in indices for part in records[i]["messages"][0]["content"]
                if part["type"] == "image"}

    assert len(pictures(range(RECORDS))) == RECORDS  # one picture each: the pictures name the records
    assert read[0] == pictures(order[0::2]) and read[1] == pictures(order[1::2])
    assert not read[0] & read[1] and read[0] | read[1] == pictures(order)


# ---------------------------------------------------------------------------------------------- 2. OUT not shared
def test_an_out_that_is_not_shared_fails_at_start_on_every_node(workdir):
    """Without the check, this run trains to the end and exits 0, node 0's checkpoints marked complete without
    rank 1's shards (which land in node 1's own directory)."""
    outs = (workdir / "local-node0", workdir / "local-node1")
    agents, _ = start_two_nodes(workdir, "local", outs, *inputs(workdir, evaluate=False), *SETTINGS,
                                "parallel.dp_shard=2")
    results = finish(agents)
    for node, ((code, stderr), out) in enumerate(zip(results, outs)):
        assert code != 0
        # each node's one rank says what it found; a rank other than 0 with its number
        prefix = "error:" if node == 0 else f"error (rank {node}):"
        errors = [line for line in stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and errors[0].startswith(prefix), stderr[-4000:]
        assert f"--out {out} is not one directory shared by every node" in errors[0]
        assert f"rank 1 ({outs[1]} on " in errors[0] and "filesystem all nodes mount at the same path" in errors[0]
        assert not any(line.startswith("model:") for line in stderr.splitlines())  # before anything loads
        assert list(out.iterdir()) == []  # nothing written, rank 0's probe removed


# ---------------------------------------------------------------------------------------------- 3. resume, SIGTERM
def test_resume_on_two_nodes_under_tp_and_sigterm_on_node_1_stops_both(fsdp_two_nodes, reference, workdir):
    """(1)'s step-2 checkpoint continues on 2 nodes with TP2 across them (c10d rendezvous, as users launch):
    step 3 is one process's step 3. Then SIGTERM to rank 1 alone: both nodes stop after the same step, with one
    checkpoint holding both ranks' shards."""
    source, _, _ = fsdp_two_nodes
    out = workdir / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "step-00000002", out / "checkpoints" / "step-00000002")
    agents, _ = start_two_nodes(workdir, "resumed", (out, out), "--resume", *inputs(workdir, evaluate=False),
                                *SETTINGS, "train.steps=400", "checkpoint.every=0", "parallel.tp=2",
                                rendezvous="c10d")
    try:
        deadline = time.time() + TIMEOUT_S
        while '"step": 3' not in ((out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").is_file() else ""):
            assert all(agent.poll() is None for agent in agents) and time.time() < deadline, "no step 3 logged"
            time.sleep(0.05)
        worker = next(pid for agent in agents if (pid := _worker_pid(agent.pid, 1)) is not None)
        os.kill(worker, signal.SIGTERM)
    finally:
        results = finish(agents)
    assert all(code != 0 for code, _ in results)  # the workers exit with 143 (128 + SIGTERM)
    # Each agent reports its worker's 143 in its summary, but with the c10d rendezvous the store lives in one agent:
    # when that agent exits first, the other's summary may end in a store error instead (torchrun's race, seen once
    # under load). Both ranks' shards in the last checkpoint (below) say that rank 1 stopped cleanly too.
    reported = ["exitcode  : 143" in stderr for _, stderr in results]
    assert any(reported), "\n\n".join(f"node {node}:\n{stderr[-3000:]}" for node, (_, stderr) in enumerate(results))
    assert not any("exitcode  : -15" in stderr or "Signal 15" in stderr for _, stderr in results)
    assert losses(out)[3] == pytest.approx(losses(reference)[3], rel=1e-5)
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(saved) == 2 and saved[0] == "step-00000002", saved
    step = int(saved[1].split("-")[1])
    assert 3 <= step < 400 and max(losses(out)) == step
    assert {"COMPLETE", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (out / "checkpoints" / saved[1]).iterdir()}
    lines = [line for _, stderr in results for line in printed(stderr)]
    stops = [line for line in lines if line.startswith("stopped:")]
    assert stops == [f"stopped: stopped at step {step} of 400 (a stop signal on another rank); the checkpoint "
                     f"{out / 'checkpoints' / saved[1]} holds it: run the same command with --resume to continue"]
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "parallel.tp=2 puts tensor-parallel groups across nodes (ranks [0, 1]" in warnings[0]
    assert not (out / "hf").exists()  # stopped: no export


# ---------------------------------------------------------------------------------------------- in-process checks
def _two_ranks(rank: int, root: str) -> None:
    """Rank ``rank`` of 2 (forked, gloo): which TP groups span nodes, and which checkpoint a resume takes."""
    from gemma3vl.parallel import ParallelContext, ParallelDims
    from gemma3vl.train.checkpoint import agreed_checkpoint

    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
    try:
        import torch

        context = ParallelContext.create(ParallelDims(1, 1, 2, 1, 1, 2), torch.device("cpu"), sequence_parallel=False)
        os.environ["GROUP_RANK"] = "0"  # one node
        assert context.tp_groups_across_nodes() == []
        os.environ["GROUP_RANK"] = str(rank)  # a node each
        assert context.tp_groups_across_nodes() == [[0, 1]]
        # A node whose listing of checkpoints/ lags (step 2 where rank 0 sees step 3) resumes from rank 0's choice,
        # by its name: rank 1 mounts the shared directory elsewhere (a symbolic link here).
        checkpoints = Path(root) / ("checkpoints" if rank == 0 else "mount/checkpoints")
        newest = checkpoints / ("step-00000003" if rank == 0 else "step-00000002")
        assert agreed_checkpoint(checkpoints, newest) == checkpoints / "step-00000003"
        assert agreed_checkpoint(checkpoints, None if rank == 0 else newest) is None
        # A checkpoint one rank cannot see complete: every rank stops, naming it.
        local = Path(root) / f"node{rank}" / "checkpoints"
        try:
            agreed_checkpoint(local, local / "step-00000003")
        except Gemma3VLError as exc:
            assert "rank(s) 1 do not see it complete" in str(exc) and "shared by every node" in str(exc)
        else:
            raise AssertionError("no error")
    finally:
        dist.destroy_process_group()


def test_tp_groups_across_nodes_and_the_checkpoint_a_resume_takes(tmp_path):
    for step in (2, 3):
        for where in (tmp_path, tmp_path / "node0"):
            (where / "checkpoints" / f"step-0000000{step}").mkdir(parents=True)
            (where / "checkpoints" / f"step-0000000{step}" / "COMPLETE").write_text("")
    (tmp_path / "node1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "mount").mkdir()
    (tmp_path / "mount" / "checkpoints").symlink_to(tmp_path / "checkpoints")
    launch_ranks.spawn(_two_ranks, args=(str(tmp_path),), nprocs=2)


def test_the_planned_launch_line_for_several_nodes_has_a_rendezvous(capsys):
    """``torchrun --nnodes 2`` without a rendezvous endpoint waits for the other node on its own localhost."""
    assert main(["plan", "--model", "27b", "--gpus", "16", "--gpu-memory", "80"]) == 0
    shown = capsys.readouterr().out
    assert ("torchrun --nproc-per-node 8 --nnodes 2 --rdzv-backend c10d --rdzv-endpoint FIRST_NODE:29500 "
            "--rdzv-id JOB -m gemma3vl train") in shown
    assert "--out on a filesystem every node mounts at the same path" in shown
    assert main(["plan", "--model", "4b", "--gpus", "8", "--gpu-memory", "80"]) == 0
    assert "--rdzv" not in capsys.readouterr().out  # one node: nothing to meet
