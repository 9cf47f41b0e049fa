"""LoRA/DoRA under tensor parallelism, and an untied output matrix under tensor parallelism (CPU, gloo): each run
computes what one process computes.

Every run is the command ``torchrun --nproc-per-node N -m gemma3vl train ...`` (its ranks forked from a preloaded
server, launch_ranks.py) on the tiny model for 3 optimizer steps, against a single-process run of the same recipe. The settings and helpers are
``test_parallel_layouts``'s (``data.packing=false`` and ``optim.eps=1`` are explained there). The adapters of a
column-parallel projection (QKV, gate/up) have ``lora_B`` sharded with the base rows and ``lora_A`` replicated; those
of a row-parallel one (o, down) ``lora_A`` sharded with the base columns and ``lora_B`` replicated; so the exports
(the PEFT adapter and the merged checkpoint, written from the gathered model) must equal one process's.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from gemma3vl import bridge
from gemma3vl.bridge import write_random_hf_checkpoint
from gemma3vl.cli import main
from gemma3vl.tiny import tiny_hf_config
from gemma3vl.tiny_tokenizer import write_tokenizer_and_processor

from test_parallel_layouts import (  # noqa: F401 (fixtures)
    COMMON as LAYOUTS_COMMON,
    RTOL,
    assert_losses_match,
    assert_weights_match,
    checked,
    data,
    exported,
    inputs,
    losses,
    torchrun,
    workdir,
)

# test_parallel_layouts' settings, with half its batch and one checkpoint (at the end), to keep these runs short.
COMMON = [*LAYOUTS_COMMON, "train.global_batch_size=2", "checkpoint.every=0"]
LORA_LAYOUTS = {
    "lora_tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    # (with activation checkpointing: the adapters' hooks and gradient sums run again in the recomputation)
    "lora_tp2_fsdp2": (4, ["parallel.tp=2", "parallel.dp_shard=2", "parallel.sequence_parallel=false",
                           "parallel.activation_checkpoint=full"]),
}


@pytest.fixture(scope="module")
def lora_single(data):
    out = data / "lora_single_tp"
    assert main(["train", "--recipe", "tiny_peft", "--out", str(out), *inputs(data), *COMMON]) == 0
    return out


def assert_adapter_trained(out):
    """The comparisons are not vacuous: every ``lora_B`` (zero at the start, where any two runs agree) moved."""
    adapter = exported(out, "adapter")
    b_matrices = [name for name in adapter if "lora_B" in name]
    assert len(b_matrices) == 7 * 4  # q, k, v, o, gate, up, down in each of the 4 blocks
    for name in b_matrices:
        assert adapter[name].abs().max() > 1e-5, name


@pytest.mark.parametrize("name", list(LORA_LAYOUTS))
def test_lora_under_tp_computes_what_one_process_computes(name, lora_single, workdir):
    """Sharded loading (the default under torchrun): adapters made on the CPU as one process makes them, each
    rank keeping its box of them."""
    nproc, settings = LORA_LAYOUTS[name]
    out = workdir / name
    result = checked(torchrun(nproc, out, *inputs(workdir), *COMMON, *settings, recipe="tiny_peft"))
    assert "tp=2" in result.stderr and "sharded loading" in result.stderr
    assert_adapter_trained(lora_single)
    assert_losses_match(losses(out), losses(lora_single))
    assert_losses_match(losses(out, "grad_norm"), losses(lora_single, "grad_norm"))
    assert_weights_match(exported(out, "adapter"), exported(lora_single, "adapter"))  # the PEFT adapter
    assert_weights_match(exported(out), exported(lora_single))  # and the merged model
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config == json.loads((lora_single / "adapter" / "adapter_config.json").read_text())


@pytest.fixture(scope="module")
def dora_single(workdir, data):
    single = workdir / "dora_single"
    assert main(["train", "--recipe", "tiny_peft", "--out", str(single), *inputs(workdir), *COMMON,
                 "peft.method=dora"]) == 0
    return single


@pytest.mark.parametrize("name,settings", [("tp2", ["parallel.tp=2"]), ("pp2", ["parallel.pp=2"]),
                                           ("fsdp2", ["parallel.dp_shard=2"])])
def test_dora_under_sharded_loading_computes_what_one_process_computes(workdir, dora_single, name, settings):
    """DoRA, loaded shard by shard: each magnitude starts from its projection's whole base rows, read from the
    checkpoint one module at a time on the host (``sharded_load.dora_magnitudes``), of which each rank keeps its
    box. Under TP the magnitude of a row-parallel projection (o, down) needs whole-row norms in the forward too,
    summed over the ranks."""
    sharded = workdir / f"dora_{name}"
    result = checked(torchrun(2, sharded, *inputs(workdir), *COMMON, "peft.method=dora", *settings,
                              recipe="tiny_peft"))
    assert "sharded loading" in result.stderr
    adapter = exported(dora_single, "adapter")
    assert sum("lora_magnitude_vector" in key for key in adapter) == 7 * 4
    assert_losses_match(losses(sharded), losses(dora_single))
    assert_weights_match(exported(sharded, "adapter"), adapter)
    assert_weights_match(exported(sharded), exported(dora_single))


@pytest.fixture(scope="module")
def untied_base(workdir):
    """The tiny VL checkpoint with its own output matrix: ``tie_word_embeddings: false`` at the top level (where
    transformers 5 reads it for the VL model) and an ``lm_head`` tensor in the files."""
    config = tiny_hf_config()
    config["tie_word_embeddings"] = False
    directory = workdir / "untied_base"
    write_random_hf_checkpoint(config, directory, layout="hub", dtype=torch.float32, seed=1)
    write_tokenizer_and_processor(directory, config)
    assert bridge.has_untied_head(directory)
    return directory


def test_untied_head_under_tp2_computes_what_one_process_computes(untied_base, workdir, data):
    args = ["--model", str(untied_base), "--data", str(data / "data" / "train.jsonl"), *COMMON]
    single, sharded = workdir / "untied_single", workdir / "untied_tp2"
    assert main(["train", "--recipe", "tiny_sft", "--out", str(single), *args]) == 0
    checked(torchrun(2, sharded, *args, "parallel.tp=2"))
    assert_losses_match(losses(sharded), losses(single))
    assert_losses_match(losses(sharded, "grad_norm"), losses(single, "grad_norm"))
    trained, expected = exported(sharded), exported(single)
    base = load_file(untied_base / "model.safetensors")
    (head,) = [name for name in expected if name.endswith("lm_head.weight")]
    (embedding,) = [name for name in expected if name.endswith("embed_tokens.weight")]
    for name in (head, embedding):  # both trained, apart: the comparison below is not vacuous
        assert (expected[name] - base[name]).abs().max() > 100 * RTOL * base[name].abs().max(), name
    assert not torch.allclose(expected[head], expected[embedding])
    assert_weights_match(trained, expected)


def test_lora_on_the_vision_tower_under_tp2_computes_what_one_process_computes(workdir, data):
    """``peft.include_vision``: the tower is replicated under TP, so its adapters are whole on every rank and their
    gradients (each rank's image tokens feed its own shard of the decoder) are summed over the TP group."""
    vision = ["peft.include_vision=true"]
    single, sharded = workdir / "lora_vision_single", workdir / "lora_vision_tp2"
    assert main(["train", "--recipe", "tiny_peft", "--out", str(single), *inputs(data), *COMMON, *vision]) == 0
    checked(torchrun(2, sharded, *inputs(workdir), *COMMON, *vision, "parallel.tp=2", recipe="tiny_peft"))
    adapter = exported(single, "adapter")
    tower = [name for name in adapter if "vision_tower" in name and "lora_B" in name]
    # trained (zero at the start, where any two runs agree): the comparison below is not vacuous
    assert tower and all(adapter[name].abs().max() > 0 for name in tower)
    assert max(float(adapter[name].abs().max()) for name in tower) > 1e-5
    assert_losses_match(losses(sharded), losses(single))
    assert_losses_match(losses(sharded, "grad_norm"), losses(single, "grad_norm"))
    assert_weights_match(exported(sharded, "adapter"), adapter)
    assert_weights_match(exported(sharded), exported(single))
