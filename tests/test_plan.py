"""The planner (``gemma3vl.parallel.plan``, ``gemma3vl plan``) on hand-worked cases: the 4B at 131,072 tokens on one
141 GB GPU, context and pipeline parallelism term by term, the order it recommends layouts in, and settings that the
trainer's config accepts as they are printed. The arithmetic below is written out from docs/distributed.md's
formulas with the 4B's shapes, not taken from the module."""

import json
import re

import pytest
import torch

from gemma3vl.cli import main
from gemma3vl.errors import Gemma3VLError
from gemma3vl.parallel import plan
from gemma3vl.train.config import build_config

GIB = 2**30
T = 131_072


@pytest.fixture(scope="module")
def four_b():
    counts = plan.count_parameters(plan.load_config("4b"))
    text, vision = counts.config.text, counts.config.vision
    shapes = (text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads,
              text.head_dim, text.vocab_size, counts.layers)
    assert shapes == (2560, 10240, 8, 4, 256, 262208, 34)
    assert (vision.num_patches, vision.num_hidden_layers, vision.hidden_size, vision.intermediate_size) == (
        4096, 27, 1152, 4304)
    return counts


# the 4B's terms, bytes per token (D 2560, I 10240, H 8, K 4, hd 256, 34 blocks)
WHOLE = 40 * 2560 + 4 * (8 + 2 * 4) * 256 + 14 * (8 + 4) * 256 + 4 * 8 * 256 + 8 * 10240  # one block, everything
assert WHOLE == 251_904
FULL_KEPT = 2 * 2560 * 34 + 4 * 2560  # full checkpointing: each block's input, + embeddings and final hidden states
VISION = 4096 * 27 * (32 * 1152 + 6 * 4304)  # one 896 px image through SigLIP, never checkpointed
CHUNK_LOGITS = 8 * 4096 * 262208  # fp32 logits of one 4,096-token chunk and their gradient


def loss_bytes(tokens):
    return CHUNK_LOGITS + 4 * 262208 * 2560 + 4 * tokens * 2560  # + the output matrix's fp32 gradient


def total(peak):
    return 1.05 * peak + 1.5 * GIB


def test_4b_at_131072_tokens_on_one_141_gb_gpu(four_b, capsys):
    """Full checkpointing keeps T (2 D L + 4 D) = 24 GB of block inputs and one block's T W = 33 GB; with the
    loss and one image that is 77 GB of activations. fp32 weights + gradients + AdamW (16 N = 69 GB) and the
    autocast copy (2 N) then overflow 141 GB by a few GB; the optimizer on the host (8 N on the GPU) fits."""
    n = four_b.total
    activations = T * (FULL_KEPT + WHOLE) + VISION
    plain = plan.estimate(four_b, gpus=1, tp=1, activation_checkpoint="full", seq=T)
    assert plain.activations == pytest.approx(activations, rel=1e-12)
    assert plain.loss == pytest.approx(loss_bytes(T), rel=1e-12)
    # end of forward: 16 N of states less the 4 N of gradients not made yet, + 2 N of bf16 copies
    assert plain.total == pytest.approx(total(14 * n + activations + loss_bytes(T)), rel=1e-12)
    assert plain.total > 141e9
    offload = plan.estimate(four_b, gpus=1, tp=1, activation_checkpoint="full", seq=T, cpu_offload=True)
    # host: fp32 master and two moments (12 N), and in the step an fp32 copy of every gradient (4 N)
    assert offload.states == pytest.approx(8 * n) and offload.host == pytest.approx(16 * n)
    assert offload.total == pytest.approx(total(6 * n + activations + loss_bytes(T)), rel=1e-12)
    assert offload.total < 141e9
    # SDPA's dense masks: 4 bytes per (query, key) pair, 69 GB more: nothing fits
    sdpa = plan.estimate(four_b, gpus=1, tp=1, activation_checkpoint="full", seq=T, cpu_offload=True,
                         attention="sdpa")
    assert sdpa.activations - offload.activations == pytest.approx(4 * T * T, rel=1e-12)
    assert sdpa.total > 141e9

    assert main(["plan", "--model", "4b", "--gpus", "1", "--gpu-memory", "141", "--seq", str(T)]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("recommended: "))
    assert line.split("   ")[0] == ("recommended: train.seq_length=131072 parallel.activation_checkpoint=full "
                                    "optim.cpu_offload=true")
    assert "of host memory" in printed
    assert main(["plan", "--model", "4b", "--gpus", "1", "--gpu-memory", "141", "--seq", str(T),
                 "--attention", "sdpa"]) == 1
    assert "nothing fits" in capsys.readouterr().out


