"""Generation through the checkpoint's own processor and chat template, against transformers' generate
(the oracle) on tiny random models with every weight random."""

import pytest
import torch

from gemma3vl import verify
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.cache import KVCache
from gemma3vl.infer.generate import Sampling, generate
from gemma3vl.infer.loading import load_model
from gemma3vl.infer.prompt import build_inputs, load_processor
from gemma3vl.model import TokenInfo
from gemma3vl.pictures import draw_picture
from gemma3vl.tiny import tiny_hf_config
from gemma3vl.tiny_tokenizer import write_tokenizer_and_processor

CPU = torch.device("cpu")


@pytest.fixture
def vl_checkpoint(hf_checkpoint):
    directory, reference = hf_checkpoint()
    write_tokenizer_and_processor(directory, tiny_hf_config())
    ours, config = load_model(directory, device=CPU, dtype=torch.float32)
    return directory, reference, ours, config


def reference_tokens(reference, inputs, config, count):
    batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in inputs}
    return verify.reference_greedy(reference, batch, config, count)


@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_chat_with_image_matches_transformers(vl_checkpoint, pan_and_scan):
    directory, reference, ours, config = vl_checkpoint
    processor = load_processor(directory, config)
    wide = draw_picture("red circle and blue square", size=(224, 56))
    inputs = build_inputs(processor, config, "What is in this picture?", [wide], pan_and_scan=pan_and_scan)
    crops = inputs["pixel_values"].shape[0] - 1
    assert (crops > 0) == pan_and_scan
    soft_tokens = int((inputs["input_ids"] == config.image_token_id).sum())
    assert soft_tokens == config.mm_tokens_per_image * (1 + crops)
    # longer than the sliding window (8): prompt alone is > 20 tokens, then 16 new ones
    ours_out = generate(ours, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        pixel_values=inputs["pixel_values"], sampling=Sampling(max_new_tokens=16))
    assert ours_out == reference_tokens(reference, inputs, config, 16)


def test_two_images_in_one_prompt(vl_checkpoint):
    directory, reference, ours, config = vl_checkpoint
    processor = load_processor(directory, config)
    pictures = [draw_picture("red circle"), draw_picture("green triangle", seed=1)]
    inputs = build_inputs(processor, config, "Compare them.", pictures)
    assert inputs["pixel_values"].shape[0] == 2
    ours_out = generate(ours, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        pixel_values=inputs["pixel_values"], sampling=Sampling(max_new_tokens=10))
    assert ours_out == reference_tokens(reference, inputs, config, 10)


def test_placeholder_count_must_match_images(vl_checkpoint):
    directory, _, _, config = vl_checkpoint
    processor = load_processor(directory, config)
    with pytest.raises(Gemma3VLError, match="1 <start_of_image> placeholder.*2 image"):
        build_inputs(processor, config, "<start_of_image> two?", [draw_picture(), draw_picture()], raw=True)
    with pytest.raises(Gemma3VLError, match="placeholder"):
        build_inputs(processor, config, "<start_of_image> here", [draw_picture()])


def test_batched_generation_equals_one_by_one(vl_checkpoint):
    _, _, ours, config = vl_checkpoint
    batch = verify.synthetic_batch(config)
    together = generate(ours, batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"], sampling=Sampling(max_new_tokens=6))
    images = [2, 1, 0]
    start = 0
    for row in range(3):
        keep = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][keep][None]
        pixels = batch["pixel_values"][start:start + images[row]] if images[row] else None
        start += images[row]
        alone = generate(ours, ids, pixel_values=pixels, sampling=Sampling(max_new_tokens=6))
        assert alone[0] == together[row]


def test_sampling_is_seeded_and_top_k_1_is_greedy(vl_checkpoint):
    _, _, ours, config = vl_checkpoint
    batch = verify.synthetic_batch(config)
    args = dict(attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    sample = Sampling(max_new_tokens=8, greedy=False, temperature=1.5, top_p=0.9, seed=3)
    first = generate(ours, batch["input_ids"], sampling=sample, **args)
    assert generate(ours, batch["input_ids"], sampling=sample, **args) == first
    greedy = generate(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=8), **args)
    top1 = generate(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=8, greedy=False, top_k=1, seed=0), **args)
    assert top1 == greedy


def test_stop_tokens_end_each_row(vl_checkpoint):
    _, _, ours, config = vl_checkpoint
    batch = verify.synthetic_batch(config)
    args = dict(attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    free = generate(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=8), **args)
    stop = free[1][2]  # make row 1's third token a stop token
    stopped = generate(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=8, stop_token_ids=(stop,)), **args)
    first_stop = free[1].index(stop)
    assert stopped[1] == free[1][: first_stop + 1]
    for row in (0, 2):
        expected = free[row][: free[row].index(stop) + 1] if stop in free[row] else free[row]
        assert stopped[row] == expected


def test_sliding_layers_keep_window_minus_one_keys(vl_checkpoint):
    """transformers' DynamicSlidingWindowLayer keeps W-1 keys; global layers keep everything (reference §8)."""
    _, _, ours, config = vl_checkpoint
    ids = torch.randint(10, 400, (1, 20))
    cache = KVCache(config.text)
    with torch.no_grad():
        ours(ids, info=TokenInfo.for_tokens(ids), cache=cache)
    window = config.text.sliding_window
    lengths = [cache.cached_length(i) for i in range(config.text.num_hidden_layers)]
    assert lengths == [window - 1 if config.text.is_sliding(i) else 20 for i in range(len(lengths))]


def test_a_failing_compiled_step_decodes_eagerly_said_once(vl_checkpoint, failing_compiler):
    """``generate(compile=True)`` whose compiled step fails (faked: a CPU never compiles) gives the eager tokens,
    tells ``on_compile_failure`` once and never tries the compiled step again; without a listener it warns."""
    _, _, model, config = vl_checkpoint
    batch = verify.synthetic_batch(config)
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    sampling = Sampling(max_new_tokens=6)

    def run(**kwargs):
        return generate(model, ids, attention_mask=mask, pixel_values=pixels, sampling=sampling, **kwargs)

    eager = run()
    heard: list[str] = []
    assert run(compile=True, on_compile_failure=heard.append) == eager
    assert heard == ["RuntimeError: no triton"] and failing_compiler == [3]  # one call, three rows
    with pytest.warns(RuntimeWarning, match=r"compiling the decode step failed \(RuntimeError: no triton\); "
                                            r"decoding eagerly"):
        assert run(compile=True) == eager
