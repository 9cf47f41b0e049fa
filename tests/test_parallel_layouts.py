"""Parallel layouts under torchrun (CPU, gloo): each computes what one process computes, checkpoints load in any
other layout and continue, and exports from sharded models are the single-process export bit for bit.

Every run is the command ``torchrun --nproc-per-node N -m gemma3vl train ...`` on the tiny model for 3 optimizer
steps, against one single-process reference run: the real ``torchrun`` for the FSDP2 layout, the SIGTERM and the
world-size tests; for the others the same job with its ranks forked from a server that has imported torch once
(launch_ranks.py: what torchrun's workers get, without its 10-17 s of start-up on 2 cores).

Two settings make exact comparison possible, both explained where they are set: one sample per row
(``data.packing=false``) and ``optim.eps=1``.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gemma3vl.cli import main
from gemma3vl.data.dataset import ConversationDataset
from gemma3vl.data.settings import DataConfig
from gemma3vl.shapes import write_shapes_dataset
from gemma3vl.tiny import write_tiny_checkpoint
from gemma3vl.train.metrics import read_metrics

from launch_ranks import run_job

COMMON = [
    "train.steps=3", "checkpoint.every=2", "checkpoint.keep_last=5", "train.seq_length=128",
    "train.global_batch_size=4", "train.micro_batch_size=1", "data.eval_accuracy_samples=3",
    "logging.progress=false", "logging.tensorboard=false", "optim.lr=0.05",
    # With packing, each data-parallel rank packs its own share, so which conversations share a step depends on
    # the layout; with one conversation per row every layout's step holds the same conversations as one process.
    "data.packing=false",
    # Adam divides by sqrt(v): for a weight whose gradient is ~0, float rounding decides the sign of a whole
    # lr-sized step. eps=1 keeps the update proportional to the gradient, so weights compare at 1e-5.
    "optim.eps=1.0",
]
LAYOUTS = {
    "fsdp2": (2, ["parallel.dp_shard=2"]),
    "tp2": (2, ["parallel.tp=2", "parallel.sequence_parallel=false"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "tp2_fsdp2": (4, ["parallel.tp=2", "parallel.dp_shard=2"]),
    # torch's fused AdamW on the shards, with the clipping and the non-finite skip inside its kernel
    "fsdp2_fused": (2, ["parallel.dp_shard=2", "optim.fused=true"]),
    "tp2_fused": (2, ["parallel.tp=2", "parallel.sequence_parallel=false", "optim.fused=true"]),
}
TIMEOUT_S = 240
RTOL = 1e-5


# ---------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def data(workdir):
    """The tiny model, and conversations of which every third has no image: so in some steps one
    data-parallel rank runs the vision tower and another does not (FSDP must not wait for the other)."""
    write_tiny_checkpoint(workdir / "base")
    directory = workdir / "data"
    write_shapes_dataset(directory, 48, seed=0, name="train")
    write_shapes_dataset(directory, 8, seed=0, name="eval")
    lines = (directory / "train.jsonl").read_text().splitlines()
    for index in range(0, len(lines), 3):
        record = json.loads(lines[index])
        question = record["messages"][0]
        question["content"] = [part for part in question["content"] if part["type"] != "image"]
        lines[index] = json.dumps(record)
    (directory / "train.jsonl").write_text("\n".join(lines) + "\n")
    # Micro-batch j of data-parallel rank r (of 2) is record order[2j + r]: make sure such a pair is mixed.
    order = ConversationDataset.for_checkpoint(DataConfig(directory / "train.jsonl"), workdir / "base").order(0)
    assert any((order[2 * j] % 3 == 0) != (order[2 * j + 1] % 3 == 0) for j in range(6))
    return workdir


def inputs(data: Path, *, evaluate: bool = False) -> list[str]:
    args = ["--model", str(data / "base"), "--data", str(data / "data" / "train.jsonl")]
    if evaluate:
        args += ["--eval-data", str(data / "data" / "eval.jsonl")]
    return args


@pytest.fixture(scope="module")
def reference(data):
    """The single-process run every layout is compared with."""
    out = data / "single"
    assert main(["train", "--recipe", "tiny_sft", "--out", str(out), *inputs(data, evaluate=True), *COMMON]) == 0
    return out


def torchrun(nproc: int, out: Path, *args: str, recipe: str = "tiny_sft", real: bool = False
             ) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node NPROC -m gemma3vl train ...``: the real command when ``real``, else
    the same job with its ranks forked from a preloaded server (launch_ranks.py: no start-up imports)."""
    argv = ["train", "--recipe", recipe, "--out", str(out), *args]
    if not real:
        return run_job(nproc, argv, timeout=TIMEOUT_S)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "gemma3vl", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"torchrun failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result