def test_context_parallel_terms(four_b):
    """CP2 on 2 GPUs: each rank T/2 tokens; FSDP shards over dp x cp = 2 (the same states as FSDP over 2); with
    full checkpointing one layer's keys and values from the other rank (2 bytes x 2 K hd x T/2) and their
    gradient, once."""
    n = four_b.total
    est = plan.estimate(four_b, gpus=2, tp=1, cp=2, activation_checkpoint="full", seq=T)
    fsdp = plan.estimate(four_b, gpus=2, tp=1, activation_checkpoint="full", seq=T)
    assert est.dp == 1 and est.states == pytest.approx(fsdp.states) == pytest.approx(16 * n / 2)
    half = T // 2
    gathered = 2 * 2 * 4 * 256 * half
    activations = half * (FULL_KEPT + WHOLE) + 2 * gathered + VISION
    assert est.activations == pytest.approx(activations, rel=1e-12)
    assert est.loss == pytest.approx(loss_bytes(half), rel=1e-12)
    working = 2 * (four_b.embed + four_b.vision) + 4 * four_b.block + 6 * four_b.block  # FSDP's gathered copies
    assert est.working == pytest.approx(working, rel=1e-12)
    assert est.total == pytest.approx(total(16 * n / 2 - 4 * n / 2 + working + activations + loss_bytes(half)),
                                      rel=1e-12)


def test_pipeline_terms(four_b):
    """PP2 (1F1B) on 2 GPUs, 4 micro-batches: 17 blocks a stage; the first stage holds the embedding and the vision
    tower, and two micro-batches in flight; gradients live with the activations; the bubble is 1/5."""
    assert plan.pipeline_stage_blocks(34, 4) == [8, 9, 9, 8]  # docs/distributed.md's example
    seq = 4096
    est = plan.estimate(four_b, gpus=2, tp=1, pp=2, micro_batches=4, activation_checkpoint="full", seq=seq)
    assert est.bubble == pytest.approx(1 / 5) and est.micro_batches == 4
    first_params = 17 * four_b.block + four_b.embed + four_b.vision
    last_params = 17 * four_b.block + four_b.embed + four_b.other
    first = 16 * first_params + 2 * first_params + 2 * seq * (2 * 2560 * 17 + 2 * 2560) + 2 * VISION + seq * WHOLE
    last = (16 * last_params + 2 * last_params + seq * (2 * 2560 * 17 + 2 * 2560) + seq * WHOLE
            + loss_bytes(seq))
    assert est.stage == (0 if first > last else 1)
    assert est.total == pytest.approx(total(max(first, last)), rel=1e-12)
    with pytest.raises(Gemma3VLError, match="1F1B needs at least 2"):
        plan.estimate(four_b, gpus=2, tp=1, pp=2, micro_batches=1, activation_checkpoint="full", seq=seq)
    with pytest.raises(Gemma3VLError, match="does not divide 6 GPUs"):
        plan.estimate(four_b, gpus=6, tp=4, activation_checkpoint="full", seq=seq)


