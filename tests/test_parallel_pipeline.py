"""Pipeline parallelism under torchrun (CPU, gloo): PP2 with the 1F1B and the interleaved schedule, PP2 x TP2 and
PP2 x FSDP2, each compute what one process computes; so does LoRA under PP2, whose PEFT adapter is the
single-process one; a PP2 checkpoint continues in one process and a single-process one under PP2; the export
from the stages is the single-process export bit for bit; each rank of PP2 x TP2 reads from the checkpoint only
its own stage's shards (sharded loading); a layout the pipeline cannot take is refused saying what to change
(``ParallelDims.validate``, which ``gemma3vl train`` runs before loading anything).

Every run is the command ``torchrun --nproc-per-node N -m gemma3vl train ...`` (ranks forked from a preloaded
server, launch_ranks.py) on the tiny model (4 decoder
blocks: 2 per stage, or 1 per stage with 2 stages per rank interleaved) for 3 optimizer steps of 4 micro-batches,
against one single-process run. The settings and helpers are ``test_parallel_layouts``'s (``data.packing=false``
and ``optim.eps=1`` are explained there); its data has conversations without images, so some micro-batches never
run the vision tower on stage 0.
"""

import pytest
import torch

from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError
from gemma3vl.parallel.dims import ParallelDims
from gemma3vl.parallel.pipeline import bubble_fraction, split_layers
from gemma3vl.tiny import write_tiny_checkpoint
from gemma3vl.bridge import read_config
from gemma3vl.cli import main

import launch_ranks
from pipeline_workers import load_stages  # (a light module: each rank imports it)
from test_sharded_load import assert_gathered_state_is_the_checkpoint

from test_parallel_layouts import (  # noqa: F401 (fixtures)
    COMMON,
    assert_answers_match,
    assert_losses_match,
    assert_single_process_export_is_the_same,
    assert_weights_match,
    checked,
    continue_from,
    data,
    exported,
    inputs,
    losses,
    reference,
    torchrun,
    workdir,
)