_RUNS: dict[str, Path] = {}


def layout_run(name: str, reference: Path, workdir: Path) -> Path:
    """The 3-step run in layout ``name`` (run once per session, shared by the tests that need it)."""
    if name not in _RUNS:
        nproc, settings = LAYOUTS[name]
        out = workdir / name
        checked(torchrun(nproc, out, *inputs(workdir, evaluate=name == "tp2_sp"), *COMMON, *settings,
                         real=name == "fsdp2"))
        _RUNS[name] = out
    return _RUNS[name]


# ---------------------------------------------------------------------------------------------- comparisons
def losses(out: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(out / "metrics.jsonl") if r.get(key) is not None}


def exported(out: Path, folder: str = "hf") -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted((out / folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_losses_match(got: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=RTOL), f"step {step}"


def assert_answers_match(out: Path, reference: Path) -> None:
    """The held-out questions answered at each evaluation (under torchrun by rank 0's gathered copy) are one
    process's answers, word for word."""
    def answers(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "eval_answers.jsonl").read_text().splitlines()]

    expected = answers(reference)
    assert len(expected) == 3 * 2 and {row["step"] for row in expected} == {0, 3}  # 3 questions, at start and end
    assert answers(out) == expected
    assert losses(out, "eval_accuracy") == losses(reference, "eval_accuracy")


def assert_weights_match(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        difference = (got[name] - tensor).abs().max()
        assert difference <= RTOL * tensor.abs().max(), f"{name}: max difference {difference:.3e}"


def test_reference_run_trains(reference):
    """The weight comparisons below are not vacuous: every matrix of the decoder moved 100 times the tolerance."""
    base = {}
    for path in (reference.parent / "base").glob("*.safetensors"):
        base.update(load_file(path))
    trained = exported(reference)
    assert sorted(trained) == sorted(base)
    matrices = [name for name in base if "language_model" in name and base[name].ndim == 2]
    assert len(matrices) > 20
    for name in matrices:
        assert (trained[name] - base[name]).abs().max() > 100 * RTOL * base[name].abs().max(), name
    assert sorted(losses(reference)) == [1, 2, 3]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_computes_what_one_process_computes(name, reference, workdir):
    out = layout_run(name, reference, workdir)
    assert_losses_match(losses(out), losses(reference))
    assert_losses_match(losses(out, "grad_norm"), losses(reference, "grad_norm"))
    assert_weights_match(exported(out), exported(reference))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    if name == "tp2_sp":  # evaluated on the held-out set, like the reference (sequences padded for SP)
        assert_losses_match(losses(out, "eval_loss"), losses(reference, "eval_loss"))
        assert_answers_match(out, reference)
    assert (out / "train_config.json").is_file() and (out / "data_summary.json").is_file()


def test_lora_under_fsdp2_computes_what_one_process_computes(reference, workdir):
    single, sharded = workdir / "lora_single", workdir / "lora_fsdp2"
    assert main(["train", "--recipe", "tiny_peft", "--out", str(single), *inputs(workdir), *COMMON]) == 0
    checked(torchrun(2, sharded, *inputs(workdir), *COMMON, "parallel.dp_shard=2", recipe="tiny_peft"))
    assert_losses_match(losses(sharded), losses(single))
    assert_weights_match(exported(sharded, "adapter"), exported(single, "adapter"))  # the PEFT adapter
    assert_weights_match(exported(sharded), exported(single))  # and the merged model


# ---------------------------------------------------------------------------------------------- resharding
def continue_from(checkpoint: Path, out: Path) -> Path:
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, out / "checkpoints" / checkpoint.name)
    return out


def test_tp2_fsdp2_checkpoint_continues_in_one_process(reference, workdir):
    sharded = layout_run("tp2_fsdp2", reference, workdir)
    out = continue_from(sharded / "checkpoints" / "step-00000002", workdir / "tp2_fsdp2_to_single")
    assert main(["train", "--recipe", "tiny_sft", "--out", str(out), "--resume", *inputs(workdir), *COMMON]) == 0
    assert sorted(losses(out)) == [3]
    assert losses(out)[3] == pytest.approx(losses(sharded)[3], rel=RTOL)  # as if the 4 ranks had gone on
    assert losses(out)[3] == pytest.approx(losses(reference)[3], rel=RTOL)
    assert_weights_match(exported(out), exported(sharded))


def test_fsdp2_checkpoint_continues_under_tp2_with_sequence_parallel(reference, workdir):
    sharded = layout_run("fsdp2", reference, workdir)
    out = continue_from(sharded / "checkpoints" / "step-00000002", workdir / "fsdp2_to_tp2_sp")
    checked(torchrun(2, out, "--resume", *inputs(workdir), *COMMON, "parallel.tp=2"))
    assert sorted(losses(out)) == [3]
    assert losses(out)[3] == pytest.approx(losses(sharded)[3], rel=RTOL)
    assert_weights_match(exported(out), exported(sharded))


def assert_single_process_export_is_the_same(sharded: Path, out: Path, workdir: Path) -> None:
    """Resume ``sharded``'s last checkpoint in one process (nothing left to train: it only exports) into ``out``;
    its ``hf/`` files must be those the sharded run exported, byte for byte."""
    out = continue_from(sharded / "checkpoints" / "step-00000003", out)
    assert main(["train", "--recipe", "tiny_sft", "--out", str(out), "--resume", *inputs(workdir), *COMMON]) == 0
    files = sorted(p.name for p in (sharded / "hf").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (out / "hf").glob("*.safetensors"))
    for name in files:
        assert (out / "hf" / name).read_bytes() == (sharded / "hf" / name).read_bytes(), name


def test_export_from_a_sharded_model_is_the_single_process_export_bit_for_bit(reference, workdir):
    """The same weights (the TP2 x FSDP2 run's last checkpoint), exported by 4 ranks and by one process."""
    sharded = layout_run("tp2_fsdp2", reference, workdir)
    assert_single_process_export_is_the_same(sharded, workdir / "tp2_fsdp2_export", workdir)


# ---------------------------------------------------------------------------------------------- refusals
def test_world_size_mismatch_fails_at_start_saying_what_to_change(reference, workdir):
    result = torchrun(2, workdir / "mismatch", *inputs(workdir), *COMMON, "parallel.dp_shard=4", real=True)
    assert result.returncode != 0
    assert "dp_shard=4" in result.stderr and "2 processes were launched" in result.stderr
    assert "set parallel.dp_shard=-1" in result.stderr and "--nproc-per-node 4" in result.stderr
    assert not (workdir / "mismatch" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- more combinations
def test_fsdp2_with_cpu_offload_computes_what_one_process_computes(reference, workdir):
    """``parallel.cpu_offload`` on gloo: FSDP's offload policy pins host memory only beside an accelerator
    (pinning without one fails while the shards are made)."""
    out = workdir / "fsdp2_cpu_offload"
    checked(torchrun(2, out, *inputs(workdir), *COMMON, "parallel.dp_shard=2", "parallel.cpu_offload=true"))
    assert_losses_match(losses(out), losses(reference))
    assert_losses_match(losses(out, "grad_norm"), losses(reference, "grad_norm"))
    assert_weights_match(exported(out), exported(reference))


def _has_image(line: str) -> bool:
    return any(part["type"] == "image" for part in json.loads(line)["messages"][0]["content"])


@pytest.fixture(scope="module")
def text_only_step(data):
    """12 conversations of which, at 2 rows a step, step 2's have no image and steps 1 and 3 have some."""
    lines = (data / "data" / "train.jsonl").read_text().splitlines()[:12]
    path = data / "data" / "text_only_step.jsonl"
    path.write_text("\n".join(lines) + "\n")
    order = ConversationDataset.for_checkpoint(DataConfig(path), data / "base").order(0)
    for index in order[2:4]:
        record = json.loads(lines[index])
        question = record["messages"][0]
        question["content"] = [part for part in question["content"] if part["type"] != "image"]
        lines[index] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    assert any(map(_has_image, (lines[i] for i in order[0:2]))) and any(map(_has_image, (lines[i] for i in order[4:6])))
    return path


def test_a_step_without_images_leaves_the_vision_tower_as_one_process_does(text_only_step, workdir):
    """FSDP gives the vision tower and projector a zero gradient in a step without images (every rank must reduce
    the same tensors), on which AdamW would move them by their momentum; one process (as transformers) never ran
    the tower and leaves it: so must FSDP."""
    args = ["--model", str(workdir / "base"), "--data", str(text_only_step), *COMMON, "train.global_batch_size=2"]
    single, sharded = workdir / "text_step_single", workdir / "text_step_fsdp2"
    assert main(["train", "--recipe", "tiny_sft", "--out", str(single), *args]) == 0
    checked(torchrun(2, sharded, *args, "parallel.dp_shard=2"))
    assert_losses_match(losses(sharded), losses(single))
    assert_losses_match(losses(sharded, "grad_norm"), losses(single, "grad_norm"))
    assert_weights_match(exported(sharded), exported(single))


def test_image_parts_alone_train_under_tp2_as_in_one_process(workdir, data):
    """``train.freeze_language``: a micro-batch without images has nothing trainable in its loss (no backward to
    run), in one process and under TP (no FSDP to add the vision tower's zero term)."""
    args = [*inputs(workdir), *COMMON, "train.freeze_language=true", "train.global_batch_size=2"]
    single, sharded = workdir / "freeze_language_single", workdir / "freeze_language_tp2"
    assert main(["train", "--recipe", "tiny_sft", "--out", str(single), *args]) == 0
    checked(torchrun(2, sharded, *args, "parallel.tp=2"))
    assert_losses_match(losses(sharded), losses(single))
    assert_weights_match(exported(sharded), exported(single))


def _worker_pid(agent: int, rank: int) -> int | None:
    """The pid of torchrun worker ``rank`` (a child of the agent whose environment says RANK=rank), Linux /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == agent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_with_one_checkpoint(data, workdir):
    """SIGTERM reaching only rank 1 of an FSDP run: both ranks stop after the same step (the stop flag is reduced
    over the job each step) and save one complete checkpoint of it together."""
    import signal
    import time

    out = workdir / "sigterm"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "gemma3vl",
               "train", "--recipe", "tiny_sft", "--out", str(out), *inputs(data), *COMMON, "train.steps=400",
               "checkpoint.every=0", "parallel.dp_shard=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    agent = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + TIMEOUT_S
        while not (out / "metrics.jsonl").is_file() or '"step": 1' not in (out / "metrics.jsonl").read_text():
            assert agent.poll() is None and time.time() < deadline, "the run never logged its first step"
            time.sleep(0.05)
        worker = _worker_pid(agent.pid, 1)
        assert worker is not None
        os.kill(worker, signal.SIGTERM)
        _, stderr = agent.communicate(timeout=TIMEOUT_S)
    finally:
        if agent.poll() is None:
            agent.kill()
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "COMPLETE").exists(), stderr[-3000:]
    step = int(checkpoints[0].name.split("-")[1])
    assert 1 <= step < 400
    assert f"stopped at step {step} of 400 (a stop signal on another rank)" in stderr, stderr[-3000:]
