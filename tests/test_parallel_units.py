"""The parallel layer in one process: layout checks and their messages, data-parallel reading of the data
(and resuming it on another number of ranks), activation checkpointing and per-block compile."""

import pytest
import torch

from gemma3vl import bridge
from gemma3vl.cli import main
from gemma3vl.data.dataset import ConversationDataset
from gemma3vl.data.settings import DataConfig
from gemma3vl.errors import Gemma3VLError
from gemma3vl.parallel import ParallelDims
from gemma3vl.parallel.activation import apply_compile
from gemma3vl.shapes import write_shapes_dataset
from gemma3vl.tiny import write_tiny_checkpoint
from gemma3vl.train.config import build_config
from gemma3vl.train.run import build_trainer

DEFAULTS = {"dp_replicate": 1, "dp_shard": -1, "tp": 1, "pp": 1, "cp": 1}


def degrees(**changes):
    return {**DEFAULTS, **changes}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint (2 KV heads) and 12 training conversations."""
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_checkpoint(root / "base")
    write_shapes_dataset(root / "data", 12, seed=0, name="train")
    return root


# ---------------------------------------------------------------------------------------------- layouts
def test_degrees_resolve_the_rest_and_multiply_to_the_world_size():
    dims = ParallelDims.resolve(degrees(tp=2), 8)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp) == (1, 4, 2, 4)
    assert dims.fsdp_enabled and dims.tp_enabled
    dims = ParallelDims.resolve(degrees(dp_replicate=2, dp_shard=2, tp=-1), 8)
    assert (dims.dp, dims.tp) == (4, 2)
    assert not ParallelDims.resolve(DEFAULTS, 1).distributed


@pytest.mark.parametrize("changes, world, message", [
    ({"dp_shard": 4}, 2, r"dp_shard=4 .* = 4 ranks, but 2 processes were launched: set parallel.dp_shard=-1"),
    ({"tp": 2}, 1, r"tp=2 .* needs a multiple of 2 ranks, but this is a single process: .*torchrun --nproc-per-node 2"),
    ({"dp_shard": 2, "tp": 2}, 1, r"= 4 ranks, but this is a single process"),
    ({"tp": 4}, 6, r"needs a multiple of 4 ranks, but 6 processes were launched"),
    ({"tp": -1, "dp_shard": -1}, 4, r"at most one degree can take the rest"),
    ({"tp": 0}, 2, r"parallel.tp=0: a degree is a positive integer"),
])
def test_impossible_degrees_say_what_to_change(changes, world, message):
    with pytest.raises(Gemma3VLError, match=message):
        ParallelDims.resolve(degrees(**changes), world)


def test_layouts_the_model_cannot_take_are_refused(tiny):
    config = bridge.read_config(tiny / "base")
    assert config.text.num_key_value_heads == 2
    ParallelDims.resolve(degrees(tp=2), 4).validate(config)
    with pytest.raises(Gemma3VLError, match=r"parallel.tp=4 does not divide the model's key/value heads "
                                            r"\(num_key_value_heads\), 2: .* choose parallel.tp from 1, 2"):
        ParallelDims.resolve(degrees(tp=4), 4).validate(config)
    with pytest.raises(Gemma3VLError, match="8 stages, but the model has 4 decoder blocks"):
        ParallelDims.resolve(degrees(pp=8), 8).validate(config)
    ParallelDims.resolve(degrees(cp=2), 2).validate(config, seq_length=4)  # (more in test_parallel_context.py)
    with pytest.raises(Gemma3VLError, match="raise train.seq_length to at least 4, or set parallel.cp to at most 1"):
        ParallelDims.resolve(degrees(cp=2), 2).validate(config, seq_length=3)
    ParallelDims.resolve(degrees(tp=2), 2).validate(config, peft=True)  # LoRA/DoRA: test_parallel_lora_tp.py


def test_a_parallel_layout_without_torchrun_fails_before_loading(tiny, tmp_path, capsys):
    code = main(["train", "--recipe", "tiny_sft", "--model", str(tiny / "base"), "--data",
                 str(tiny / "data" / "train.jsonl"), "--out", str(tmp_path / "run"), "parallel.tp=2"])
    assert code == 2
    assert "this is a single process" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(Gemma3VLError, match="parallel.activation_checkpoint='some' is not one of none, full"):
        build_config("tiny_sft", overrides=["parallel.activation_checkpoint=some"])


# ---------------------------------------------------------------------------------------------- planner
def test_planner_recommends_a_layout_that_fits(capsys):
    from gemma3vl.parallel import plan

    counts = plan.count_parameters(plan.load_config("4b"))
    assert 4.2e9 < counts.total < 4.4e9 and counts.layers == 34
    modes = [plan.estimate(counts, gpus=8, tp=1, activation_checkpoint=m, seq=4096).total for m in plan.AC_MODES]
    assert modes[0] > modes[1] > modes[2]  # none > selective > full
    sharded = plan.estimate(counts, gpus=8, tp=1, activation_checkpoint="full", seq=4096)
    assert sharded.states == pytest.approx(16 * counts.total / 8)  # fp32 weights + grads + AdamW, over 8 ranks
    assert main(["plan", "--model", "12b", "--gpus", "8", "--gpu-memory", "80"]) == 0
    printed = capsys.readouterr().out
    assert "recommended: parallel.activation_checkpoint=selective" in printed
    assert "torchrun --nproc-per-node 8 -m gemma3vl train" in printed
    assert all(f"\n{tp:>3} " not in printed for tp in (3, 5, 6, 7))  # TP degrees must divide the 8 KV heads
    assert main(["plan", "--model", "27b", "--gpus", "4", "--gpu-memory", "80"]) == 1  # 16 B/param: 110 GB a GPU
    assert ("nothing fits: use more GPUs, a shorter train.seq_length, peft (--mode peft), model.dtype=bfloat16 "
            "(--bf16-weights), or parallel.cpu_offload=true") in capsys.readouterr().out
    assert main(["plan", "--model", "27b", "--gpus", "1", "--gpu-memory", "16", "--mode", "peft",
                 "--bf16-weights"]) == 1  # the levers already pulled are not suggested again
    assert "nothing fits: use more GPUs, a shorter train.seq_length, or parallel.cpu_offload=true" in \
        capsys.readouterr().out
    assert main(["plan", "--model", "27b", "--gpus", "4", "--gpu-memory", "80", "--mode", "peft"]) == 0


# ---------------------------------------------------------------------------------------------- data
def sources(dataset, count):
    out = []
    for sample in dataset:
        out.append(sample.source)
        if len(out) == count:
            break
    return out


def datasets(tiny, ranks):
    config = DataConfig(str(tiny / "data" / "train.jsonl"), seed=3, packing=False)
    return [ConversationDataset.for_checkpoint(config, tiny / "base").shard(rank, ranks) for rank in range(ranks)]


def test_data_parallel_ranks_read_one_order_between_them(tiny):
    (single,) = datasets(tiny, 1)
    order = sources(single, 12)
    first, second = datasets(tiny, 2)
    assert sources(first, 6) == order[0::2] and sources(second, 6) == order[1::2]


def test_data_position_resumes_on_another_number_of_ranks(tiny):
    (single,) = datasets(tiny, 1)
    order = sources(single, 12)
    ranks = datasets(tiny, 2)
    for dataset in ranks:
        sources(dataset, 3)  # each rank has read 3: together order[0:6]
    saved = {"ranks": [dataset.state_dict() for dataset in ranks]}
    (alone,) = datasets(tiny, 1)
    alone.load_state_dict(saved)
    assert alone.summary().samples == 6  # the ranks' counts travel with rank 0
    assert sources(alone, 6) == order[6:12]
    # and from one process back to three ranks: they stride on from where it stood
    (one,) = datasets(tiny, 1)
    sources(one, 5)
    three = datasets(tiny, 3)
    for dataset in three:
        dataset.load_state_dict(one.state_dict())
    assert [sources(dataset, 2) for dataset in three] == [order[5:11:3], order[6:12:3], order[7:12:3]]
    # the same number of ranks resumes each rank exactly where it was
    again = datasets(tiny, 2)
    for dataset in again:
        dataset.load_state_dict(saved)
    assert sources(again[0], 3) == order[6::2] and sources(again[1], 3) == order[7::2]


def test_uneven_positions_resume_from_the_slowest_rank(tiny, caplog):
    (single,) = datasets(tiny, 1)
    order = sources(single, 12)
    first, second = datasets(tiny, 2)
    sources(first, 4)
    sources(second, 2)  # with packing, ranks read different numbers of conversations
    (alone,) = datasets(tiny, 1)
    alone.load_state_dict({"ranks": [first.state_dict(), second.state_dict()]})
    assert sources(alone, 1) == [order[4]]
    assert "read again" in caplog.text


# ---------------------------------------------------------------------------------------------- checkpointing, compile
def one_step(tiny, tmp_path, *overrides, compile_backend=None):
    cfg = build_config("tiny_sft", overrides=[
        "train.seq_length=128", "train.global_batch_size=2", "train.micro_batch_size=1", "train.grad_clip=1e9",
        "logging.progress=false", f"model.path={tiny / 'base'}", f"data.path={tiny / 'data' / 'train.jsonl'}",
        f"out={tmp_path}", *overrides])
    trainer, _ = build_trainer(cfg, tmp_path)
    if compile_backend:
        apply_compile(trainer.model, backend=compile_backend)
    record = trainer.train_step()
    weights = {name: p.detach().clone() for name, p in trainer.model.state_dict().items()}
    return record, weights


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_recomputes_the_same_step(tiny, tmp_path, mode):
    plain, plain_weights = one_step(tiny, tmp_path / "plain")
    record, weights = one_step(tiny, tmp_path / mode, f"parallel.activation_checkpoint={mode}")
    assert record["loss"] == plain["loss"] and record["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-6)
    assert weights.keys() == plain_weights.keys()  # the wrapper leaves no trace in names
    for name, tensor in plain_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_selective_checkpointing_of_adapters_recomputes_the_same_step(tiny, tmp_path, method):
    """LoRA/DoRA under selective checkpointing, whose policy recomputes the adapters' low-rank matmuls instead of
    keeping their [T, d_out] outputs: the same step as without checkpointing."""
    adapter = [f"peft.method={method}", "peft.rank=4"]
    plain, plain_weights = one_step(tiny, tmp_path / "plain", *adapter)
    record, weights = one_step(tiny, tmp_path / "selective", *adapter, "parallel.activation_checkpoint=selective")
    assert record["loss"] == plain["loss"] and record["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-6)
    for name, tensor in plain_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-6, atol=1e-7)


def test_selective_policy_keeps_full_matmuls_and_recomputes_low_rank_ones():
    from torch.utils.checkpoint import CheckpointPolicy

    from gemma3vl.parallel.activation import LOW_RANK, _ops_to_save, _selective_policy

    aten, ops = torch.ops.aten, _ops_to_save()
    tokens, hidden, rank = 32, 256, 16
    x, w = torch.zeros(tokens, hidden), torch.zeros(hidden, hidden)
    lora_in, a, b = torch.zeros(tokens, rank), torch.zeros(hidden, rank), torch.zeros(rank, hidden)

    def policy(func, *args):
        return _selective_policy(ops, None, func, *args)

    assert policy(aten.mm.default, x, w) == CheckpointPolicy.MUST_SAVE  # a projection: kept
    assert policy(aten.mm.default, x, a) == CheckpointPolicy.PREFER_RECOMPUTE  # x A^T: [T, r] out
    assert policy(aten.mm.default, lora_in, b) == CheckpointPolicy.PREFER_RECOMPUTE  # (x A^T) B^T: r inner
    assert policy(aten.linear.default, x, w) == CheckpointPolicy.MUST_SAVE
    assert policy(aten.linear.default, x, torch.zeros(rank, hidden)) == CheckpointPolicy.PREFER_RECOMPUTE
    assert policy(aten.addmm.default, torch.zeros(hidden), x, w) == CheckpointPolicy.MUST_SAVE
    assert policy(aten.addmm.default, torch.zeros(hidden), lora_in, b) == CheckpointPolicy.PREFER_RECOMPUTE
    wide = torch.zeros(LOW_RANK + 1, hidden)
    assert policy(aten.mm.default, x, wide.T) == CheckpointPolicy.MUST_SAVE  # above LOW_RANK: kept
    assert policy(aten.mul.Tensor, x, x) == CheckpointPolicy.PREFER_RECOMPUTE  # elementwise: recomputed


def test_per_block_compile_computes_the_same_step(tiny, tmp_path, monkeypatch):
    """Decoder blocks, vision blocks and the loss's softmax part compiled: the same step as eager (aot_eager traces
    and runs the graphs inductor would compile, without the C++ build on CPU)."""
    import gemma3vl.model.loss as loss_module

    compiled_loss_calls = []
    compiled_loss = loss_module.compiled_chunk_loss_and_grad

    def recording(backend):
        compiled_loss_calls.append(backend)
        return compiled_loss(backend)

    monkeypatch.setattr(loss_module, "compiled_chunk_loss_and_grad", recording)
    plain, plain_weights = one_step(tiny, tmp_path / "plain")
    assert not compiled_loss_calls
    record, weights = one_step(tiny, tmp_path / "compiled", "parallel.activation_checkpoint=selective",
                               compile_backend="aot_eager")
    assert compiled_loss_calls and set(compiled_loss_calls) == {"aot_eager"}
    assert record["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert record["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
    for name, tensor in plain_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6)


def test_apply_compile_compiles_decoder_and_vision_blocks(tiny):
    from gemma3vl.infer.loading import load_model

    model, _ = load_model(tiny / "base", device="cpu", dtype=torch.float32)
    apply_compile(model, backend="aot_eager")
    blocks = [*model.text.layers, *model.vision.layers]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert model.text.loss_compile_backend == "aot_eager"
    assert "_orig_mod" not in "".join(model.state_dict())  # compiled in place: names unchanged


def test_compile_mode_reaches_every_block_and_is_checked(tiny, tmp_path, monkeypatch):
    """``parallel.compile_mode`` is torch.compile's mode for every decoder and vision block (recorded, not compiled:
    max-autotune's timing of candidate kernels needs a GPU to mean anything); an unknown mode names its choices."""
    modes = []

    def recording(self, *args, **kwargs):
        modes.append(kwargs.get("mode", "default"))

    monkeypatch.setattr(torch.nn.Module, "compile", recording)
    cfg = build_config("tiny_sft", overrides=[
        f"model.path={tiny / 'base'}", f"data.path={tiny / 'data' / 'train.jsonl'}", f"out={tmp_path}",
        "logging.progress=false", "parallel.compile=true", "parallel.compile_mode=max-autotune-no-cudagraphs"])
    trainer, _ = build_trainer(cfg, tmp_path)
    blocks = len(trainer.model.text.layers) + len(trainer.model.vision.layers)
    assert modes == ["max-autotune-no-cudagraphs"] * blocks
    with pytest.raises(Gemma3VLError, match="parallel.compile_mode='max-autotune' is not one of default, "
                                            "max-autotune-no-cudagraphs"):
        build_config("tiny_sft", overrides=["parallel.compile_mode=max-autotune"]).validate()


def test_a_world_size_mismatch_suggests_dp_shard_minus_one_only_where_it_would_fit():
    """``parallel.tp=3 parallel.dp_shard=1`` on 2 ranks: ``dp_shard=-1`` cannot take the rest of 2 ranks either, so
    the message must not send the user there (it would only fail again, on 3 not dividing 2)."""
    with pytest.raises(Gemma3VLError, match=r"= 3 ranks, but 2 processes were launched") as caught:
        ParallelDims.resolve(degrees(tp=3, dp_shard=1), 2)
    assert "dp_shard=-1" not in str(caught.value)
    assert "choose degrees whose product divides 2" in str(caught.value) and "--nproc-per-node 3" in str(caught.value)