def test_pipeline_x_context_parallel_terms(four_b):
    """PP2 x CP2 on 4 GPUs, 4 micro-batches, full checkpointing: each stage as PP2's, but its rank holds T/2 tokens
    of each micro-batch in flight (the slice's block inputs and hidden states), one layer's keys and values from
    the other context-parallel rank (2 bytes x 2 K hd x T/2) and their gradient; FSDP shards each stage over its
    two context-parallel ranks (the root unit gathered for the step, as under CP)."""
    half = T // 2
    est = plan.estimate(four_b, gpus=4, tp=1, cp=2, pp=2, micro_batches=4, activation_checkpoint="full", seq=T)
    assert est.dp == 1 and est.tier == 4 and est.bubble == pytest.approx(1 / 5)
    gathered = 2 * 2 * 4 * 256 * half
    once = half * WHOLE + 2 * gathered
    first_params = 17 * four_b.block + four_b.embed + four_b.vision
    last_params = 17 * four_b.block + four_b.embed + four_b.other
    first_working = 2 * (four_b.embed + four_b.vision) + 10 * four_b.block
    last_working = 2 * four_b.embed + 10 * four_b.block
    # two micro-batches in flight on stage 0 (each with its image through the tower), one on the last stage
    first = 16 * first_params / 2 + first_working + 2 * (half * (2 * 2560 * 17 + 2 * 2560) + VISION) + once
    last = 16 * last_params / 2 + last_working + half * (2 * 2560 * 17 + 2 * 2560) + once + loss_bytes(half)
    assert est.stage == (0 if first > last else 1)
    assert est.total == pytest.approx(total(max(first, last)), rel=1e-12)
    # without checkpointing every layer keeps its gathered keys and values, for each micro-batch in flight (plus,
    # once, one layer's exchange buffers in backward, as under CP alone)
    none = plan.estimate(four_b, gpus=4, tp=1, cp=2, pp=2, micro_batches=4, activation_checkpoint="none", seq=T,
                         images=0)
    pipelined = plan.estimate(four_b, gpus=4, tp=1, pp=2, micro_batches=4, activation_checkpoint="none", seq=half,
                              images=0)
    assert none.stage == pipelined.stage == 0
    assert none.activations == pytest.approx(pipelined.activations + 2 * 17 * gathered + 2 * gathered,
                                               rel=1e-12)


def test_the_simplest_layout_that_fits_comes_first(four_b, capsys):
    """FSDP/TP before CP before PP before both, whatever their speed estimate; printed settings are valid
    overrides."""
    options = plan.candidates(four_b, 8, seq=T)
    assert {(o.cp > 1, o.pp > 1) for o in options} == {(False, False), (True, False), (False, True), (True, True)}
    choice = plan.recommend(options, 80e9)
    assert choice.cp == choice.pp == 1  # an FSDP/TP layout fits at 80 GB: no CP, no PP
    context = [o for o in options if o.pp == 1]
    fitting_cp = [o for o in context if o.cp > 1 and o.total <= 40e9]
    assert fitting_cp and plan.recommend(context, 40e9).cp > 1  # at 40 GB only context parallelism fits
    pipelined = [o for o in options if o.pp > 1]
    choice = plan.recommend(pipelined + [o for o in context if o.cp > 1], 1e15)
    assert choice.pp == 1  # CP before PP
    choice = plan.recommend(pipelined, 1e15)
    settings = plan.settings_of(choice, seq=T)
    assert f"parallel.pp={choice.pp}" in settings and "train.global_batch_size=" in settings
    cfg = build_config("gemma3_vl_4b_sft", overrides=settings.split())  # copy-pasteable as printed
    assert cfg.parallel.pp == choice.pp and cfg.train.seq_length == T
    assert choice.cp == 1  # PP before PP x CP
    both = [o for o in options if o.pp > 1 and o.cp > 1]
    choice = plan.recommend(both, 1e15)
    cfg = build_config("gemma3_vl_4b_sft", overrides=plan.settings_of(choice, seq=T).split())
    assert (cfg.parallel.pp, cfg.parallel.cp) == (choice.pp, choice.cp) and choice.pp > 1 and choice.cp > 1

    assert main(["plan", "--model", "4b", "--gpus", "8", "--gpu-memory", "40", "--seq", str(T)]) == 0
    printed = capsys.readouterr().out
    settings = next(line for line in printed.splitlines() if line.startswith("recommended: "))
    settings = settings.removeprefix("recommended: ").split("   ")[0]
    assert "parallel.cp=" in settings
    cfg = build_config("gemma3_vl_4b_sft", overrides=settings.split())
    assert cfg.parallel.cp > 1 and cfg.parallel.activation_checkpoint in plan.AC_MODES
    assert main(["plan", "--model", "4b", "--gpus", "1", "--gpu-memory", "141", "--seq", "262144"]) != 0
    assert "--seq 262144: expected 1 to 131,072 tokens" in capsys.readouterr().err


def test_launch_line_for_gpus_that_do_not_fill_8_gpu_nodes(capsys):
    """12 GPUs are not `--nproc-per-node 8 --nnodes 1` (8 processes): torchrun runs as many on every node."""
    assert plan.gpus_per_node(12) == 6 and plan.gpus_per_node(16) == 8 and plan.gpus_per_node(3) == 3
    assert main(["plan", "--model", "4b", "--gpus", "12", "--gpu-memory", "80"]) == 0
    printed = capsys.readouterr().out
    assert "torchrun --nproc-per-node 6 --nnodes 2 " in printed


