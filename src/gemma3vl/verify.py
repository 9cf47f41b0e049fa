"""Prove that our model computes what transformers computes, on one synthetic batch.

The batch is built from the config alone (no tokenizer needed): several rows of random text ids, left
padding of different lengths, and images — two in the first row, one in the second, none in the third —
each as ``<start_of_image>`` + soft tokens + ``<end_of_image>``, with random normalised pixels. Both models
get the same ids, mask, pixels and positions (``cumsum(mask) - 1``, as ``generate`` uses). We report max
|Δlogits| (absolute and relative to the largest |logit|), cosine similarity over all real positions, the
share of positions whose argmax agrees, and whether greedy generation gives the same tokens.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.generate import Sampling, generate
from gemma3vl.model import Gemma3Model

# Pass/fail thresholds per compute dtype. fp32 is exact up to summation order; bf16 is judged the way a
# user judges it: the same greedy tokens and near-identical logit directions.
TOLERANCES = {
    torch.float32: {"max_rel_diff": 1e-4, "min_cosine": 0.99999, "min_argmax_agreement": 1.0},
    torch.bfloat16: {"max_rel_diff": None, "min_cosine": 0.999, "min_argmax_agreement": 0.9},
    torch.float16: {"max_rel_diff": None, "min_cosine": 0.999, "min_argmax_agreement": 0.9},
}


@dataclass
class VerifyReport:
    dtype: str
    max_abs_diff: float
    max_rel_diff: float
    cosine: float
    argmax_agreement: float
    greedy_equal: bool
    greedy_tokens: int
    passed: bool
    failures: list[str]


def config_differences(first: Gemma3Config, second: Gemma3Config) -> list[str]:
    """The settings that shape the model's logits (text and vision settings, image tokens) in which two configs
    differ: ``verify --native`` must compare a conversion of MODEL_DIR, not another model."""
    import dataclasses

    differ = []
    for name in ("text", "vision"):
        a, b = getattr(first, name), getattr(second, name)
        if a is None or b is None:
            if (a is None) != (b is None):
                differ.append(f"{name} (a text-only and a vision-language model)" if name == "vision" else name)
            continue
        differ += [f"{name}.{f.name}" for f in dataclasses.fields(a)
                   if f.name != "eos_token_id" and getattr(a, f.name) != getattr(b, f.name)]  # EOS: generation only
    if first.is_vision_language and second.is_vision_language:
        differ += [key for key in ("mm_tokens_per_image", "boi_token_id", "eoi_token_id", "image_token_id")
                   if getattr(first, key) != getattr(second, key)]
    return differ


def synthetic_batch(config: Gemma3Config, *, seed: int = 0, text_length: int | None = None) -> dict[str, torch.Tensor]:
    """Three left-padded rows (2, 1 and 0 images for a VL model) that cross the sliding window."""
    generator = torch.Generator().manual_seed(seed)
    text = config.text
    special = {text.pad_token_id, text.bos_token_id, *config.stop_token_ids}
    if config.is_vision_language:
        special |= {config.boi_token_id, config.eoi_token_id, config.image_token_id}
    low, high = 10, min(text.vocab_size, 262_144)
    length = text_length or min(text.sliding_window + 16, 2048)

    def random_text(count: int) -> list[int]:
        ids = torch.randint(low, high, (count,), generator=generator).tolist()
        return [i if i not in special else low for i in ids]

    images_per_row = [2, 1, 0] if config.is_vision_language else [0, 0, 0]
    rows = []
    for row, images in enumerate(images_per_row):
        ids = [text.bos_token_id] + random_text(5)
        for _ in range(images):
            ids += [config.boi_token_id] + [config.image_token_id] * config.mm_tokens_per_image
            ids += [config.eoi_token_id] + random_text(3)
        ids += random_text(max(length - len(ids) - 7 * row, 4))
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), text.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, ids in enumerate(rows):
        input_ids[b, width - len(ids):] = torch.tensor(ids)
        attention_mask[b, width - len(ids):] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    total_images = sum(images_per_row)
    if total_images:
        vision = config.vision
        batch["pixel_values"] = torch.randn(
            total_images, vision.num_channels, vision.image_size, vision.image_size, generator=generator
        ).clamp(-1, 1)
    return batch


def load_reference(hf_dir: str | Path, config: Gemma3Config, dtype: torch.dtype, device: torch.device):
    """transformers' own model for the HF directory (sdpa attention)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    cls = Gemma3ForConditionalGeneration if config.is_vision_language else Gemma3ForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = cls.from_pretrained(str(hf_dir), dtype=dtype, attn_implementation="sdpa")
        except Exception as exc:
            raise Gemma3VLError(f"{hf_dir}: transformers cannot load this checkpoint: {exc}") from None
    return model.to(device).eval()


@torch.no_grad()
def reference_logits(reference, batch: dict[str, torch.Tensor], config: Gemma3Config) -> torch.Tensor:
    mask = batch["attention_mask"]
    kwargs = dict(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
    )
    if config.is_vision_language:
        kwargs["token_type_ids"] = (batch["input_ids"] == config.image_token_id).long()
        if "pixel_values" in batch:
            kwargs["pixel_values"] = batch["pixel_values"]
    return reference(**kwargs).logits


