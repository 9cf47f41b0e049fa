"""Generation through the checkpoint's own processor and chat template, against transformers' generate
(the oracle) on tiny random models with every weight random."""

import os

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


@pytest.mark.parametrize("chunk", [3, 5, 11])
def test_chunked_prefill_matches_transformers(vl_checkpoint, monkeypatch, chunk):
    """A prompt prefilled in chunks (GEMMA3VL_PREFILL_CHUNK; 3 is shorter than an image block, which then stays
    whole) gives transformers' greedy tokens (the oracle: its generate on the same fp32 weights), for three
    left-padded rows with 2, 1 and 0 images crossing the sliding window (8), on both cache kinds."""
    _, reference, ours, config = vl_checkpoint
    batch = verify.synthetic_batch(config)
    expected = reference_tokens(reference, batch, config, 6)
    monkeypatch.setenv("GEMMA3VL_PREFILL_CHUNK", str(chunk))
    for cache in ("static", "dynamic"):
        out = generate(ours, batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], sampling=Sampling(max_new_tokens=6), cache=cache)
        assert out == expected, cache


def test_chunked_prefill_logits_equal_the_whole_prompts_in_float64(vl_checkpoint, monkeypatch):
    """Same keys, same masks: chunked and whole prefill agree to float64 rounding, and so do the caches they
    leave (the next decode step's logits)."""
    from gemma3vl.infer.cache import StaticKVCache
    from gemma3vl.infer.decode import decode_step, prefill

    _, _, ours, config = vl_checkpoint
    model = ours.to(torch.float64)
    batch = verify.synthetic_batch(config)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pixels = batch["pixel_values"].double()
    info = TokenInfo.for_tokens(ids, attention_mask=mask, image_token_id=config.image_token_id)
    results = []
    for chunk in ("0", "4"):
        monkeypatch.setenv("GEMMA3VL_PREFILL_CHUNK", chunk)
        for make in (lambda: StaticKVCache(config.text, 3, ids.shape[1] + 2, CPU, torch.float64),
                     lambda: KVCache(config.text)):
            cache = make()
            with torch.no_grad():
                first = prefill(model, cache, ids, info, pixels)
                second = decode_step(model, cache, first.argmax(-1), info.positions[:, -1] + 1)
            results.append((first, second))
    for first, second in results[1:]:
        torch.testing.assert_close(first, results[0][0], rtol=0, atol=1e-10)
        torch.testing.assert_close(second, results[0][1], rtol=0, atol=1e-10)


def test_chunk_bounds_never_cut_an_image_block():
    from gemma3vl.infer.decode import chunk_bounds, prefill_chunk_tokens

    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        length, chunk = int(torch.randint(1, 60, (1,), generator=generator)), int(torch.randint(1, 12, (1,), generator=generator))
        blocks = torch.full((2, length), -1)
        for row in range(2):
            column, number = 0, 0
            while column < length:
                size = int(torch.randint(1, 9, (1,), generator=generator))
                if torch.rand(1, generator=generator) < 0.4:
                    blocks[row, column:column + size] = number
                    number += 1
                column += size + 1
        bounds = chunk_bounds(blocks, chunk)
        assert bounds[0][0] == 0 and bounds[-1][1] == length
        assert all(a < b for a, b in bounds) and all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
        for _, cut in bounds[:-1]:
            inside = (blocks[:, cut - 1] == blocks[:, cut]) & (blocks[:, cut] >= 0)
            assert not inside.any(), (blocks, bounds)
        for a, b in bounds:  # longer than a chunk only when a block forced it
            if b - a > chunk:
                assert ((blocks[:, a:b - 1] == blocks[:, a + 1:b]) & (blocks[:, a + 1:b] >= 0)).any()
    os.environ["GEMMA3VL_PREFILL_CHUNK"] = "many"
    try:
        with pytest.raises(Gemma3VLError, match="GEMMA3VL_PREFILL_CHUNK='many'"):
            prefill_chunk_tokens()
    finally:
        del os.environ["GEMMA3VL_PREFILL_CHUNK"]


def test_a_flex_prefill_threshold_that_is_not_a_number_is_named(monkeypatch):
    """``GEMMA3VL_FLEX_PREFILL_MIN_TOKENS=lots`` is one error naming the variable, not a bare ValueError out of every
    prefill (as ``GEMMA3VL_PREFILL_CHUNK`` already was)."""
    from gemma3vl.infer.decode import prefill_backend

    monkeypatch.setenv("GEMMA3VL_FLEX_PREFILL_MIN_TOKENS", "lots")
    with pytest.raises(Gemma3VLError, match="GEMMA3VL_FLEX_PREFILL_MIN_TOKENS='lots'"):
        prefill_backend(10, CPU)