def test_a_global_batch_the_data_parallel_ranks_cannot_share_is_never_recommended(four_b, capsys):
    """train refuses train.global_batch_size not a multiple of micro-batch x data-parallel ranks: with 3 rows a step
    on 8 GPUs the plan keeps only layouts of one data-parallel rank (the whole width in TP x CP x PP)."""
    options = plan.candidates(four_b, 8, seq=4096, global_batch_size=3)
    assert options and all(3 % o.dp == 0 for o in options)
    assert main(["plan", "--model", "4b", "--gpus", "8", "--gpu-memory", "80", "--global-batch-size", "3"]) == 0
    choice = plan.recommend(options, 80e9)
    assert choice.dp == 1 and f"parallel.tp={choice.tp}" in capsys.readouterr().out
    assert main(["plan", "--model", "4b", "--gpus", "3", "--gpu-memory", "80", "--global-batch-size", "1",
                 "--micro-batch-size", "2"]) == 2
    assert "--global-batch-size 1 is not a multiple of --micro-batch-size 2" in capsys.readouterr().err


def test_without_a_global_batch_the_recommendation_sets_one_its_ranks_can_share(capsys):
    """Without --global-batch-size, 64 data-parallel ranks cannot share the default 32 rows a step (train refuses
    it): the recommended command sets the smallest multiple that they can, and says why; 8 ranks share 32."""
    from gemma3vl.train.config import TrainSettings

    assert plan.DEFAULT_GLOBAL_BATCH == TrainSettings().global_batch_size
    assert main(["plan", "--model", "12b", "--gpus", "64", "--gpu-memory", "80"]) == 0
    printed = capsys.readouterr().out
    recommended = next(line for line in printed.splitlines() if line.startswith("recommended:"))
    launch = next(line for line in printed.splitlines() if "torchrun" in line)
    assert "train.global_batch_size=64" in recommended and "train.global_batch_size=64" in launch
    assert "the default 32 rows a step do not split into whole micro-batches over 64 data-parallel ranks" in printed
    assert main(["plan", "--model", "4b", "--gpus", "8", "--gpu-memory", "80"]) == 0
    assert "global_batch_size" not in capsys.readouterr().out
    assert main(["plan", "--model", "4b", "--gpus", "12", "--gpu-memory", "80", "--micro-batch-size", "4"]) == 0
    assert "train.global_batch_size=48" in capsys.readouterr().out  # 12 ranks x 4 rows: 32 -> 48


@pytest.mark.parametrize("flags, message", [
    (["--gpu-memory", "nan"], "--gpu-memory"), (["--gpu-memory", "inf"], "--gpu-memory"),
    (["--gpu-memory", "80", "--images", "-1"], "--images -1 must be >= 0"),
    (["--gpu-memory", "80", "--global-batch-size", "0"], "--global-batch-size 0 must be >= 1"),
])
def test_plan_refuses_meaningless_values(flags, message, capsys):
    assert main(["plan", "--model", "4b", "--gpus", "8", *flags]) != 0
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- states vs tensors
def tiny_config(tied: bool = True):
    from gemma3vl.config import Gemma3Config
    from gemma3vl.tiny import tiny_hf_config

    raw = tiny_hf_config(num_key_value_heads=2)
    if not tied:
        raw["tie_word_embeddings"] = False
    return Gemma3Config.from_hf_dict(raw)


def tp_share(name: str, tp: int) -> float:
    """The share of a parameter one tensor-parallel rank holds (``parallel/tensor.py``'s plan tables)."""
    if name.startswith(("vision.", "projector.")):
        return 1.0  # replicated
    if name.startswith(("text.embed.", "text.lm_head.")):
        return 1 / tp  # vocab-parallel
    if ".adapters." in name:  # follows its projection: lora_A whole on column-parallel ones, lora_B on row-parallel
        column = ".attn.qkv." in name or ".mlp.gate_up." in name
        return 1.0 if column == name.endswith("lora_A.weight") else 1 / tp
    if re.search(r"\.(attn\.qkv|attn\.o|mlp\.gate_up|mlp\.down)\.weight$", name):
        return 1 / tp
    return 1.0  # norms: replicated