@torch.no_grad()
def reference_greedy(reference, batch, config: Gemma3Config, new_tokens: int) -> list[list[int]]:
    from transformers import GenerationConfig

    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if config.is_vision_language:
        kwargs["token_type_ids"] = (batch["input_ids"] == config.image_token_id).long()
        if "pixel_values" in batch:
            kwargs["pixel_values"] = batch["pixel_values"]
    # eos_token_id=[]: no stop at all (None would be filled in from the checkpoint's generation config, and
    # min_new_tokens would change the tokens by suppressing EOS), so both sides produce exactly N tokens.
    generation = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=config.text.pad_token_id,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = reference.generate(**kwargs, generation_config=generation)
    return out[:, batch["input_ids"].shape[1]:].tolist()


@torch.no_grad()
def cosine_of(expected: torch.Tensor, got: torch.Tensor) -> float:
    """The cosine similarity of two logit tensors taken whole, summed in float64: in float32, sums over millions
    of logits drift by ~1e-4 (two equal vectors of 1.2 M values come out at 0.99991), as much as the tolerance."""
    return float(torch.nn.functional.cosine_similarity(expected.flatten().double(), got.flatten().double(), dim=0))


@torch.no_grad()  # logits only: no activations kept for a backward (the 27B's would not fit beside it)
def compare(
    ours: Gemma3Model,
    reference,
    config: Gemma3Config,
    *,
    dtype: torch.dtype,
    device: torch.device,
    greedy_tokens: int = 8,
    seed: int = 0,
    text_length: int | None = None,
) -> VerifyReport:
    batch = {k: v.to(device) for k, v in synthetic_batch(config, seed=seed, text_length=text_length).items()}
    valid = batch["attention_mask"].bool()
    expected = reference_logits(reference, batch, config).float()[valid]
    got = ours(batch["input_ids"], batch.get("pixel_values"), attention_mask=batch["attention_mask"]).float()[valid]
    diff = (expected - got).abs()
    max_abs = float(diff.max())
    scale = float(expected.abs().max())
    max_rel = max_abs / scale if scale else max_abs
    cosine = cosine_of(expected, got)
    agreement = float((expected.argmax(-1) == got.argmax(-1)).float().mean())
    greedy_equal = True
    if greedy_tokens:
        expected_tokens = reference_greedy(reference, batch, config, greedy_tokens)
        our_tokens = generate(
            ours,
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch.get("pixel_values"),
            sampling=Sampling(max_new_tokens=greedy_tokens, pad_token_id=config.text.pad_token_id),
        )
        greedy_equal = expected_tokens == our_tokens
    tolerance = TOLERANCES[dtype]
    failures = []
    if tolerance["max_rel_diff"] is not None and not max_rel <= tolerance["max_rel_diff"]:
        failures.append(f"max relative |Δlogits| {max_rel:.3g} > {tolerance['max_rel_diff']:g}")
    if not cosine >= tolerance["min_cosine"] or math.isnan(cosine):
        failures.append(f"cosine {cosine:.6f} < {tolerance['min_cosine']}")
    if not agreement >= tolerance["min_argmax_agreement"]:
        failures.append(f"argmax agreement {agreement:.4f} < {tolerance['min_argmax_agreement']}")
    if not greedy_equal and dtype == torch.float32:
        failures.append("greedy tokens differ")
    return VerifyReport(
        dtype=str(dtype).replace("torch.", ""),
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
        cosine=cosine,
        argmax_agreement=agreement,
        greedy_equal=greedy_equal,
        greedy_tokens=greedy_tokens,
        passed=not failures,
        failures=failures,
    )


@torch.no_grad()
def reference_answer(reference, inputs: dict[str, torch.Tensor], config: Gemma3Config, max_new_tokens: int) -> list[int]:
    """transformers' greedy answer to one prompt, stopping at the checkpoint's EOS ids (stop token removed)."""
    from transformers import GenerationConfig

    kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    if config.is_vision_language:
        kwargs["token_type_ids"] = (inputs["input_ids"] == config.image_token_id).long()
    generation = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                                  eos_token_id=list(config.stop_token_ids), pad_token_id=config.text.pad_token_id)
    out = reference.generate(**kwargs, generation_config=generation)[0, inputs["input_ids"].shape[1]:].tolist()
    return [t for t in out if t not in config.stop_token_ids and t != config.text.pad_token_id]


def format_report(report: VerifyReport) -> str:
    lines = [
        f"dtype              {report.dtype}",
        f"max |Δlogits|      {report.max_abs_diff:.3e}  (relative to max |logit|: {report.max_rel_diff:.3e})",
        f"cosine similarity  {report.cosine:.7f}",
        f"argmax agreement   {report.argmax_agreement * 100:.2f}%",
        (f"greedy tokens      {'equal' if report.greedy_equal else 'DIFFERENT'} ({report.greedy_tokens} new tokens x 3 rows)"
         if report.greedy_tokens else "greedy tokens      not compared (--greedy-tokens 0)"),
        f"result             {'PASS' if report.passed else 'FAIL: ' + '; '.join(report.failures)}",
    ]
    return "\n".join(lines)


def report_dict(report: VerifyReport) -> dict:
    return asdict(report)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
