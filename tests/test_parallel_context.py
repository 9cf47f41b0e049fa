"""Context parallelism (``parallel.cp``) on CPU with gloo: each rank computes a slice of every sequence, and the
losses, gradients and trained weights are one process's.

* two gloo processes (and four: context x tensor + sequence parallel) on one packed batch with images whose
  blocks straddle the slice boundaries, and sliding windows shorter than the rows: loss and every parameter
  gradient equal the single-process ones;
* the command ``torchrun --nproc-per-node 2 -m gemma3vl train ... parallel.cp=2`` (ranks forked from a preloaded
  server, launch_ranks.py) with packing on: the
  3 steps' losses and the trained weights equal one process's, and its checkpoint continues in one process;
* pipeline x context parallel (4 ranks: 2 stages, each split over 2 context-parallel ranks) trains 3 steps on such
  batches as one process does (losses, gradient norms, weights, the held-out loss);
* context x FSDP parallel (4 ranks) continues a single-process checkpoint as that process would have;
* layouts it cannot take are refused with what to change.

The reference is always our own single-process model, which ``test_parity.py`` checks against transformers.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from gemma3vl import bridge
from gemma3vl.cli import main
from gemma3vl.data.batch import IGNORE, Sample
from gemma3vl.data.collate import collate_packed
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.loading import load_model
from gemma3vl.parallel import ParallelDims
from gemma3vl.parallel.activation import apply_activation_checkpointing
from gemma3vl.parallel.context import apply_context_parallel, shard_batch, zigzag_indices
from gemma3vl.parallel.tensor import apply_tensor_parallel
from gemma3vl.shapes import write_shapes_dataset
from gemma3vl.tiny import write_tiny_checkpoint
from gemma3vl.train.metrics import read_metrics
import launch_ranks
from test_parallel_layouts import assert_losses_match, assert_weights_match, exported, losses

RTOL = 1e-5
IMAGE, BOI, EOI = 9, 7, 8  # the tiny tokenizer's <image_soft_token>, <start_of_image>, <end_of_image>


# ---------------------------------------------------------------------------------------------- the slice
@pytest.mark.parametrize("degree", [1, 2, 3, 4])
def test_zigzag_slices_cover_each_position_once_with_equal_causal_work(degree):
    length = 8 * degree
    slices = [zigzag_indices(length, degree, rank) for rank in range(degree)]
    assert torch.equal(torch.sort(torch.cat(slices)).values, torch.arange(length))
    work = [int((s + 1).sum()) for s in slices]  # keys a causal query at position p sees: p + 1
    assert len(set(work)) == 1, work


# ---------------------------------------------------------------------------------------------- two gloo ranks
def _sample(length: int, image_at: list[int], seed: int) -> Sample:
    """A conversation of ``length`` tokens with an image block (4 soft tokens, BOI/EOI around) starting at each
    ``image_at``; trained on its second half."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 512, (length,), generator=generator)
    for start in image_at:
        ids[start - 1], ids[start:start + 4], ids[start + 4] = BOI, IMAGE, EOI
    labels = torch.where(torch.arange(length) >= length // 2, ids, torch.full_like(ids, IGNORE))
    labels[ids == IMAGE] = IGNORE
    pixels = torch.randn(len(image_at), 3, 56, 56, generator=generator) if image_at else None
    return Sample(ids, labels, pixels, source=f"sample {seed}")


def packed_batch():
    """Two packed rows of 38 tokens (padded to 40 under cp=2: rank 0 holds [0, 10) and [30, 40), rank 1
    [10, 30)). Row 0's first image covers 8..11 and row 1's covers 27..30: both cross a slice boundary."""
    rows = [[_sample(20, [8], 0), _sample(15, [3], 1)], [_sample(33, [27], 2), _sample(5, [], 3)]]
    return collate_packed(rows, 38, 0, image_token_id=IMAGE)


def _context_parallel_rank(rank: int, world: int, tp: int, checkpointing: str, root: Path) -> None:
    """One rank of ``cp = world / tp`` context-parallel x ``tp`` tensor-parallel (with sequence parallelism)
    ranks: its slice's loss and gradients, summed over the ranks as FSDP would, saved by rank 0."""
    dist.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("cp", "tp"))
        model, _ = load_model(root / "base", device="cpu", dtype=torch.float32)
        if tp > 1:
            apply_tensor_parallel(model, mesh["tp"], sequence_parallel=True)
        apply_activation_checkpointing(model, checkpointing)  # full: the exchange runs again in backward
        apply_context_parallel(model)
        cp_mesh = mesh["cp"]
        batch = shard_batch(packed_batch(), cp_mesh.size(), cp_mesh.get_local_rank(), cp_mesh.get_group(),
                            sequence_shards=tp)
        summed, count = batch.loss(model)
        assert count == batch.num_target_tokens
        summed.backward()
        grads = {}
        for name, param in model.named_parameters():
            grad = param.grad
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            dist.all_reduce(local, group=cp_mesh.get_group())  # what FSDP sums over the context-parallel ranks
            plain_name = name.replace("_checkpoint_wrapped_module.", "")
            grads[plain_name] = grad.full_tensor() if isinstance(grad, DTensor) else grad
        totals = torch.tensor([float(summed), float(count), float(batch.num_tokens)], dtype=torch.float64)
        dist.all_reduce(totals, group=cp_mesh.get_group())
        if rank == 0:
            torch.save({"loss": totals[0].item(), "count": totals[1].item(), "tokens": totals[2].item(),
                        "grads": grads}, root / "context_parallel.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("context")
    write_tiny_checkpoint(root / "base")
    return root


@pytest.mark.parametrize("world, tp, checkpointing", [(2, 1, "none"), (2, 1, "full"), (4, 2, "none")],
                         ids=["cp2", "cp2_checkpointed", "cp2_tp2_sp"])
def test_context_parallel_ranks_compute_the_single_process_loss_and_gradients(tiny, world, tp, checkpointing):
    config = bridge.read_config(tiny / "base")
    assert config.text.sliding_window < 38 and config.mm_tokens_per_image == 4
    batch = packed_batch()
    assert int(batch.info.segment_ids.max()) == 2 and batch.pixel_values.shape[0] == 3
    model, _ = load_model(tiny / "base", device="cpu", dtype=torch.float32)
    summed, count = model.loss(batch.input_ids, batch.targets, batch.info, batch.pixel_values)
    summed.backward()

    (tiny / "store").unlink(missing_ok=True)
    # forked from the preloaded server: the ranks start in a second, without this process's threads or state
    launch_ranks.spawn(_context_parallel_rank, args=(world, tp, checkpointing, tiny), nprocs=world)
    got = torch.load(tiny / "context_parallel.pt")
    assert got["count"] == count and got["tokens"] == batch.num_tokens  # each target counted once
    assert got["loss"] == pytest.approx(summed.item(), rel=RTOL)
    for name, param in model.named_parameters():
        expected, grad = param.grad, got["grads"][name]
        assert grad is not None and expected.abs().max() > 0, name
        difference = (grad - expected).abs().max()
        assert difference <= RTOL * expected.abs().max(), f"{name}: max difference {difference:.3e}"


# ---------------------------------------------------------------------------------------------- with pipeline stages
PP_CP_SEQ = 40  # the rows' length: 4 chunks of 10 under cp=2 (rank 0: [0, 10) and [30, 40); rank 1: [10, 30))
PP_CP_STEPS = 3
PP_CP_SETTINGS = ["train.steps=3", f"train.seq_length={PP_CP_SEQ}", "train.global_batch_size=4",
                  "train.micro_batch_size=2", "optim.lr=0.05", "optim.eps=1.0", "parallel.pp=2", "parallel.cp=2",
                  "parallel.dp_shard=1"]


def _pp_cp_steps() -> list[list]:
    """3 steps of 2 micro-batches of 2 packed rows (38 tokens, padded to 40): the images of each first
    micro-batch straddle the slice boundaries at 10 and 30 (as ``packed_batch``'s), each second one has an image
    in one slice only (step 2: none at all, so stage 0 runs no vision tower for it on either rank)."""
    steps = []
    for step in range(PP_CP_STEPS):
        seed = 10 * step + 100
        first = [[_sample(20, [8], seed), _sample(15, [3], seed + 1)],
                 [_sample(33, [27], seed + 2), _sample(5, [], seed + 3)]]
        images = [] if step == 1 else [14]
        second = [[_sample(24, images, seed + 4), _sample(14, [], seed + 5)], [_sample(38, [], seed + 6)]]
        steps.append([collate_packed(rows, 38, 0, image_token_id=IMAGE) for rows in (first, second)])
    return steps


def _pp_cp_eval_batch():
    """A held-out batch shorter than train.seq_length (34 tokens: 36 under cp=2, cut 9 | 9 | 9 | 9), images
    across the boundaries at 9 and 27."""
    rows = [[_sample(20, [7], 7), _sample(14, [], 8)], [_sample(34, [25], 9)]]
    return collate_packed(rows, 34, 0, image_token_id=IMAGE)


class _Steps:
    """A trainer's step feed over fixed micro-batches."""

    def __init__(self, steps):
        self.steps, self.position = steps, 0

    def next_step(self):
        self.position += 1
        return self.steps[self.position - 1]

    def state_dict(self):
        return {"position": self.position}


def _train_and_evaluate(trainer, evaluate) -> dict:
    records = [trainer.train_step() for _ in range(PP_CP_STEPS)]
    return {"loss": [r["loss"] for r in records], "grad_norm": [r["grad_norm"] for r in records],
            "target_tokens": [r["target_tokens"] for r in records], "eval": evaluate()}


def _pipeline_context_parallel_rank(rank: int, world: int, root: Path, schedule: str, tp: int) -> None:
    """One rank of PP2 x CP2, wired as ``gemma3vl train`` wires it: the model on meta, this rank's stage
    parallelized (FSDP over the stage's two context-parallel ranks) and filled by sharded loading, the feed
    handing out this rank's slices, the trainer's step; then the held-out loss as the evaluator computes it
    (each rank's slices through the stages, summed over the context-parallel ranks) and as ``model.loss`` does."""
    from gemma3vl.model import Gemma3Model
    from gemma3vl.parallel import ParallelContext
    from gemma3vl.parallel.context import ContextParallelFeed
    from gemma3vl.parallel.export import gather_pipeline_state
    from gemma3vl.parallel.pipeline import build_pipeline
    from gemma3vl.parallel.sharded_load import load_sharded
    from gemma3vl.train.config import build_config
    from gemma3vl.train.trainer import Trainer, step_loss

    dist.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = build_config("tiny_sft", overrides=[*PP_CP_SETTINGS, f"parallel.pp_schedule={schedule}",
                                                  f"parallel.tp={tp}"])
        config = bridge.read_config(root / "base")
        dims = ParallelDims.resolve(cfg.parallel_degrees(), world)
        dims.validate(config, seq_length=PP_CP_SEQ, pp_microbatches=2)
        device = torch.device("cpu")
        context = ParallelContext.create(dims, device, sequence_parallel=tp > 1)
        with torch.device("meta"):
            whole = Gemma3Model(config)
        model = build_pipeline(whole, context, schedule=schedule, stages_per_rank_setting=2, micro_batches=2,
                               micro_batch_size=2, seq_length=PP_CP_SEQ,
                               load=lambda stage: load_sharded(root / "base", stage, part_of=whole))
        cp_mesh = context.cp_mesh
        cp_rank, cp_group = cp_mesh.get_local_rank(), cp_mesh.get_group()
        feed = ContextParallelFeed(_Steps(_pp_cp_steps()), 2, cp_rank, cp_group)
        trainer = Trainer(cfg, model, feed, root / "pp2_cp2", device, parallel=context)

        def evaluate():
            held_out = _pp_cp_eval_batch()
            summed, count = step_loss(model, shard_batch(held_out, 2, cp_rank, cp_group), device)
            sliced = context.sum_over_cp(float(summed), count)  # (Evaluator.loss with slice_batch, sum_slices)
            summed, count = model.loss(held_out.input_ids, held_out.targets, held_out.info, held_out.pixel_values)
            return [*sliced, float(summed), count]

        result = _train_and_evaluate(trainer, evaluate)
        state = gather_pipeline_state(model, context, skip=model.pipeline.duplicate_names)
        if rank == 0:
            torch.save({**result, "state": state}, root / "pp2_cp2.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("schedule,tp", [("1f1b", 1), ("interleaved", 1), ("1f1b", 2)],
                         ids=["pp2_cp2", "pp2_interleaved_cp2", "pp2_cp2_tp2_sp"])
def test_pipeline_x_context_parallel_training_is_one_process_training(tiny, schedule, tp):
    """PP2 x CP2 (4 ranks; with TP2 and sequence parallelism, 8): each stage's context-parallel ranks split every
    row, the stages pass each other the slices' hidden states (interleaved: two stages a rank); 3 steps' losses,
    gradient norms and weights, and the held-out loss after them, equal one process's (whose ``Trainer`` runs the
    same micro-batches)."""
    from gemma3vl.train.config import build_config
    from gemma3vl.train.trainer import Trainer

    config = bridge.read_config(tiny / "base")
    assert config.text.sliding_window < 38 and config.mm_tokens_per_image == 4 and config.text.num_hidden_layers == 4
    model, _ = load_model(tiny / "base", device="cpu", dtype=torch.float32)
    trainer = Trainer(build_config("tiny_sft", overrides=PP_CP_SETTINGS), model, _Steps(_pp_cp_steps()),
                      tiny / "single", torch.device("cpu"))

    def evaluate():
        held_out = _pp_cp_eval_batch()
        with torch.no_grad():
            summed, count = model.loss(held_out.input_ids, held_out.targets, held_out.info, held_out.pixel_values)
        return [float(summed), count]

    expected = _train_and_evaluate(trainer, evaluate)

    (tiny / "store").unlink(missing_ok=True)
    world = 4 * tp
    launch_ranks.spawn(_pipeline_context_parallel_rank, args=(world, tiny, schedule, tp), nprocs=world)
    got = torch.load(tiny / "pp2_cp2.pt")
    assert got["target_tokens"] == expected["target_tokens"]  # every target counted once
    for key in ("loss", "grad_norm"):
        assert got[key] == pytest.approx(expected[key], rel=RTOL), key
    sliced_loss, sliced_count, whole_loss, whole_count = got["eval"]
    assert sliced_count == whole_count == expected["eval"][1]
    assert sliced_loss == pytest.approx(expected["eval"][0], rel=RTOL)
    assert whole_loss == pytest.approx(expected["eval"][0], rel=RTOL)
    reference = model.state_dict()
    base, _ = load_model(tiny / "base", device="cpu", dtype=torch.float32)
    for name, tensor in base.state_dict().items():  # not vacuous: every decoder matrix moved 100 x the tolerance
        if name.startswith("text.layers.") and tensor.ndim > 1:
            assert (reference[name] - tensor).abs().max() > 100 * RTOL * tensor.abs().max(), name
    assert sorted(got["state"]) == sorted(reference)
    for name, tensor in reference.items():
        difference = (got["state"][name] - tensor).abs().max()
        assert difference <= RTOL * tensor.abs().max(), f"{name}: max difference {difference:.3e}"


# ---------------------------------------------------------------------------------------------- the real command
COMMON = [
    "train.steps=3", "checkpoint.every=2", "checkpoint.keep_last=5", "train.seq_length=128",
    "train.global_batch_size=4", "train.micro_batch_size=2", "data.eval_accuracy_samples=0",
    "logging.progress=false", "logging.tensorboard=false", "optim.lr=0.05",
    # Adam divides by sqrt(v): eps=1 keeps updates proportional to gradients (see test_parallel_layouts.py).
    "optim.eps=1.0",
]
PACKED = ["data.packing=true"]  # one data-parallel rank: its rows are packed exactly as one process packs them
# With data parallelism each rank packs its own share, so one conversation per row (test_parallel_layouts.py).
UNPACKED = ["data.packing=false"]
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def data(tiny):
    """Conversations of which only every third has an image. Some slices of a packed row then hold no image
    token while the other rank's slice does: both ranks must still reduce the vision tower's gradients under
    FSDP (without the zero gradient of ``unused_image_parameters_term`` this run crashes)."""
    directory = tiny / "data"
    write_shapes_dataset(directory, 48, seed=0, name="train")
    write_shapes_dataset(directory, 8, seed=0, name="eval")
    lines = (directory / "train.jsonl").read_text().splitlines()
    for index in range(len(lines)):
        if index % 3:
            record = json.loads(lines[index])
            question = record["messages"][0]
            question["content"] = [part for part in question["content"] if part["type"] != "image"]
            lines[index] = json.dumps(record)
    (directory / "train.jsonl").write_text("\n".join(lines) + "\n")
    return tiny


def inputs(root: Path, *, evaluate: bool = False) -> list[str]:
    args = ["--model", str(root / "base"), "--data", str(root / "data" / "train.jsonl")]
    return args + ["--eval-data", str(root / "data" / "eval.jsonl")] if evaluate else args


def torchrun(nproc: int, out: Path, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node NPROC -m gemma3vl train ...``, its ranks forked from a preloaded
    server (launch_ranks.py)."""
    result = launch_ranks.run_job(nproc, ["train", "--recipe", "tiny_sft", "--out", str(out), *args], timeout=TIMEOUT_S)
    assert result.returncode == 0, f"torchrun failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result


def single(out: Path, *args: str) -> Path:
    assert main(["train", "--recipe", "tiny_sft", "--out", str(out), *args]) == 0
    return out


def continue_from(checkpoint: Path, out: Path) -> Path:
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, out / "checkpoints" / checkpoint.name)
    return out


def test_context_parallel_training_with_packing_is_one_process_training(data):
    reference = single(data / "single_packed", *inputs(data, evaluate=True), *COMMON, *PACKED)
    assert sorted(losses(reference)) == [1, 2, 3]
    assert any(r["tokens"] > 128 for r in read_metrics(reference / "metrics.jsonl") if "tokens" in r)  # packed
    sliced = data / "cp2"
    result = torchrun(2, sliced, *inputs(data, evaluate=True), *COMMON, *PACKED, "parallel.cp=2",
                      "parallel.dp_shard=1")
    assert "cp=2" in result.stderr
    assert_losses_match(losses(sliced), losses(reference))
    assert_losses_match(losses(sliced, "grad_norm"), losses(reference, "grad_norm"))
    assert_losses_match(losses(sliced, "target_tokens"), losses(reference, "target_tokens"))
    assert_weights_match(exported(sliced), exported(reference))
    # Evaluation runs whole sequences on every rank (not sliced): the same held-out loss.
    assert sorted(losses(reference, "eval_loss")) == [0, 3]
    assert_losses_match(losses(sliced, "eval_loss"), losses(reference, "eval_loss"))

    # The context-parallel checkpoint continues in one process as the two ranks went on.
    out = continue_from(sliced / "checkpoints" / "step-00000002", data / "cp2_to_single")
    single(out, "--resume", *inputs(data), *COMMON, *PACKED)
    assert sorted(losses(out)) == [3]
    assert losses(out)[3] == pytest.approx(losses(sliced)[3], rel=RTOL)
    assert_weights_match(exported(out), exported(sliced))


def test_a_single_process_checkpoint_continues_under_context_x_fsdp_parallel(data):
    reference = single(data / "single_unpacked", *inputs(data), *COMMON, *UNPACKED)
    out = continue_from(reference / "checkpoints" / "step-00000002", data / "single_to_cp2_fsdp2")
    torchrun(4, out, "--resume", *inputs(data), *COMMON, *UNPACKED, "parallel.cp=2", "parallel.dp_shard=2")
    assert sorted(losses(out)) == [3]
    assert losses(out)[3] == pytest.approx(losses(reference)[3], rel=RTOL)
    assert losses(out, "grad_norm")[3] == pytest.approx(losses(reference, "grad_norm")[3], rel=RTOL)
    assert_weights_match(exported(out), exported(reference))


# ---------------------------------------------------------------------------------------------- refusals
def test_context_parallel_layouts_that_cannot_work_say_what_to_change(tiny):
    config = bridge.read_config(tiny / "base")
    degrees = {"dp_replicate": 1, "dp_shard": 1, "tp": 1, "pp": 1, "cp": 4}
    dims = ParallelDims.resolve(degrees, 4)
    with pytest.raises(Gemma3VLError, match=r"parallel.cp=4 cuts each row into 8 chunks, two per context-parallel "
                                            r"rank, but train.seq_length=6 .* raise train.seq_length to at least "
                                            r"8, or set parallel.cp to at most 3"):
        dims.validate(config, seq_length=6)
    dims.validate(config, seq_length=8)  # padded to whole chunks: any length from one token per chunk works
    dims = ParallelDims.resolve({**degrees, "cp": 2, "tp": 2}, 4)
    with pytest.raises(Gemma3VLError, match=r"of 2 tokens or more .* shorter than 8: .* parallel.cp to at most 1"):
        dims.validate(config, seq_length=6, sequence_parallel=True)
    dims.validate(config, seq_length=6, sequence_parallel=False)
    # Inside pipeline stages (each stage's context-parallel ranks split the rows): the same check, naming both.
    dims = ParallelDims.resolve({**degrees, "cp": 2, "pp": 2}, 4)
    dims.validate(config, seq_length=4, pp_microbatches=2)
    with pytest.raises(Gemma3VLError, match=r"parallel.cp=2 cuts each row into 4 chunks \(in each of the "
                                            r"parallel.pp=2 pipeline stages\), .* train.seq_length=3 .* at least 4"):
        dims.validate(config, seq_length=3, pp_microbatches=2)
    with pytest.raises(Gemma3VLError, match=r"parallel.pp=2 needs at least 2 micro-batches"):
        dims.validate(config, seq_length=4, pp_microbatches=1)


def test_context_parallel_without_the_ranks_fails_at_start(data, capsys):
    """One process asked for two context-parallel ranks: stopped before anything is loaded, saying why."""
    out = data / "refused"
    code = main(["train", "--recipe", "tiny_sft", "--out", str(out), *inputs(data), *COMMON, "parallel.cp=2"])
    assert code == 2
    assert "cp=2 needs a multiple of 2 ranks, but this is a single process" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()