def held_state_bytes(config, *, mode: str, bf16: bool, tp: int, pp: int, stage: int, shards: int) -> float:
    """Weights, gradients and AdamW's two moments (each in its parameter's own dtype) of what one rank holds: the
    real tensors of the model (LoRA applied by the repository's own function), placed by the layout's rules."""
    from gemma3vl.model import Gemma3Model
    from gemma3vl.parallel.pipeline import split_layers
    from gemma3vl.train.lora import LoraConfig, apply_lora

    with torch.device("meta"):
        model = Gemma3Model(config)
    model.to(torch.bfloat16 if bf16 else torch.float32)
    if mode == "peft":
        apply_lora(model, LoraConfig(rank=16))  # adapters in the base weights' dtype, made on the CPU
    blocks = set(split_layers(len(model.text.layers), pp)[stage])
    first, last, tied = stage == 0, stage == pp - 1, model.text.lm_head is None
    total = 0.0
    for name, param in model.named_parameters():
        layer = re.match(r"text\.layers\.(\d+)\.", name)
        if layer:
            copies = int(int(layer.group(1)) in blocks)
        elif name.startswith(("vision.", "projector.")):
            copies = int(first)
        elif name == "text.embed.weight":
            copies = int(first) + int(last and tied and pp > 1)  # the last stage's copy of the tied matrix
        else:  # the final norm, an untied head
            copies = int(last)
        held = param.numel() * param.element_size() * copies * tp_share(name, tp) / shards
        total += held * (4 if param.requires_grad else 1)
    return total


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("mode, bf16", [("sft", False), ("sft", True), ("peft", False), ("peft", True)])
@pytest.mark.parametrize("tp, pp, gpus", [(1, 1, 1), (2, 1, 4), (1, 2, 2), (2, 2, 8)])
def test_states_are_the_bytes_of_the_tensors_each_rank_holds(tied, mode, bf16, tp, pp, gpus):
    """Per layout, the planner's weights + gradients + AdamW moments against the tensors themselves: an untied
    output matrix is held (by the last stage, vocab-parallel), LoRA's adapters have their base weights' dtype
    (8 bytes a parameter in bf16, not 16) and half of every adapter is replicated over TP."""
    config = tiny_config(tied)
    counts = plan.count_parameters(config)
    with torch.device("meta"):
        from gemma3vl.model import Gemma3Model

        assert counts.total == sum(p.numel() for p in Gemma3Model(config).parameters())
    est = plan.estimate(counts, gpus=gpus, tp=tp, pp=pp, activation_checkpoint="full", seq=64, mode=mode,
                        bf16_weights=bf16)
    held = held_state_bytes(config, mode=mode, bf16=bf16, tp=tp, pp=pp, stage=est.stage, shards=est.dp)
    # (the only approximation left: the planner divides a block's norms by tp too, 0.7% of the tiny block)
    assert est.states == pytest.approx(held, rel=5e-3)


def test_a_checkpoint_with_its_own_output_matrix_is_planned_with_it(tmp_path):
    raw = json.loads(plan.preset_path("4b").read_text())
    raw["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(raw))
    counts = plan.count_parameters(plan.load_config(str(tmp_path)))
    tied = plan.count_parameters(plan.load_config("4b"))
    assert counts.head == counts.embed == tied.embed and counts.total == tied.total + tied.embed
    sft = plan.estimate(counts, gpus=1, tp=1, activation_checkpoint="full", seq=4096)
    assert sft.states == pytest.approx(16 * counts.total)


def test_a_frozen_vision_tower_keeps_no_activations():
    """Under LoRA the tower is frozen and its input is pixels: autograd keeps nothing of it (and autocast no bf16
    copy of its weights), whatever the images; full fine-tuning keeps ``32 Dv + 6 Iv`` bytes a patch and layer."""
    counts = plan.count_parameters(plan.load_config("4b"))
    kwargs = dict(gpus=1, tp=1, activation_checkpoint="full", seq=4096)
    peft = [plan.estimate(counts, mode="peft", images=n, **kwargs) for n in (0, 1, 2)]
    assert peft[0].activations == peft[1].activations == peft[2].activations
    assert peft[0].working == pytest.approx(2 * (counts.total - counts.vision), rel=1e-12)
    sft = [plan.estimate(counts, mode="sft", images=n, **kwargs) for n in (0, 1)]
    assert sft[1].activations - sft[0].activations == pytest.approx(VISION, rel=1e-12)
