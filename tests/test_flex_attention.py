"""FlexAttention (``gemma3vl.model.flex``) against SDPA with ``dense_mask`` on the CPU.

The oracle is the dense rule of ``attention.py`` (itself pinned to transformers' masks by test_mask.py and the
parity tests). On the CPU FlexAttention runs its eager (dense, unfused) form and has no backward in this torch
("FlexAttention does not support backward on CPU"), so everything here is forward only; the bf16 forward *and
backward* agreement on the GPU is ``benchmarks/train_step.py``'s flex check. The tile structure of the BlockMask
(empty / partial / full tiles, which only the GPU kernels use) is checked here against the dense rule directly.

Block size 16 on sequences of 37..150 tokens: several tiles, and lengths that are not a multiple of it.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from gemma3vl.data.batch import Sample
from gemma3vl.data.collate import collate_packed
from gemma3vl.errors import Gemma3VLError
from gemma3vl.model.attention import TokenInfo, attend, dense_mask
from gemma3vl.model.flex import attend_flex, block_mask, use_flex

BLOCK = 16

warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


def random_row(generator: torch.Generator, length: int, *, max_segments: int, padding: int, images: bool):
    """One packed row: segments of random lengths (positions restart), random image runs inside each segment,
    then ``padding`` padding tokens."""
    used = length - padding
    cuts = sorted(torch.randperm(used - 1, generator=generator)[: max_segments - 1].add(1).tolist())
    bounds = [0, *cuts, used]
    positions = torch.zeros(length, dtype=torch.long)
    segments = torch.zeros(length, dtype=torch.long)
    blocks = torch.full((length,), -1, dtype=torch.long)
    next_block = 0
    for segment, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
        positions[start:end] = torch.arange(end - start)
        segments[start:end] = segment
        cursor = start + 1
        while images and cursor + 3 < end:  # several image runs per segment, text in between
            run = int(torch.randint(2, 9, (1,), generator=generator))
            gap = int(torch.randint(1, 6, (1,), generator=generator))
            stop = min(cursor + run, end - 1)
            blocks[cursor:stop] = next_block
            next_block += 1
            cursor = stop + gap
    return positions, segments, blocks


def random_info(seed: int, batch: int, length: int, *, images: bool = True) -> TokenInfo:
    generator = torch.Generator().manual_seed(seed)
    rows = [random_row(generator, length, max_segments=4, padding=(7 * b) % 13, images=images) for b in range(batch)]
    return TokenInfo(*(torch.stack(parts) for parts in zip(*rows)))


def random_qkv(seed: int, batch: int, heads: int, kv_heads: int, q_len: int, k_len: int, head_dim: int = 16):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator)
    return q, k, v


def take(info: TokenInfo, index: torch.Tensor) -> TokenInfo:
    """The description of the tokens ``index`` [B, n] (per row), in that order."""
    return TokenInfo(*(t.gather(1, index) for t in (info.positions, info.segment_ids, info.image_block_ids)))


def live_rows(queries: TokenInfo) -> torch.Tensor:
    """[B, Tq]: the queries that have an allowed key. In these tests every real query's own key is among the keys,
    so these are the real tokens; padding queries have none (dense_mask opens their rows, flex gives 0)."""
    return queries.segment_ids != 0


def assert_flex_equals_sdpa(queries: TokenInfo, keys: TokenInfo, q, k, v, window) -> torch.Tensor:
    expected = attend(q, k, v, dense_mask(queries, keys, window), 0.37)
    got = attend_flex(q, k, v, block_mask(queries, keys, window, BLOCK), 0.37)
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    live = live_rows(queries)
    torch.testing.assert_close(got.transpose(1, 2)[live], expected.transpose(1, 2)[live], rtol=1e-5, atol=1e-5)
    assert (got.transpose(1, 2)[~live] == 0).all()
    return got


@pytest.mark.parametrize("window", [None, 5, 24])
@pytest.mark.parametrize("seed", [0, 1])
def test_packed_rows_with_images_match_sdpa(seed, window):
    """Several segments per row, several image blocks per segment, padding, GQA 4:2, T = 150 (not a multiple
    of the tile); windows shorter than an image run (5), and of a few tiles (24)."""
    info = random_info(seed, batch=3, length=150)
    assert (info.segment_ids == 0).any() and (info.image_block_ids >= 0).sum() > 20
    q, k, v = random_qkv(seed, 3, 4, 2, 150, 150)
    assert_flex_equals_sdpa(info, info, q, k, v, window)


@pytest.mark.parametrize("window", [None, 9])
def test_query_slice_against_all_keys_in_a_permuted_order(window):
    """Context-parallel-like: the queries are one slice of the sequence, the keys are all of it in a shuffled
    order (with their values shuffled alike). The result must be the slice of the full-sequence result: the mask is
    decided from the per-token description, never from index order."""
    batch, length = 2, 101
    info = random_info(5, batch, length)
    q, k, v = random_qkv(5, batch, 4, 2, length, length)
    full = attend(q, k, v, dense_mask(info, info, window), 0.37)

    generator = torch.Generator().manual_seed(6)
    order = torch.stack([torch.randperm(length, generator=generator) for _ in range(batch)])  # [B, Tk]
    keys = take(info, order)
    gather = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
    k_perm, v_perm = k.gather(2, gather), v.gather(2, gather)
    start, stop = 37, 74  # Tq = 37 != Tk = 101
    queries = TokenInfo(info.positions[:, start:stop], info.segment_ids[:, start:stop],
                        info.image_block_ids[:, start:stop])
    q_slice = q[:, :, start:stop]
    got = assert_flex_equals_sdpa(queries, keys, q_slice, k_perm, v_perm, window)
    live = live_rows(queries)
    torch.testing.assert_close(got.transpose(1, 2)[live], full[:, :, start:stop].transpose(1, 2)[live],
                               rtol=1e-5, atol=1e-5)


def test_tiles_cover_the_rule():
    """The BlockMask's tiles (what the GPU kernels skip or run without a mask) against the dense rule: every tile
    with an allowed pair is present, and every tile marked full has all its pairs allowed. Tq != Tk, ragged ends.
    (A tile may be present with no allowed pair: the classification works from per-tile ranges and is exact away
    from conversation boundaries; ``test_tile_classes_are_nearly_exact_on_long_conversations`` bounds the rest.)"""
    info = random_info(3, batch=2, length=150)
    queries = TokenInfo(info.positions[:, 20:], info.segment_ids[:, 20:], info.image_block_ids[:, 20:])
    for window in (None, 11):
        mask = block_mask(queries, info, window, BLOCK)
        rule = dense_mask(queries, info, window)[:, 0] & live_rows(queries)[:, :, None]  # [B, Tq, Tk]
        batch, q_len, k_len = rule.shape
        q_tiles, k_tiles = -(-q_len // BLOCK), -(-k_len // BLOCK)
        allowed = torch.zeros(batch, q_tiles * BLOCK, k_tiles * BLOCK, dtype=torch.bool)
        allowed[:, :q_len, :k_len] = rule
        in_range = torch.zeros_like(allowed)
        in_range[:, :q_len, :k_len] = True
        per_tile = lambda m: m.unflatten(1, (q_tiles, BLOCK)).unflatten(3, (k_tiles, BLOCK))  # noqa: E731
        any_allowed = per_tile(allowed).any(4).any(2)  # [B, qt, kt]
        # Out-of-range pairs of a ragged edge tile do not count: the kernels mask them themselves.
        all_allowed = per_tile(allowed | ~in_range).all(4).all(2)
        present = mask.to_dense()[:, 0, :q_tiles, :k_tiles].bool()  # partial and full tiles
        full = torch.zeros_like(present)
        for b in range(batch):
            for row in range(q_tiles):
                count = int(mask.full_kv_num_blocks[b, 0, row])
                full[b, row, mask.full_kv_indices[b, 0, row, :count]] = True
        assert not (any_allowed & ~present).any()
        assert not (full & ~all_allowed).any()
        assert (present & ~full).any()
        if window is None:  # a window of 11 never covers a whole 16 x 16 tile
            assert full.any(), "no full tiles: the kernels would evaluate the mask everywhere"


@pytest.mark.parametrize("window", [None, 40])
def test_tile_classes_are_nearly_exact_on_long_conversations(monkeypatch, window):
    """On packed rows of conversations much longer than a tile (the training case), the tiles built from per-tile
    ranges are those of torch's ``create_block_mask``, which evaluates the rule on every pair, but for a few
    tiles at conversation boundaries that are kept (partial) where no pair is allowed: never one fewer, never a
    full tile that is not full."""
    info = random_info(11, batch=2, length=600, images=True)
    generator = torch.Generator().manual_seed(5)
    rows = [random_row(generator, 600, max_segments=3, padding=pad, images=True) for pad in (0, 37)]
    info = TokenInfo(*(torch.stack(parts) for parts in zip(*rows)))
    ours = block_mask(info, info, window, BLOCK)
    monkeypatch.setenv("GEMMA3VL_BLOCK_MASK", "torch")
    exact = block_mask(info, info, window, BLOCK)

    def tiles(mask):
        present = mask.to_dense()[:, 0].bool()
        full = torch.zeros_like(present)
        for b in range(present.shape[0]):
            for row in range(present.shape[1]):
                count = int(mask.full_kv_num_blocks[b, 0, row])
                full[b, row, mask.full_kv_indices[b, 0, row, :count]] = True
        return present, full

    (present, full), (present_exact, full_exact) = tiles(ours), tiles(exact)
    assert not (present_exact & ~present).any() and not (full & ~full_exact).any()
    extra = int((present & ~present_exact).sum())
    assert extra <= 0.03 * int(present_exact.sum()), (extra, int(present_exact.sum()))
    assert int(full.sum()) >= 0.9 * int(full_exact.sum())


def test_backend_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_flex("auto", cpu, 512)
    assert use_flex("auto", cuda, 512)
    assert use_flex("flex", cpu, 512)
    assert not use_flex("sdpa", cuda, 512)
    assert not use_flex("flex", cuda, 1)  # a decode step's mask is one row
    with pytest.raises(Gemma3VLError, match="attention backend 'dense'"):
        use_flex("dense", cpu, 8)


def test_training_setting():
    from gemma3vl.train.config import build_config
    from gemma3vl.train.run import set_attention

    cfg = build_config("tiny_sft")
    assert cfg.model.attention == "auto"  # flex on CUDA, sdpa on the CPU
    model = torch.nn.Module()
    model.text = torch.nn.Module()
    set_attention(model, cfg, torch.device("cpu"))
    assert model.text.attention_backend == "auto"
    with pytest.raises(Gemma3VLError, match="model.attention='dense' is not one of auto, sdpa, flex"):
        build_config("tiny_sft", overrides=["model.attention=dense"])
    cfg = build_config("tiny_sft", overrides=["model.attention=flex"])
    with pytest.raises(Gemma3VLError, match="trains on CUDA only"):
        set_attention(model, cfg, torch.device("cpu"))


def test_flex_refuses_to_train_on_the_cpu():
    info = random_info(0, batch=1, length=40)
    q, k, v = random_qkv(0, 1, 4, 2, 40, 40)
    with pytest.raises(Gemma3VLError, match="model.attention=auto or sdpa"):
        attend_flex(q.requires_grad_(), k, v, block_mask(info, info, None, BLOCK), 1.0)


# ------------------------------------------------------------------------------------------------ whole model
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from gemma3vl.infer.loading import load_model
    from gemma3vl.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=3)
    model, config = load_model(path, device="cpu", dtype=torch.float32)
    return model.eval(), config


def image_sample(config, generator: torch.Generator, text_before: int, text_after: int, images: int) -> Sample:
    """``<bos>`` text, then ``images`` x (``<boi>`` soft tokens ``<eoi>`` text); labels on the text after images."""
    low, high = 20, config.text.vocab_size
    ids, labels = [config.text.bos_token_id], [-100]
    ids += torch.randint(low, high, (text_before,), generator=generator).tolist()
    labels += [-100] * text_before
    for _ in range(images):
        block = [config.boi_token_id] + [config.image_token_id] * config.mm_tokens_per_image + [config.eoi_token_id]
        after = torch.randint(low, high, (text_after,), generator=generator).tolist()
        ids += block + after
        labels += [-100] * len(block) + after
    size = config.vision.image_size
    pixels = torch.rand(images, 3, size, size, generator=generator) * 2 - 1 if images else None
    return Sample(torch.tensor(ids), torch.tensor(labels), pixels, source=f"drawn:{len(ids)}")


def test_whole_model_loss_and_logits_flex_equal_sdpa_on_a_packed_batch(tiny_model):
    """The tiny model (window 8, GQA 4:2) on two packed rows of 77 tokens: three conversations with one or two
    images each in the first row, one conversation and padding in the second. flex equals sdpa, and the packed
    loss is the sum of the conversations' losses each computed alone (no attention across conversations)."""
    model, config = tiny_model
    generator = torch.Generator().manual_seed(0)
    rows = [
        [image_sample(config, generator, 3, 9, 2), image_sample(config, generator, 2, 5, 1),
         image_sample(config, generator, 4, 11, 1)],
        [image_sample(config, generator, 5, 14, 2)],
    ]
    batch = collate_packed(rows, 77, config.text.pad_token_id, image_token_id=config.image_token_id)
    assert (batch.info.segment_ids == 0).any() and int(batch.info.segment_ids.max()) == 3
    results = {}
    with torch.no_grad():
        for backend in ("sdpa", "flex"):
            model.text.attention_backend = backend
            model.text.flex_block_size = BLOCK
            loss, count = model.loss(batch.input_ids, batch.targets, batch.info, batch.pixel_values)
            hidden = model.hidden_states(batch.input_ids, batch.pixel_values, info=batch.info)
            results[backend] = (loss, count, hidden)
        # Packing itself: each conversation alone (its own row, its own images) gives its share of the packed loss.
        model.text.attention_backend = "flex"
        alone = [model.loss(b.input_ids, b.targets, b.info, b.pixel_values)
                 for b in (collate_packed([[sample]], len(sample), config.text.pad_token_id,
                                          image_token_id=config.image_token_id) for row in rows for sample in row)]
    model.text.attention_backend = "sdpa"
    assert results["flex"][1] == results["sdpa"][1] > 0
    torch.testing.assert_close(results["flex"][0], results["sdpa"][0], rtol=1e-5, atol=1e-5)
    real = batch.info.segment_ids != 0
    torch.testing.assert_close(results["flex"][2][real], results["sdpa"][2][real], rtol=1e-4, atol=1e-4)
    assert sum(count for _, count in alone) == results["flex"][1]
    torch.testing.assert_close(sum(loss for loss, _ in alone), results["flex"][0], rtol=1e-5, atol=1e-4)