PIPELINE_LAYOUTS = {
    "pp2_1f1b": (2, ["parallel.pp=2", "parallel.dp_shard=1"]),
    "pp2_interleaved": (2, ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=interleaved"]),
    "pp2_tp2": (4, ["parallel.pp=2", "parallel.dp_shard=1", "parallel.tp=2"]),  # with sequence parallelism
    "pp2_fsdp2": (4, ["parallel.pp=2", "parallel.dp_shard=2"]),  # 2 micro-batches per data-parallel rank
}

_RUNS: dict = {}


def pipeline_run(name: str, workdir):
    """The 3-step run in layout ``name``, once per session. The 1F1B run also evaluates (the held-out loss
    goes through the stages without a schedule)."""
    if name not in _RUNS:
        nproc, settings = PIPELINE_LAYOUTS[name]
        out = workdir / name
        result = checked(torchrun(nproc, out, *inputs(workdir, evaluate=name == "pp2_1f1b"), *COMMON, *settings))
        assert "sharded loading: this rank read" in result.stderr  # the stages were built on meta and read shards
        _RUNS[name] = out
    return _RUNS[name]


@pytest.mark.parametrize("name", list(PIPELINE_LAYOUTS))
def test_pipeline_computes_what_one_process_computes(name, reference, workdir):
    out = pipeline_run(name, workdir)
    assert_losses_match(losses(out), losses(reference))
    assert_losses_match(losses(out, "grad_norm"), losses(reference, "grad_norm"))  # the tied matrix counted once
    assert_weights_match(exported(out), exported(reference))  # the tied embedding: both copies trained as one
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    if name == "pp2_1f1b":
        assert_losses_match(losses(out, "eval_loss"), losses(reference, "eval_loss"))
        assert_answers_match(out, reference)  # the stages' tensors gathered on rank 0, which answers


def test_pp2_checkpoint_continues_in_one_process(reference, workdir):
    """The checkpoint holds one copy of the tied embedding (two stages had it) and the optimizer state of
    every stage, under the plain model's names."""
    sharded = pipeline_run("pp2_1f1b", workdir)
    out = continue_from(sharded / "checkpoints" / "step-00000002", workdir / "pp2_to_single")
    assert main(["train", "--recipe", "tiny_sft", "--out", str(out), "--resume", *inputs(workdir), *COMMON]) == 0
    assert sorted(losses(out)) == [3]
    assert losses(out)[3] == pytest.approx(losses(sharded)[3], rel=1e-5)
    assert_weights_match(exported(out), exported(sharded))


def test_single_process_checkpoint_continues_under_interleaved_pp2(reference, workdir):
    """Both copies of the tied embedding load the one saved matrix (else step 3 would differ)."""
    out = continue_from(reference / "checkpoints" / "step-00000002", workdir / "single_to_pp2")
    checked(torchrun(2, out, "--resume", *inputs(workdir), *COMMON, *PIPELINE_LAYOUTS["pp2_interleaved"][1]))
    assert sorted(losses(out)) == [3]
    assert losses(out)[3] == pytest.approx(losses(reference)[3], rel=1e-5)
    assert_weights_match(exported(out), exported(reference))


def test_export_from_pipeline_stages_is_the_single_process_export_bit_for_bit(reference, workdir):
    sharded = pipeline_run("pp2_tp2", workdir)
    assert_single_process_export_is_the_same(sharded, workdir / "pp2_tp2_export", workdir)


def test_lora_under_pp2_computes_what_one_process_computes(data, workdir, capsys):
    """The adapters train in the stage that holds their block (the tied embedding is frozen: no copy to sync);
    the PEFT adapter and the merged model are gathered from both stages. The log's parameter counts are the whole
    model's, as one process prints them (not rank 0's stage alone)."""
    single, pipelined = workdir / "lora_single", workdir / "lora_pp2"
    assert main(["train", "--recipe", "tiny_peft", "--out", str(single), *inputs(workdir), *COMMON]) == 0
    result = checked(torchrun(2, pipelined, *inputs(workdir), *COMMON, *PIPELINE_LAYOUTS["pp2_1f1b"][1],
                              recipe="tiny_peft"))
    assert "sharded loading: this rank read" in result.stderr  # the adapters too: made as one process makes them

    def counts(stderr):
        (line,) = [line for line in stderr.splitlines() if line.startswith("model: ")]
        return line[line.index("trainable: "):]

    assert counts(result.stderr) == counts(capsys.readouterr().err)
    assert_losses_match(losses(pipelined), losses(single))
    assert_losses_match(losses(pipelined, "grad_norm"), losses(single, "grad_norm"))
    adapter = exported(single, "adapter")
    assert any("layers.3." in key for key in adapter) and any("layers.0." in key for key in adapter)  # both stages
    assert_weights_match(exported(pipelined, "adapter"), adapter)
    assert_weights_match(exported(pipelined), exported(single))


def test_a_dora_export_skeleton_builds_on_meta_and_takes_the_gathered_tensors(tiny_config):
    """The export from stages (or any torchrun layout) puts the gathered state into a DoRA model built on meta:
    its magnitudes have no base rows to start from there, and must come from the state."""
    from gemma3vl.model import Gemma3Model
    from gemma3vl.parallel.export import plain_model
    from gemma3vl.train.lora import LoraConfig, apply_lora

    config = LoraConfig(rank=2, alpha=4, use_dora=True)
    base = Gemma3Model(tiny_config)
    with torch.no_grad():
        for param in base.parameters():
            param.normal_()  # (the constructor leaves fused weights to the loader)
    trained = apply_lora(base, config)
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))  # as if trained: magnitudes and B no longer their start
    state = {name: tensor.clone() for name, tensor in trained.state_dict().items()}
    rebuilt = plain_model(lambda: apply_lora(Gemma3Model(tiny_config), config), state)
    assert set(rebuilt.state_dict()) == set(state)
    for name, tensor in rebuilt.state_dict().items():
        assert torch.equal(tensor, state[name]), name


# ---------------------------------------------------------------------------------------------- sharded loading
def test_each_pipeline_rank_reads_only_its_own_stage_shards(tmp_path):
    """PP2 x TP2 built on meta: every rank reads exactly the bytes of its stage's local shards (the last stage's
    copy of the tied embedding included: the same checkpoint tensor), never the other stage's blocks; the
    stages gathered are the checkpoint bit for bit."""
    model_dir = tmp_path / "base"
    write_tiny_checkpoint(model_dir)
    launch_ranks.spawn(load_stages, args=(4, str(tmp_path / "init"), str(model_dir), str(tmp_path)), nprocs=4)
    total = assert_gathered_state_is_the_checkpoint(model_dir, tmp_path / "state.pt")
    for rank in range(4):
        read, own, held = torch.load(tmp_path / f"read{rank}.pt", weights_only=True)
        assert read == own, f"rank {rank} read {read} bytes of the checkpoint for {own} bytes of shards"
        blocks = {name.split(".")[2] for name in held if name.startswith("text.layers.")}
        assert blocks == ({"0", "1"} if rank < 2 else {"2", "3"}), (rank, blocks)  # pp is the outer dimension
        assert "text.embed.weight" in held  # the first stage's embedding, the last stage's output matrix
        assert 0 < read < 0.5 * total, f"rank {rank} read {read} of {total} bytes"


