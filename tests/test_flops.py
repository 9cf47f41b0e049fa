"""The one FLOP count behind every MFU (``gemma3vl.train.flops``): hand-computed cases, the attended pairs against
the model's own mask, per-conversation lengths from segment ids, and the trainer's logged MFU using it."""

import pytest
import torch

from gemma3vl.config import SLIDING, Gemma3Config
from gemma3vl.data.batch import IGNORE, Batch
from gemma3vl.model import TokenInfo
from gemma3vl.model.attention import dense_mask
from gemma3vl.tiny import tiny_hf_config
from gemma3vl.train import flops


def tiny_config(**text) -> Gemma3Config:
    return Gemma3Config.from_hf_dict(tiny_hf_config(**text))


def test_attended_pairs_by_hand():
    assert flops.attended_pairs(5, None) == 15  # 1 + 2 + 3 + 4 + 5
    assert flops.attended_pairs(5, 2) == 9  # 1 + 2 + 2 + 2 + 2
    assert flops.attended_pairs(5, 5) == flops.attended_pairs(5, 8) == 15
    assert flops.keys_per_query(4, None) == 2.5


def packed_info(lengths: list[int], pad: int = 0) -> TokenInfo:
    """One row of packed conversations (segments 1, 2, ...; positions restarting), ``pad`` padding tokens after."""
    segments = [s + 1 for s, n in enumerate(lengths) for _ in range(n)] + [0] * pad
    positions = [p for n in lengths for p in range(n)] + [0] * pad
    return TokenInfo(positions=torch.tensor([positions]), segment_ids=torch.tensor([segments]),
                     image_block_ids=torch.full((1, len(segments)), -1))


def test_attention_counts_the_pairs_the_mask_allows():
    """The oracle is the model's own dense mask (``model.attention.dense_mask``): the pairs it allows, summed over
    the layers, times 4 H hd, are the attention FLOPs of a packed row; the matmuls count every real token."""
    config = tiny_config()
    text = config.text
    lengths = [7, 3, 12]
    info = packed_info(lengths, pad=4)
    pairs = 0
    for kind in text.layer_types:
        window = text.sliding_window if kind == SLIDING else None
        allowed = dense_mask(info, info, window)[0, 0]
        real = info.segment_ids[0] != 0  # padding rows are opened only to keep the softmax finite
        pairs += int(allowed[real].sum())
    parts = flops.forward_flops(config, lengths, images=0)
    assert parts["text_attention"] == 4 * text.num_attention_heads * text.head_dim * pairs
    assert parts["vision"] == 0
    one = flops.forward_flops(config, 22, images=0)
    assert parts["text_matmul"] == one["text_matmul"]  # same tokens, same matmuls
    assert parts["text_attention"] < one["text_attention"]  # packed conversations do not see each other
    # the matmuls by hand: 2 FLOPs per multiply-add of QKV, output, gate/up/down per layer and the LM head
    d, i, hd = text.hidden_size, text.intermediate_size, text.head_dim
    h, k = text.num_attention_heads, text.num_key_value_heads
    by_hand = 2 * 22 * (text.num_hidden_layers * (d * (h + 2 * k) * hd + h * hd * d + 3 * d * i) + d * text.vocab_size)
    assert parts["text_matmul"] == by_hand


def test_step_factors_and_the_vision_tower():
    config = tiny_config()
    parts = flops.forward_flops(config, 64, images=2)
    text = parts["text_matmul"] + parts["text_attention"]
    v = config.vision
    patches = (v.image_size // v.patch_size) ** 2
    one_image = (2 * patches * (v.num_hidden_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
                                + 3 * v.patch_size**2 * v.hidden_size)
                 + 4 * patches**2 * v.hidden_size * v.num_hidden_layers
                 + 2 * config.mm_tokens_per_image * v.hidden_size * config.text.hidden_size)
    assert parts["vision"] == 2 * one_image
    assert flops.step_flops(config, 64, 2, "sft") == 3 * (text + 2 * one_image)
    # LoRA: the decoder's matmuls and the head backpropagate activations only (2 x), its attention has no weights
    # and still computes dQ, dK, dV (3 x); the frozen tower runs forward only
    peft = 2 * parts["text_matmul"] + 3 * parts["text_attention"]
    assert flops.step_flops(config, 64, 2, "peft") == peft + 2 * one_image
    assert flops.step_flops(config, 64, 2, "sft", vision_trained=False) == 3 * text + 2 * one_image
    # the LM head counts the positions that have a target (default: every token)
    head_row = 2 * config.text.hidden_size * config.text.vocab_size  # one position's logits
    assert flops.forward_flops(config, 64, 2, targets=40)["text_matmul"] == parts["text_matmul"] - 24 * head_row
    assert flops.step_flops(config, 64, 2, "sft", targets=40) == flops.step_flops(config, 64, 2) - 3 * 24 * head_row
    with pytest.raises(ValueError, match="mode"):
        flops.step_flops(config, 64, 2, "dpo")


def test_segment_lengths_and_a_steps_batches():
    segments = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    assert sorted(flops.segment_lengths(segments)) == [2, 3, 4]
    config = tiny_config()
    ids = torch.zeros_like(segments)
    info = TokenInfo(positions=torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]]), segment_ids=segments,
                     image_block_ids=torch.full_like(segments, -1))
    targets = torch.full_like(ids, IGNORE)
    targets[0, :2] = targets[1, 1:3] = 7  # 4 positions with a target: the LM head's rows
    batch = Batch(input_ids=ids, targets=targets, info=info)
    expected = flops.step_flops(config, [3, 2, 4], 0, "sft", targets=4)
    assert expected < flops.step_flops(config, [3, 2, 4], 0, "sft")
    assert flops.batch_step_flops(config, [batch, batch], "sft") == pytest.approx(2 * expected, rel=1e-12)

    class Shard:  # a context-parallel rank's view: the whole batch, one of ``degree`` slices
        degree = 4

    class SlicedBatch:
        whole, shard = batch, Shard()

    assert flops.batch_step_flops(config, [SlicedBatch()], "sft") == pytest.approx(expected / 4, rel=1e-12)


