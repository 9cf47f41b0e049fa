"""The generation engine: static KV cache (ring buffers for sliding layers), per-row sampling, repetition
penalty, stop strings, streaming, and the decode step that CUDA compiles.

The oracle is transformers itself: its ``generate`` (greedy, with and without repetition penalty) and its logits
processors, on tiny random models (every weight random) built by the ``hf_checkpoint`` fixture. Where
transformers has no counterpart (per-row settings, streaming, stop strings on text) the engine is checked
against itself run another way: each row alone, the dynamic cache, the non-streaming result.
"""

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gemma3vl import verify
from gemma3vl.config import FULL, SLIDING
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.cache import KVCache, StaticKVCache
from gemma3vl.infer.generate import (
    RowSampling,
    Sampling,
    choose_tokens,
    decode_step,
    generate,
    generate_result,
    prefill,
    process_logits,
    seen_tokens,
    stream_generate,
)
from gemma3vl.infer.loading import load_model
from gemma3vl.infer.prompt import load_processor, tokenizer_of
from gemma3vl.model import TokenInfo
from gemma3vl.tiny import tiny_hf_config
from gemma3vl.tiny_tokenizer import write_tokenizer_and_processor

CPU = torch.device("cpu")
IMAGES_PER_ROW = [2, 1, 0]  # verify.synthetic_batch: rows with 2, 1 and no images, left-padded


@pytest.fixture
def tiny(hf_checkpoint):
    """(reference, ours, config, tokenizer) for the default tiny VL model (sliding window 8)."""
    directory, reference = hf_checkpoint()
    write_tokenizer_and_processor(directory, tiny_hf_config())
    ours, config = load_model(directory, device=CPU, dtype=torch.float32)
    return reference, ours, config, tokenizer_of(load_processor(directory, config))


def batch_args(batch):
    return dict(attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])


def single_rows(batch):
    """Each row of a synthetic batch alone: (input_ids [1, T] without padding, its pixel values or None)."""
    rows, start = [], 0
    for row, images in enumerate(IMAGES_PER_ROW):
        keep = batch["attention_mask"][row].bool()
        pixels = batch["pixel_values"][start:start + images] if images else None
        rows.append((batch["input_ids"][row][keep][None], pixels))
        start += images
    return rows


def hf_generate(reference, config, ids, pixels, new_tokens, **settings):
    """transformers' greedy generate for one unpadded row, no EOS (exactly ``new_tokens`` tokens)."""
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  token_type_ids=(ids == config.image_token_id).long())
    if pixels is not None:
        kwargs["pixel_values"] = pixels
    generation = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=[],
                                  pad_token_id=config.text.pad_token_id, **settings)
    with torch.no_grad():
        return reference.generate(**kwargs, generation_config=generation)[0, ids.shape[1]:].tolist()


# ------------------------------------------------------------------------------------------------ cache
@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 3, "sliding_window_pattern": 3, "num_hidden_layers": 5}],
                         ids=["window8", "window3"])
def test_static_cache_greedy_equals_transformers_and_dynamic_cache(hf_checkpoint, overrides):
    """Several images, left padding, prompts longer than the window, generation far past it. With window 3 the
    sliding AND clips the 4-token image blocks (reference §5.2)."""
    directory, reference = hf_checkpoint(**overrides)
    ours, config = load_model(directory, device=CPU, dtype=torch.float32)
    batch = verify.synthetic_batch(config)
    assert batch["attention_mask"].sum(1).min() > config.text.sliding_window
    new_tokens = 3 * config.text.sliding_window
    static = generate(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=new_tokens), **batch_args(batch))
    dynamic = generate(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=new_tokens), cache="dynamic",
                       **batch_args(batch))
    assert static == verify.reference_greedy(reference, batch, config, new_tokens)
    assert static == dynamic