def test_prefill_after_a_cache_matches_one_pass(tiny_model):
    """A KV cache continuation (queries: the new chunk; keys: cached + new, Tq != Tk) under flex gives the
    one-pass hidden states, past the sliding window."""
    from gemma3vl.infer.cache import KVCache

    model, config = tiny_model
    generator = torch.Generator().manual_seed(1)
    sample = image_sample(config, generator, 3, 12, 2)
    ids, pixels = sample.input_ids[None], sample.pixel_values
    info = TokenInfo.for_tokens(ids, image_token_id=config.image_token_id)
    split = 21  # after both images: the second chunk is text only
    assert ids.shape[1] - split > config.text.sliding_window
    model.text.attention_backend = "flex"
    model.text.flex_block_size = BLOCK
    try:
        with torch.no_grad():
            whole = model.hidden_states(ids, pixels, info=info)
            embeds = model.embed(ids, pixels)
            cache = KVCache(config.text)
            first = model.text(embeds[:, :split], take(info, torch.arange(split)[None]), cache)
            second = model.text(embeds[:, split:], take(info, torch.arange(split, ids.shape[1])[None]), cache)
    finally:
        model.text.attention_backend = "sdpa"
    torch.testing.assert_close(torch.cat((first, second), 1), whole, rtol=1e-4, atol=1e-4)