def oracle_step(config, trained: str, seq: int = 48, targets: int = 30):
    """FLOPs of one training step of the tiny model (one image, ``targets`` positions with a target) as torch's
    ``FlopCounterMode`` counts them, with each text layer's attention matmuls (dense in SDPA's math kernel: every
    (query, key) pair) scaled to the pairs the layer's mask allows, as the model FLOPs count them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from gemma3vl.model import Gemma3Model
    from gemma3vl.model.loss import linear_cross_entropy

    torch.manual_seed(0)
    model = Gemma3Model(config)
    for param in model.parameters():
        param.requires_grad_(trained == "all")
    if trained == "patch_embed":  # only the first op of the tower trains: its layers backpropagate activations
        model.vision.patch_embed.weight.requires_grad_(True)
    text, m = config.text, config.mm_tokens_per_image
    ids = torch.randint(10, text.vocab_size, (1, seq))
    ids[0, 2:2 + m] = config.image_token_id
    info = TokenInfo.for_tokens(ids, image_token_id=config.image_token_id)
    labels = torch.full_like(ids, IGNORE)
    labels[0, seq - targets:] = ids[0, seq - targets:]
    pixels = torch.randn(1, 3, config.vision.image_size, config.vision.image_size)
    counter = FlopCounterMode(display=False, depth=None)
    with sdpa_kernel(SDPBackend.MATH), counter:
        hidden = model.text(model.embed(ids, pixels), info)
        loss, count = linear_cross_entropy(hidden, model.text.output_weight, labels)
        loss.backward()
    assert count == targets
    by_module = counter.get_flop_counts()
    total = counter.get_total_flops()
    for i, kind in enumerate(text.layer_types):
        dense = by_module[f"TextDecoder.layers.{i}.attn"][torch.ops.aten.bmm]
        window = text.sliding_window if kind == SLIDING else None
        total += dense * (flops.attended_pairs(seq, window) / seq**2 - 1)
    return total, by_module


@pytest.mark.parametrize("mode, trained", [("sft", "all"), ("peft", "patch_embed")])
def test_step_flops_equal_torch_flop_counter(mode, trained):
    """Every term against torch's own count of the step: the decoder's matmuls, attention (its backward 2 x its
    forward even where nothing in the decoder trains), the LM head on the positions with a target only, the
    tower and the projector. ``peft`` here: a frozen decoder and a frozen tower whose activations still need
    gradients (``vision_adapted``), the state a LoRA'd model is in, without the adapters' own matmuls."""
    config = tiny_config()
    total, by_module = oracle_step(config, trained)
    v = config.vision
    patch_conv = 2 * v.num_patches * 3 * v.patch_size**2 * v.hidden_size  # forward FLOPs of the patch embedding
    if mode == "sft":  # our count gives the patch embedding the 3 x of the tower; its input is pixels: no dX
        total += patch_conv
    ours = flops.step_flops(config, 48, 1, mode, vision_trained=mode == "sft", vision_adapted=mode == "peft",
                            targets=30)
    assert ours == pytest.approx(total, rel=1e-9)
    assert torch.ops.aten.convolution_backward in by_module["VisionTower.patch_embed"]


def test_the_benchmark_and_the_trainer_use_this_count(tmp_path, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
    spec = importlib.util.spec_from_file_location("train_step_for_flops", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_step_for_flops", module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    assert module.step_flops is flops.step_flops and module.forward_flops is flops.forward_flops

    from gemma3vl.train.config import build_config
    from gemma3vl.train.run import build_trainer

    cfg = build_config("tiny_sft", overrides=[
        "train.seq_length=64", "train.global_batch_size=2", "train.micro_batch_size=1", "train.steps=1",
        "logging.progress=false", "logging.tensorboard=false", "data.eval_accuracy_samples=0", f"out={tmp_path}"])
    cfg.data.eval_path = None
    trainer, _ = build_trainer(cfg, tmp_path)
    trainer.peak_flops = 1e12  # as if on a GPU: the CPU has no known peak
    seen = []
    real = trainer.batcher.next_step

    def next_step():
        batches = real()
        seen.extend(batches)
        return batches

    trainer.batcher.next_step = next_step
    record = trainer.train_step()
    expected = flops.batch_step_flops(trainer.model.config, seen, "sft", vision_trained=True)
    assert expected > 0
    assert record["mfu"] == pytest.approx(expected / record["step_time_s"] / 1e12, rel=1e-9)