def test_chunked_prefill_and_decode_give_the_full_forward_logits(tiny):
    """Prompt, then chunks of every kind (one token; more tokens than the ring; a few) against one forward
    over the whole sequence: the ring keeps exactly what each query may see."""
    _, ours, config, _ = tiny
    batch = verify.synthetic_batch(config)
    extra = torch.randint(10, 400, (3, 20), generator=torch.Generator().manual_seed(1))
    ids = torch.cat((batch["input_ids"], extra), dim=1)
    mask = torch.cat((batch["attention_mask"], torch.ones_like(extra)), dim=1)
    info = TokenInfo.for_tokens(ids, attention_mask=mask, image_token_id=config.image_token_id)
    with torch.no_grad():
        expected = ours(ids, batch["pixel_values"], info=info)
        cache = StaticKVCache(config.text, 3, ids.shape[1], CPU, torch.float32)
        prompt = batch["input_ids"].shape[1]
        got = [ours(ids[:, :prompt], batch["pixel_values"], info=_columns(info, 0, prompt), cache=cache)]
        bounds = [prompt, prompt + 1, prompt + 12, prompt + 15, prompt + 16, ids.shape[1]]
        for start, end in zip(bounds, bounds[1:]):
            got.append(ours(ids[:, start:end], info=_columns(info, start, end), cache=cache))
    got = torch.cat(got, dim=1)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    assert int(cache.index) == ids.shape[1]


def _columns(info: TokenInfo, start: int, end: int) -> TokenInfo:
    return TokenInfo(info.positions[:, start:end], info.segment_ids[:, start:end], info.image_block_ids[:, start:end])


def test_ring_buffer_holds_the_last_window_positions(tiny):
    _, ours, config, _ = tiny
    window = config.text.sliding_window
    batch = verify.synthetic_batch(config)
    new_tokens = 3 * window
    cache = StaticKVCache(config.text, 3, batch["input_ids"].shape[1] + new_tokens, CPU, torch.float32)
    generate(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=new_tokens), cache=cache, **batch_args(batch))
    # the last generated token is never fed back: the cache holds prompt + new_tokens - 1 columns
    last = batch["attention_mask"].sum(1) - 1 + new_tokens - 1
    for layer, kind in enumerate(config.text.layer_types):
        slots = cache.keys[layer].shape[2]
        assert slots == (window if kind == SLIDING else cache.max_length)
    ring = cache.slots[SLIDING]
    for row in range(3):
        assert sorted(ring.positions[row].tolist()) == list(range(last[row] - window + 1, last[row] + 1))
    assert cache.filled(SLIDING).tolist() == [window] * 3
    assert cache.filled(FULL).tolist() == (last + 1).tolist()


def test_sliding_layer_memory_does_not_grow_with_length(tiny):
    _, _, config, _ = tiny
    short = StaticKVCache(config.text, 2, 64, CPU, torch.bfloat16)
    long = StaticKVCache(config.text, 2, 4096, CPU, torch.bfloat16)
    for layer in range(config.text.num_hidden_layers):
        if config.text.is_sliding(layer):
            assert long.keys[layer].nbytes == short.keys[layer].nbytes
            assert long.keys[layer].shape[2] == config.text.sliding_window
        else:
            assert long.keys[layer].nbytes == 64 * short.keys[layer].nbytes
    assert long.slots[SLIDING].positions.shape == (2, config.text.sliding_window)


def test_decode_past_the_cache_length_fails_loudly(tiny):
    _, ours, config, _ = tiny
    ids = torch.randint(10, 400, (1, 4))
    cache = StaticKVCache(config.text, 1, 4, CPU, torch.float32)
    with torch.no_grad():
        prefill(ours, cache, ids, TokenInfo.for_tokens(ids))
        with pytest.raises((IndexError, RuntimeError)):
            decode_step(ours, cache, ids[:, -1], torch.tensor([4]))