def test_long_prompts_prefill_with_flex_on_a_gpu(monkeypatch):
    """Prefill picks FlexAttention for prompts from GEMMA3VL_FLEX_PREFILL_MIN_TOKENS tokens on (default 32,768) on
    CUDA, where SDPA's dense mask would take gigabytes; shorter prompts and the CPU keep the decoder's setting."""
    from gemma3vl.infer.decode import FLEX_PREFILL_MIN_TOKENS, prefill_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert FLEX_PREFILL_MIN_TOKENS == 32768
    assert prefill_backend(32768, cuda) == "flex" and prefill_backend(131072, cuda) == "flex"
    assert prefill_backend(32767, cuda) is None and prefill_backend(131072, cpu) is None
    monkeypatch.setenv("GEMMA3VL_FLEX_PREFILL_MIN_TOKENS", "100")
    assert prefill_backend(100, cuda) == "flex"
    monkeypatch.setenv("GEMMA3VL_FLEX_PREFILL_MIN_TOKENS", "0")
    assert prefill_backend(131072, cuda) is None


def test_generate_with_a_flex_prefill_gives_the_sdpa_tokens(tiny_model, monkeypatch):
    """The per-call backend reaches the decoder: generation whose prefill runs FlexAttention (forced here on the
    CPU, where its forward runs) gives the same greedy tokens and prefill logits as the SDPA prefill, with images
    and a prompt past the sliding window."""
    import gemma3vl.infer.decode as decode
    from gemma3vl.infer.generate import generate
    from gemma3vl.infer.sampling import Sampling

    model, config = tiny_model
    generator = torch.Generator().manual_seed(4)
    sample = image_sample(config, generator, 3, 12, 2)
    ids, pixels = sample.input_ids[None], sample.pixel_values
    assert ids.shape[1] > config.text.sliding_window
    sampling = Sampling(max_new_tokens=6)
    plain = generate(model, ids, pixel_values=pixels, sampling=sampling)
    chosen = []

    def flex_always(length, device):
        chosen.append(length)
        return "flex"

    monkeypatch.setattr(decode, "prefill_backend", flex_always)
    import gemma3vl.model.text as text_module

    flex_calls = []

    def counting_attend_flex(*args, **kwargs):
        flex_calls.append(1)
        return attend_flex(*args, **kwargs)

    monkeypatch.setattr(text_module, "attend_flex", counting_attend_flex)
    model.text.flex_block_size = BLOCK
    with torch.no_grad():
        flex_logits = model(ids, pixels, logits_to_keep=1, attention_backend="flex")
        sdpa_logits = model(ids, pixels, logits_to_keep=1)
    flexed = generate(model, ids, pixel_values=pixels, sampling=sampling)
    assert chosen == [ids.shape[1]] and model.text.attention_backend == "sdpa"  # per call, not left behind
    layers = config.text.num_hidden_layers
    assert len(flex_calls) == 2 * layers  # the direct forward and generate's prefill; decode steps take SDPA
    torch.testing.assert_close(flex_logits, sdpa_logits, rtol=1e-4, atol=1e-4)
    assert flexed == plain and len(plain[0]) == 6


