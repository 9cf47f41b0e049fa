"""Logits and greedy-generation parity with transformers. The oracle is transformers itself
(Gemma3ForConditionalGeneration / Gemma3ForCausalLM, sdpa) on tiny random models with every weight random."""

import pytest
import torch

from gemma3vl import verify
from gemma3vl.infer.loading import load_model

CPU = torch.device("cpu")

CASES = {
    # default tiny: GQA 2, head_dim 24 != 64/4, query_pre_attn_scalar 20 != head_dim, window 8
    "gqa2": {},
    "gqa1": {"num_key_value_heads": 4},
    "gqa3": {"num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 72},
    "window3-pattern3": {"sliding_window": 3, "sliding_window_pattern": 3, "num_hidden_layers": 5},
    "no-rope-scaling": {"rope_scaling": None, "rope_local_base_freq": 500.0, "rope_theta": 20000.0},
}


@pytest.mark.parametrize("case", list(CASES))
def test_vl_logits_and_greedy_match_transformers(hf_checkpoint, case):
    directory, reference = hf_checkpoint(**CASES[case])
    ours, config = load_model(directory, device=CPU, dtype=torch.float32)
    # 3 rows: 2 images, 1 image, none; left padding; longer than the sliding window
    report = verify.compare(ours, reference, config, dtype=torch.float32, device=CPU, greedy_tokens=12)
    assert report.max_rel_diff <= 1e-5, verify.format_report(report)
    assert report.greedy_equal, verify.format_report(report)
    assert report.passed


def test_text_only_with_softcap_matches_transformers(hf_checkpoint):
    directory, reference = hf_checkpoint(text_only=True)
    ours, config = load_model(directory, device=CPU, dtype=torch.float32)
    assert not config.is_vision_language and ours.text.logit_softcap == 30.0
    report = verify.compare(ours, reference, config, dtype=torch.float32, device=CPU, greedy_tokens=12)
    assert report.max_rel_diff <= 1e-5, verify.format_report(report)
    assert report.greedy_equal


def test_bfloat16_close_to_transformers(hf_checkpoint):
    directory, reference = hf_checkpoint(dtype=torch.bfloat16)
    ours, config = load_model(directory, device=CPU, dtype=torch.bfloat16)
    assert ours.text.embed.weight.dtype == torch.bfloat16
    report = verify.compare(ours, reference, config, dtype=torch.bfloat16, device=CPU, greedy_tokens=0)
    assert report.cosine >= 0.999, verify.format_report(report)
    assert report.argmax_agreement >= 0.9


def test_images_change_the_answer(hf_checkpoint):
    """Guards against a silently ignored image (bidirectionality is pinned by the parity tests above)."""
    directory, reference = hf_checkpoint()
    ours, config = load_model(directory, device=CPU, dtype=torch.float32)
    batch = verify.synthetic_batch(config)
    with torch.no_grad():
        base = ours(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"])
        other = ours(batch["input_ids"], batch["pixel_values"].flip(-1), attention_mask=batch["attention_mask"])
    image_positions = (batch["input_ids"] == config.image_token_id).nonzero()
    first_row_first_image = image_positions[0]
    row, column = first_row_first_image.tolist()
    assert not torch.allclose(base[row, column], other[row, column])


def test_cosine_of_equal_logits_is_one():
    """verify's cosine is summed in float64: in float32, equal vectors of a million logits came out ~1e-4 below 1,
    as much as the float32 tolerance (0.99999) it is held to."""
    logits = (torch.randn(300, 4096, generator=torch.Generator().manual_seed(0)) * 5).bfloat16().float()
    assert abs(verify.cosine_of(logits, logits.clone()) - 1.0) < 1e-12