# --------------------------------------------------------------------------------------------- sampling
def test_repetition_penalty_equals_transformers(tiny):
    reference, ours, config, _ = tiny
    batch = verify.synthetic_batch(config)
    penalised_differs = False
    for ids, pixels in single_rows(batch):
        expected = hf_generate(reference, config, ids, pixels, 10, repetition_penalty=1.8)
        got = generate(ours, ids, pixel_values=pixels, sampling=Sampling(max_new_tokens=10, repetition_penalty=1.8))
        assert got == [expected]
        plain = generate(ours, ids, pixel_values=pixels, sampling=Sampling(max_new_tokens=10))
        penalised_differs |= plain != got
    assert penalised_differs  # the penalty did something


def test_logit_processing_equals_transformers_processors_per_row():
    """Each row's settings through our one vectorised pass == transformers' processors applied to that row."""
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(4, vocab) * 3
    prompt = torch.randint(0, vocab, (4, 12))
    settings = [
        Sampling(greedy=False, temperature=0.7, top_k=5, repetition_penalty=1.3),
        Sampling(greedy=False, temperature=1.3, top_p=0.8),
        Sampling(greedy=False, temperature=1.0, top_k=10, top_p=0.5, repetition_penalty=0.7),
        Sampling(greedy=True, temperature=0.1, top_k=1, repetition_penalty=2.0),  # greedy: penalty only
    ]
    rows = RowSampling.from_samplings(settings, vocab, CPU)
    got = process_logits(logits, rows, seen_tokens(prompt, torch.ones_like(prompt), vocab))
    for row, s in enumerate(settings):
        ids, expected = prompt[row:row + 1], logits[row:row + 1]
        expected = RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(ids, expected)
        if not s.greedy:
            expected = TemperatureLogitsWarper(s.temperature)(ids, expected)
            if s.top_k:
                expected = TopKLogitsWarper(s.top_k)(ids, expected)
            if s.top_p:
                expected = TopPLogitsWarper(s.top_p)(ids, expected)
        torch.testing.assert_close(got[row:row + 1], expected, rtol=1e-6, atol=1e-6)
    assert int(torch.isfinite(got[0]).sum()) == 5
    # padding is not "already present": a row is penalised the same alone as left-padded in a batch
    padded = torch.tensor([[0, 0, 7, 8]])
    assert seen_tokens(padded, torch.tensor([[0, 0, 1, 1]]), vocab)[0].nonzero().flatten().tolist() == [7, 8]