def test_per_block_compile_with_flex_matches_eager_sdpa(tmp_path):
    """``parallel.apply_compile`` (each block compiled, fullgraph) with FlexAttention traced into the blocks gives
    the eager SDPA hidden states. This caught inductor mis-reading q/k/v as strided views of the fused QKV
    projection (now made contiguous in ``attend_flex``). Forward only (CPU); ~30 s of compiling."""
    from gemma3vl.infer.loading import load_model
    from gemma3vl.parallel.activation import apply_compile
    from gemma3vl.tiny import write_tiny_checkpoint

    model, config = load_model(write_tiny_checkpoint(tmp_path / "tiny", seed=3), device="cpu", dtype=torch.float32)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    rows = [[image_sample(config, generator, 3, 9, 2), image_sample(config, generator, 2, 5, 1)],
            [image_sample(config, generator, 5, 14, 2)]]
    batch = collate_packed(rows, 77, config.text.pad_token_id, image_token_id=config.image_token_id)
    real = batch.info.segment_ids != 0
    with torch.no_grad():
        model.text.attention_backend = "sdpa"
        expected = model.hidden_states(batch.input_ids, batch.pixel_values, info=batch.info)
        apply_compile(model)
        model.text.attention_backend = "flex"
        model.text.flex_block_size = BLOCK
        got = model.hidden_states(batch.input_ids, batch.pixel_values, info=batch.info)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)


def test_kernel_options_come_from_the_environment_and_bad_ones_are_named(monkeypatch):
    from gemma3vl.model.flex import KERNEL_OPTIONS_ENV, kernel_options

    monkeypatch.delenv(KERNEL_OPTIONS_ENV, raising=False)
    assert kernel_options() is None
    monkeypatch.setenv(KERNEL_OPTIONS_ENV, '{"bwd_BLOCK_M1": 32, "bwd_num_warps": 4}')
    assert kernel_options() == {"bwd_BLOCK_M1": 32, "bwd_num_warps": 4}
    for bad, message in (("{bwd_BLOCK_M1: 32}", "not JSON"), ("[32]", "expected a JSON object")):
        monkeypatch.setenv(KERNEL_OPTIONS_ENV, bad)
        with pytest.raises(Gemma3VLError, match=f"{KERNEL_OPTIONS_ENV}=.*{message}"):
            kernel_options()