# ---------------------------------------------------------------------------------------------- the cut and the checks
def test_blocks_are_cut_into_even_consecutive_runs_the_middle_stages_taking_the_extra():
    assert split_layers(4, 2) == [[0, 1], [2, 3]]
    assert split_layers(4, 4) == [[0], [1], [2], [3]]
    assert split_layers(34, 4) == [list(range(0, 8)), list(range(8, 17)), list(range(17, 26)), list(range(26, 34))]
    assert split_layers(7, 3) == [[0, 1], [2, 3, 4], [5, 6]]
    for layers, stages in ((34, 4), (62, 8), (48, 6), (5, 5)):
        runs = split_layers(layers, stages)
        assert sum(runs, []) == list(range(layers)) and max(map(len, runs)) - min(map(len, runs)) <= 1
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11) and bubble_fraction(4, 8, per_rank=2) == pytest.approx(3 / 19)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Gemma3Config:
    path = tmp_path_factory.mktemp("pp_config")
    write_tiny_checkpoint(path)
    return read_config(path)  # 4 decoder blocks


@pytest.mark.parametrize("degrees, settings, expected", [
    ({"pp": 8}, {}, ["parallel.pp=8", "4 decoder blocks", "parallel.pp of at most 4"]),
    ({"pp": 2}, {"pp_schedule": "interleaved", "pp_stages_per_rank": 4},
     ["8 stages", "4 decoder blocks", "parallel.pp_stages_per_rank to at most 2"]),
    ({"pp": 2}, {"pp_schedule": "interleaved", "pp_stages_per_rank": 1}, ["at least 2 stages per rank"]),
    ({"pp": 2}, {"pp_schedule": "zero_bubble"}, ["parallel.pp_schedule='zero_bubble'", "1f1b, interleaved"]),
    ({"pp": 4}, {"pp_microbatches": 3}, ["at least 4 micro-batches", "raise train.global_batch_size"]),
    ({"pp": 2}, {"pp_schedule": "interleaved", "pp_microbatches": 3}, ["a multiple of parallel.pp=2", "1f1b"]),
])
def test_a_layout_the_pipeline_cannot_take_is_refused_saying_what_to_change(tiny_config, degrees, settings, expected):
    world = 1
    for value in degrees.values():
        world *= value
    dims = ParallelDims.resolve({"dp_replicate": 1, "dp_shard": 1, "tp": 1, "pp": 1, "cp": 1, **degrees}, world)
    with pytest.raises(Gemma3VLError) as error:
        dims.validate(tiny_config, **settings)
    for text in expected:
        assert text in str(error.value)


def test_pipeline_layouts_that_can_run_pass_the_checks(tiny_config):
    for pp, settings in ((2, {"pp_microbatches": 2}), (4, {"pp_microbatches": 4}), (2, {"peft": True}),
                         (2, {"pp_schedule": "interleaved", "pp_stages_per_rank": 2, "pp_microbatches": 4})):
        dims = ParallelDims.resolve({"dp_replicate": 1, "dp_shard": 1, "tp": 1, "pp": pp, "cp": 1}, pp)
        dims.validate(tiny_config, **settings)



def test_pipeline_refuses_training_only_the_image_parts_saying_what_to_change(workdir, data):
    """``train.freeze_language`` leaves every stage but the first with nothing to train: refused on every rank
    before loading, naming the settings (not one rank's "every parameter is frozen" and a peer's gloo crash)."""
    out = workdir / "pp2_freeze_language"
    result = torchrun(2, out, *inputs(workdir), *COMMON, "train.freeze_language=true", "parallel.pp=2")
    assert result.returncode != 0
    assert result.stderr.count("train.freeze_language=true with parallel.pp=2") == 1  # rank 0 says it for all
    assert "set parallel.pp=1" in result.stderr and "every parameter is frozen" not in result.stderr
    assert not (out / "checkpoints").exists()