def test_sampling_draws_from_the_softmax():
    """The exponential race samples softmax(scores): empirical frequencies over many rows match."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    rows = 20_000
    scores = probs.log().expand(rows, -1).contiguous()
    settings = RowSampling.from_samplings([Sampling(greedy=False)] * rows, 5, CPU)
    torch.manual_seed(0)
    counts = torch.bincount(choose_tokens(scores, settings), minlength=5).float() / rows
    torch.testing.assert_close(counts, probs, rtol=0, atol=0.015)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(tiny):
    _, ours, config, _ = tiny
    batch = verify.synthetic_batch(config)
    sample = Sampling(max_new_tokens=8, greedy=False, temperature=1.5, top_p=0.95, seed=3)
    first = generate(ours, batch["input_ids"], sampling=sample, **batch_args(batch))
    assert generate(ours, batch["input_ids"], sampling=sample, **batch_args(batch)) == first
    other_seed = Sampling(max_new_tokens=8, greedy=False, temperature=1.5, top_p=0.95, seed=4)
    assert generate(ours, batch["input_ids"], sampling=other_seed, **batch_args(batch)) != first
    greedy = generate(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=8), **batch_args(batch))
    top1 = Sampling(max_new_tokens=8, greedy=False, temperature=2.0, top_k=1, top_p=0.9, seed=0)
    assert generate(ours, batch["input_ids"], sampling=top1, **batch_args(batch)) == greedy


def test_per_row_settings_equal_each_row_alone(tiny):
    _, ours, config, _ = tiny
    batch = verify.synthetic_batch(config)
    settings = [
        Sampling(max_new_tokens=7, repetition_penalty=1.3),
        Sampling(max_new_tokens=9, greedy=False, temperature=0.8, top_k=50, seed=1),
        Sampling(max_new_tokens=5, greedy=False, temperature=1.2, top_p=0.9, repetition_penalty=1.2, seed=2),
    ]
    together = generate_result(ours, batch["input_ids"], sampling=settings, **batch_args(batch))
    assert [len(t) for t in together.tokens] == [7, 9, 5]
    assert together.finish_reasons == ["length"] * 3
    for (ids, pixels), s, tokens in zip(single_rows(batch), settings, together.tokens):
        assert generate(ours, ids, pixel_values=pixels, sampling=s) == [tokens]


# ----------------------------------------------------------------------------------- stopping and streaming
def test_stop_strings_stop_the_right_row(tiny):
    _, ours, config, tokenizer = tiny
    batch = verify.synthetic_batch(config)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    free = generate_result(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=12), tokenizer=tokenizer,
                           **batch_args(batch))
    assert free.finish_reasons == ["length"] * 3
    assert free.texts == [decode(t) for t in free.tokens]
    # a piece of row 1's text, from the token at step 6: row 1 must stop there (others may too, if it occurs)
    start = len(decode(free.tokens[1][:5]))
    stop = next(free.texts[1][i:i + 2] for i in range(start, len(free.texts[1])) if free.texts[1][i:i + 2].strip())
    stopped = generate_result(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=12, stop_strings=(stop,)),
                              tokenizer=tokenizer, **batch_args(batch))
    reasons = []
    for row in range(3):
        ends = [n for n in range(1, 13) if stop in decode(free.tokens[row][:n])]
        if ends:
            text = decode(free.tokens[row][:ends[0]])
            assert stopped.tokens[row] == free.tokens[row][:ends[0]]
            assert stopped.texts[row] == text[:text.index(stop)]
        else:
            assert stopped.tokens[row] == free.tokens[row]
            assert stopped.texts[row] == free.texts[row]
        reasons.append("stop" if ends else "length")
    assert stopped.finish_reasons == reasons
    assert reasons[1] == "stop" and len(stopped.tokens[1]) < 12
    assert "length" in reasons  # the other rows went on
    with pytest.raises(Gemma3VLError, match="tokenizer="):
        generate(ours, batch["input_ids"], sampling=Sampling(stop_strings=("x",)), **batch_args(batch))


def test_stream_yields_the_batch_result(tiny):
    _, ours, config, tokenizer = tiny
    batch = verify.synthetic_batch(config)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    free = generate(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=10), **batch_args(batch))
    settings = [
        Sampling(max_new_tokens=10, stop_token_ids=(free[0][3],)),  # row 0 ends on a stop token
        Sampling(max_new_tokens=10, greedy=False, top_k=20, seed=5, stop_strings=(" ",)),
        Sampling(max_new_tokens=6),
    ]
    args = dict(sampling=settings, tokenizer=tokenizer, **batch_args(batch))
    result = generate_result(ours, batch["input_ids"], **args)
    assert result.finish_reasons[0] == "stop" and result.tokens[0] == free[0][:free[0].index(free[0][3]) + 1]
    tokens, texts, reasons = [[], [], []], ["", "", ""], [None] * 3
    for event in stream_generate(ours, batch["input_ids"], **args):
        assert reasons[event.row] is None  # nothing after a row's last event
        tokens[event.row].append(event.token)
        texts[event.row] += event.text_delta
        if event.finished:
            reasons[event.row] = event.finish_reason
    assert tokens == result.tokens
    assert texts == result.texts
    assert reasons == result.finish_reasons
    # the old callback: one call per step, finished rows report their pad id
    steps = []
    generate(ours, batch["input_ids"], on_step=lambda t, f: steps.append((t.tolist(), f.tolist())), **args)
    assert len(steps) == max(len(t) for t in result.tokens)
    for row in range(3):
        n = len(result.tokens[row])
        assert [s[0][row] for s in steps[:n]] == result.tokens[row]
        assert all(s[0][row] == 0 and s[1][row] for s in steps[n:])


# ------------------------------------------------------------------------------------------------ compile
def test_decode_step_traces_as_one_graph(tiny):
    """``decode_step`` is what CUDA compiles with CUDA graphs; here dynamo must trace it whole (fullgraph: no
    break, no host sync) and the traced step must give the eager tokens. Inductor and CUDA graphs are GPU-only."""
    _, ours, config, _ = tiny
    batch = verify.synthetic_batch(config)
    info = TokenInfo.for_tokens(batch["input_ids"], attention_mask=batch["attention_mask"],
                                image_token_id=config.image_token_id)
    traced = torch.compile(decode_step, backend="eager", fullgraph=True, dynamic=False)
    runs = []
    for step_fn in (decode_step, traced):
        cache = StaticKVCache(config.text, 3, batch["input_ids"].shape[1] + 12, CPU, torch.float32)
        with torch.no_grad():
            logits = prefill(ours, cache, batch["input_ids"], info, batch["pixel_values"])
            positions, tokens = info.positions[:, -1] + 1, []
            for _ in range(12):
                tokens.append(logits.argmax(-1))
                logits = step_fn(ours, cache, tokens[-1], positions)
                positions = positions + 1
        runs.append(torch.stack(tokens, 1).tolist())
    torch._dynamo.reset()
    assert runs[0] == runs[1]
    assert runs[0] == generate(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=12), **batch_args(batch))


def test_reused_cache_and_bad_arguments(tiny):
    _, ours, config, _ = tiny
    batch = verify.synthetic_batch(config)
    length = batch["input_ids"].shape[1] + 30
    cache = StaticKVCache(config.text, 3, length, CPU, torch.float32)
    first = generate(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=6), cache=cache, **batch_args(batch))
    again = generate(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=6), cache=cache, **batch_args(batch))
    assert first == again  # reset() really empties it
    with pytest.raises(Gemma3VLError, match="StaticKVCache holds 3 rows"):
        generate(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=40), cache=cache, **batch_args(batch))
    with pytest.raises(Gemma3VLError, match="2 Sampling settings"):
        generate(ours, batch["input_ids"], sampling=[Sampling(), Sampling()], **batch_args(batch))
    with pytest.raises(Gemma3VLError, match="repetition_penalty"):
        generate(ours, batch["input_ids"], sampling=Sampling(repetition_penalty=0), **batch_args(batch))
    one_token = torch.tensor([[config.text.bos_token_id]])  # a one-token prompt takes the decode path at once
    assert generate(ours, one_token, sampling=Sampling(max_new_tokens=10)) == generate(
        ours, one_token, sampling=Sampling(max_new_tokens=10), cache="dynamic")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_compiled_decode_on_cuda_equals_eager(hf_checkpoint):
    """GPU only: compile=True (inductor + CUDA graphs) gives the eager tokens, greedy and per-row sampled (with
    allowed tokens, a minimum length and bad words too), and calls without a cache of their own reuse one (the captured graph is replayed, not captured again)."""
    from gemma3vl.infer.generate import _spare_caches

    directory, _ = hf_checkpoint()
    ours, config = load_model(directory, device=torch.device("cuda"), dtype=torch.float32)
    batch = {k: v.cuda() for k, v in verify.synthetic_batch(config).items()}
    greedy = Sampling(max_new_tokens=20)
    eager = generate(ours, batch["input_ids"], sampling=greedy, **batch_args(batch))
    assert generate(ours, batch["input_ids"], sampling=greedy, compile=True, **batch_args(batch)) == eager
    spare = _spare_caches[ours][3]
    assert generate(ours, batch["input_ids"], sampling=greedy, compile=True, **batch_args(batch)) == eager
    assert _spare_caches[ours][3] is spare
    stops = tuple(config.stop_token_ids)
    mixed = [Sampling(max_new_tokens=20, greedy=False, temperature=0.9, top_k=40, seed=1, repetition_penalty=1.2),
             Sampling(max_new_tokens=12, greedy=False, top_p=0.9, seed=2, allowed_token_ids=tuple(range(3, 60))),
             Sampling(max_new_tokens=20, min_new_tokens=6, stop_token_ids=stops, bad_words_ids=((17,), (5, 6)))]
    assert generate(ours, batch["input_ids"], sampling=mixed, compile=True, **batch_args(batch)) == generate(
        ours, batch["input_ids"], sampling=mixed, **batch_args(batch))


def test_static_and_dynamic_caches_agree_to_float64_precision(tiny):
    """In bf16 greedy runs on the static and the dynamic cache can part ways (rounding: the kernels reduce over a
    different number of masked columns). In float64 the prefill and decode logits must agree to ~1e-12: the keys
    and the mask rule are the same, so any larger gap would be a real difference, not rounding."""
    _, ours, config, _ = tiny
    model = ours.to(torch.float64)  # the fixture's model is this test's own
    batch = verify.synthetic_batch(config)
    info = TokenInfo.for_tokens(batch["input_ids"], attention_mask=batch["attention_mask"],
                                image_token_id=config.image_token_id)
    runs = []
    for cache in (StaticKVCache(config.text, 3, batch["input_ids"].shape[1] + 20, CPU, torch.float64),
                  KVCache(config.text)):
        with torch.no_grad():
            logits = [prefill(model, cache, batch["input_ids"], info, batch["pixel_values"].double())]
            positions = info.positions[:, -1] + 1
            for _ in range(2 * config.text.sliding_window):  # past the window: the ring wraps
                logits.append(decode_step(model, cache, logits[-1].argmax(-1), positions))
                positions = positions + 1
        runs.append(torch.stack(logits))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("given", [
    {},
    {"do_sample": True},
    {"do_sample": True, "temperature": None, "top_k": None, "top_p": None, "eos_token_id": None},
    {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 0.9},
    {"do_sample": True, "top_k": 64, "top_p": 0.95, "eos_token_id": [1, 106]},  # the hub's
], ids=["empty", "sampling-only", "nulls", "top-k-0", "hub"])
def test_generation_config_defaults_are_transformers_own(given):
    """The oracle is transformers: the values its ``generate`` takes from a checkpoint's generation config
    (unset or null ones filled with its global defaults: top-k 50, top-p 1.0, temperature 1.0; top-k 0 = no
    top-k filter) are those our sampling uses."""
    from gemma3vl.config import Gemma3Config
    from gemma3vl.infer.sampling_defaults import resolve_sampling
    from gemma3vl.tiny import tiny_hf_config

    config = Gemma3Config.from_hf_dict(tiny_hf_config())
    theirs = GenerationConfig(**given)
    theirs.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    ours = resolve_sampling(given, config, max_new_tokens=4)
    assert ours.greedy == (not theirs.do_sample)
    assert (ours.temperature, ours.top_k or 0, ours.top_p) == (theirs.temperature, theirs.top_k, theirs.top_p)
    assert set(config.stop_token_ids) <= set(ours.stop_token_ids)


def test_a_generation_config_value_that_is_not_a_number_is_named():
    from gemma3vl.config import Gemma3Config
    from gemma3vl.infer.sampling_defaults import resolve_sampling
    from gemma3vl.tiny import tiny_hf_config

    config = Gemma3Config.from_hf_dict(tiny_hf_config())
    with pytest.raises(Gemma3VLError, match=r"generation_config.json: top_p='0.9' is not a number"):
        resolve_sampling({"do_sample": True, "top_p": "0.9"}, config, max_new_tokens=4)
