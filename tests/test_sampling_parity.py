"""Generation semantics against transformers, the oracle: its logits processors as ``generate`` assembles them
(``_get_logits_processor`` from a ``GenerationConfig``), its batched greedy ``generate`` with an EOS list and a
repetition penalty on left-padded rows with and without images, and the generation config values it applies.

Where transformers has no counterpart the behaviour checked is the documented one: stop strings are OpenAI's
``stop`` (looked for in the generated text only, the answer cut before the first one; transformers'
``StopStringCriteria`` also matches a stop string that starts in the prompt and never cuts), and a seeded row
draws the same tokens whatever batch it is in (not transformers' tokens for that seed: it draws with
``torch.multinomial``, we with an exponential race).
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList, TopPLogitsWarper

from gemma3vl import verify
from gemma3vl.infer.generate import (
    RowSampling,
    Sampling,
    generate,
    generate_result,
    process_logits,
    seen_tokens,
    stream_generate,
)
from gemma3vl.infer.loading import load_model
from gemma3vl.tiny import tiny_hf_config
from gemma3vl.tiny_tokenizer import write_tokenizer_and_processor
from generation_helpers import scripted

CPU = torch.device("cpu")
IMAGE_TOKEN = 9  # the tiny vocabulary's <image_soft_token>


@pytest.fixture(scope="module")
def hf_text_model():
    """A transformers model, only for its ``_get_logits_processor`` (the processors ``generate`` would run)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Gemma3ForCausalLM(Gemma3TextConfig(**tiny_hf_config(text_only=True, num_hidden_layers=1))).eval()


def hf_processors(model, s: Sampling, ids: torch.Tensor, mask: torch.Tensor) -> LogitsProcessorList:
    config = GenerationConfig(do_sample=not s.greedy, temperature=s.temperature, top_k=s.top_k or 0,
                              top_p=s.top_p if s.top_p is not None else 1.0,
                              repetition_penalty=s.repetition_penalty, min_p=s.min_p,
                              # OpenAI's logit_bias is transformers' sequence_bias with one-token sequences
                              sequence_bias=[[[token], bias] for token, bias in s.logit_bias] or None,
                              min_new_tokens=s.min_new_tokens or None, num_beams=1, num_return_sequences=1)
    if s.min_new_tokens:  # (what generate's _prepare_special_tokens sets from the EOS ids)
        config._eos_token_tensor = torch.tensor(s.stop_token_ids)
    # vLLM's allowed_token_ids is transformers' prefix_allowed_tokens_fn answering the same ids at every step
    allowed = (lambda batch_id, input_ids: list(s.allowed_token_ids)) if s.allowed_token_ids else None
    return model._get_logits_processor(generation_config=config, input_ids_seq_length=ids.shape[1],
                                       encoder_input_ids=ids, prefix_allowed_tokens_fn=allowed,
                                       logits_processor=LogitsProcessorList(), device="cpu",
                                       model_kwargs={"attention_mask": mask})


def oracle_counts_left_padding_as_seen(model) -> bool:
    """Older transformers (5.17, the GPU image's) let the repetition penalty count a left-padded prompt's <pad>
    tokens as already seen; newer ones (5.24) leave the padding out, as we do. An older oracle is shown the
    padding as a token the row has anyway (its last prompt token), so that it sees what we do."""
    ids, mask = torch.tensor([[0, 0, 5]]), torch.tensor([[0, 0, 1]])
    processors = hf_processors(model, Sampling(greedy=True, repetition_penalty=2.0), ids, mask)
    return bool(processors(ids, torch.ones(1, 8))[0, 0] != 1.0)


def random_case(rng: random.Random, generator: torch.Generator, vocab: int) -> torch.Tensor:
    """[V] logits: Gaussian, or small integers (many ties at every cut), some -inf (a masked vocabulary)."""
    if rng.random() < 0.4:
        logits = torch.randint(-3, 4, (vocab,), generator=generator).float() * rng.choice([0.5, 1.0, 2.0])
    else:
        logits = torch.randn(vocab, generator=generator) * rng.choice([0.5, 3.0, 10.0])
    if rng.random() < 0.3:
        logits[torch.rand(vocab, generator=generator) < 0.3] = float("-inf")
        logits[rng.randrange(vocab)] = 0.0
    return logits


def random_logit_bias(rng: random.Random, vocab: int) -> tuple[tuple[int, float], ...]:
    """No bias (most rows), or a few tokens biased by -100 (banned), +100 (all but forced) or amounts in between."""
    if rng.random() < 0.6:
        return ()
    tokens = rng.sample(range(vocab), rng.randint(1, min(5, vocab)))
    return tuple(sorted((token, rng.choice([-100.0, 100.0, -2.5, 0.75, 7.0, 0.0])) for token in tokens))


def test_processed_logits_equal_transformers_processors_bitwise(hf_text_model):
    """Logit bias (OpenAI's; transformers' one-token ``sequence_bias``: up to +-100, on tokens the other steps then
    filter or penalise), repetition penalty (prompt with left padding and image soft tokens, then generated
    tokens), temperature (down to 0.05: probabilities that underflow to 0), top-k and top-p with ties at both
    cuts, min-p after them (up to 1: only the likeliest tokens left), the stop tokens of a row short of its
    ``min_new_tokens`` masked (``MinNewTokensLengthLogitsProcessor``: at the first step, at the second, or not),
    vLLM's ``allowed_token_ids`` (transformers' ``PrefixConstrainedLogitsProcessor`` with the same ids each step),
    -inf logits, the off values (top_k >= V, top_p = 1, temperature 1, penalty 1): each row of our one
    vectorised pass equals, bit for bit, the processors transformers' ``generate`` assembles from the same
    ``GenerationConfig``."""
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    padding_seen = oracle_counts_left_padding_as_seen(hf_text_model)
    for case in range(150):
        vocab, batch = rng.choice([12, 40, 300]), rng.choice([1, 3])
        settings = [Sampling(greedy=rng.random() < 0.15,
                             temperature=rng.choice([1.0, 0.7, 1.3, 0.05, 2.0]),
                             top_k=rng.choice([None, 1, 2, 3, 5, 10, vocab, vocab + 5]),
                             top_p=rng.choice([None, 1.0, 0.95, 0.9, 0.5, 0.3, 0.1]),
                             min_p=rng.choice([None, None, 0.0, 0.05, 0.2, 0.5, 1.0]),
                             repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.7, 2.0]),
                             logit_bias=random_logit_bias(rng, vocab),
                             min_new_tokens=rng.choice([0, 0, 1, 2]),
                             stop_token_ids=tuple(rng.sample(range(vocab), rng.randint(1, 3))),
                             allowed_token_ids=rng.choice([(), (), tuple(sorted(rng.sample(range(vocab), 4)))]))
                    for _ in range(batch)]
        width = rng.randint(2, 10)
        ids = torch.randint(0, vocab, (batch, width), generator=generator)
        ids[:, -1] = IMAGE_TOKEN
        mask = torch.ones_like(ids)
        for row in range(batch):
            pad = rng.randint(0, width - 1)
            ids[row, :pad], mask[row, :pad] = 0, 0  # left padding: <pad> is not "already seen"
        rows = RowSampling.from_samplings(settings, vocab, CPU)
        seen = seen_tokens(ids, mask, vocab) if rows.any_penalty else None
        processors = [hf_processors(hf_text_model, s, ids[row:row + 1], mask[row:row + 1])
                      for row, s in enumerate(settings)]
        sequence = ids
        for step in range(2):  # the prompt, then the prompt and one generated token
            logits = torch.stack([random_case(rng, generator, vocab) for _ in range(batch)])
            for row, s in enumerate(settings):  # (a row left with no finite logit at all has no answer to compare)
                if s.allowed_token_ids and logits[row, list(s.allowed_token_ids)].isinf().all():
                    logits[row, s.allowed_token_ids[0]] = 0.0
            got = process_logits(logits.clone(), rows, seen, answers=sequence[:, width:].tolist())
            for row in range(batch):
                shown = sequence[row:row + 1]
                if padding_seen:  # (an older oracle) its padding holds a token the row has seen anyway
                    shown = shown.clone()
                    shown[0, :width][mask[row] == 0] = ids[row, -1]
                expected = processors[row](shown, logits[row:row + 1].clone())[0]
                assert torch.equal(got[row], expected), (case, settings[row], got[row], expected)
            new = got.argmax(dim=-1)
            if seen is not None:
                seen.scatter_(1, new[:, None], True)
            sequence = torch.cat([sequence, new[:, None]], dim=1)


def test_bad_words_ban_as_transformers_no_bad_words_processor_over_the_answer():
    """``bad_words_ids`` (vLLM's ``bad_words`` once tokenized) against transformers' ``NoBadWordsLogitsProcessor``
    run over the answer alone (vLLM looks at the answer's tokens, not the prompt's): random answers and banned
    sequences of one to three tokens over a four-token alphabet (so that they often match), on rows with and
    without bad words in one batch, with random logits: every row's scores equal transformers', bit for bit."""
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor

    rng, generator = random.Random(1), torch.Generator().manual_seed(1)
    vocab, outside = 12, 11  # (the answers' tokens and the bad words' are < 4: the token before each answer is not)
    for case in range(200):
        batch = rng.choice([1, 3])
        bad = [tuple({tuple(rng.randrange(4) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))})
               if rng.random() < 0.8 else () for _ in range(batch)]
        rows = RowSampling.from_samplings([Sampling(bad_words_ids=words) for words in bad], vocab, CPU)
        answers = [[rng.randrange(4) for _ in range(rng.randint(0, 5))] for _ in range(batch)]
        logits = torch.stack([random_case(rng, generator, vocab) for _ in range(batch)])
        got = process_logits(logits.clone(), rows, answers=answers)
        for row, words in enumerate(bad):
            expected = logits[row:row + 1].clone()
            if words:
                shown = torch.tensor([[outside, *answers[row]]])
                expected = NoBadWordsLogitsProcessor([list(w) for w in words], eos_token_id=outside)(shown, expected)
            assert torch.equal(got[row], expected[0]), (case, words, answers[row])


def test_top_p_cuts_at_one_minus_p_worked_out_in_float64():
    """transformers compares the float32 tail mass with the Python float ``1 - top_p`` (cast to float32:
    0.1 for top_p 0.9), not with float32(1) - float32(0.9) (0.100000024): a tail of mass 0.10000001 stays."""
    logits = torch.tensor([[-2.1972243785858154, 0.0]])
    expected = TopPLogitsWarper(0.9)(None, logits.clone())
    assert torch.isfinite(expected).all()
    rows = RowSampling.from_samplings([Sampling(greedy=False, top_p=0.9)], 2, CPU)
    assert torch.equal(process_logits(logits.clone(), rows), expected)


def test_generation_config_repetition_penalty_applies_as_in_transformers():
    """transformers' ``generate`` applies a ``repetition_penalty`` from generation_config.json (greedy too); so
    does our default sampling. Absent or null: 1.0, its global default."""
    from gemma3vl.config import Gemma3Config
    from gemma3vl.infer.sampling_defaults import resolve_sampling

    config = Gemma3Config.from_hf_dict(tiny_hf_config())
    for given in ({"repetition_penalty": 1.2}, {"do_sample": True, "repetition_penalty": 0.9},
                  {"repetition_penalty": None}, {}):
        theirs = GenerationConfig(**given)
        theirs.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
        ours = resolve_sampling(given, config, max_new_tokens=4)
        assert ours.repetition_penalty == theirs.repetition_penalty, given
        assert ours.greedy == (not theirs.do_sample)


# ------------------------------------------------------------------------- greedy generate, batched, vs HF
@pytest.fixture
def vl(hf_checkpoint):
    directory, reference = hf_checkpoint()
    write_tokenizer_and_processor(directory, tiny_hf_config())
    ours, config = load_model(directory, device=CPU, dtype=torch.float32)
    return reference, ours, config


def hf_batched(reference, config, batch, new_tokens, eos, **settings):
    """transformers' greedy ``generate`` on the left-padded batch; each row's new tokens up to its first EOS."""
    generation = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=list(eos),
                                  pad_token_id=config.text.pad_token_id, **settings)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = reference.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 token_type_ids=(batch["input_ids"] == config.image_token_id).long(),
                                 pixel_values=batch["pixel_values"], generation_config=generation)
    rows = []
    for tokens in out[:, batch["input_ids"].shape[1]:].tolist():
        ends = [i for i, t in enumerate(tokens) if t in eos]
        rows.append(tokens[:ends[0] + 1] if ends else tokens)
    return rows


@pytest.mark.parametrize("penalty", [1.0, 1.6])
def test_batched_greedy_with_an_eos_list_equals_transformers(vl, penalty):
    """Three left-padded rows of different lengths (2, 1 and 0 images): with an EOS list one row ends early (its
    EOS kept, nothing after it) while the others go on unchanged to exactly ``max_new_tokens``; with a repetition
    penalty too (transformers 5 leaves the left padding out of it, as we do)."""
    reference, ours, config = vl
    batch = verify.synthetic_batch(config)
    args = dict(attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    free = generate(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=10, repetition_penalty=penalty),
                    **args)
    assert free == hf_batched(reference, config, batch, 10, eos=[], repetition_penalty=penalty)
    # row 1 ends at its 4th token; the last allowed token of row 0 also stops it, exactly at the limit
    eos = (*config.stop_token_ids, free[1][3], free[0][9])
    result = generate_result(ours, batch["input_ids"], **args,
                             sampling=Sampling(max_new_tokens=10, repetition_penalty=penalty, stop_token_ids=eos))
    expected = hf_batched(reference, config, batch, 10, eos=eos, repetition_penalty=penalty)
    assert result.tokens == expected
    for row, tokens in enumerate(result.tokens):
        assert tokens == free[row][:len(tokens)]  # a finished row changes nothing in the others
        assert result.finish_reasons[row] == ("stop" if tokens[-1] in eos else "length")
    assert len(result.tokens[1]) <= 4 and result.finish_reasons[0] == "stop" and len(result.tokens[0]) <= 10


def test_batched_greedy_with_logit_bias_equals_transformers(vl):
    """OpenAI's logit_bias against transformers' ``generate`` with the same biases as one-token ``sequence_bias``:
    three left-padded rows with images, each row's first free token banned (-100) and two tokens pushed up (the
    same settings on every row, as transformers takes them). The answers change, and equal transformers'."""
    reference, ours, config = vl
    batch = verify.synthetic_batch(config)
    args = dict(attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    free = generate(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=8), **args)
    bias = {**{row[0]: -100.0 for row in free}, 17: 4.0, 33: 2.5}
    entries = tuple(sorted(bias.items()))
    biased = generate(ours, batch["input_ids"], sampling=Sampling(max_new_tokens=8, logit_bias=entries), **args)
    expected = hf_batched(reference, config, batch, 8, eos=[],
                          sequence_bias=[[[token], value] for token, value in entries])
    assert biased == expected
    assert all(row[0] != free_row[0] for row, free_row in zip(biased, free))


def test_batched_greedy_with_min_new_tokens_equals_transformers(vl):
    """``min_new_tokens`` (vLLM's ``min_tokens``) against transformers' ``generate(min_new_tokens=...)``: a stop
    token pushed up by +100 ends every left-padded row (with images) at once, unless the row is short of its
    minimum, when its stop tokens are masked: then each row ends at exactly its minimum + 1 tokens, as in
    transformers. Per-row minimums in one batch give each row the answer of its own setting."""
    reference, ours, config = vl
    batch = verify.synthetic_batch(config)
    args = dict(attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    forced = 17
    eos = (*config.stop_token_ids, forced)
    settings = dict(max_new_tokens=8, logit_bias=((forced, 100.0),), stop_token_ids=eos)
    at_once = generate(ours, batch["input_ids"], sampling=Sampling(**settings), **args)
    assert at_once == [[forced]] * 3
    answers = {}
    for minimum in (3, 5):
        result = generate_result(ours, batch["input_ids"], sampling=Sampling(**settings, min_new_tokens=minimum),
                                 **args)
        expected = hf_batched(reference, config, batch, 8, eos=eos, sequence_bias=[[[forced], 100.0]],
                              min_new_tokens=minimum)
        assert result.tokens == expected
        assert all(len(row) == minimum + 1 and row[-1] == forced for row in result.tokens)
        assert result.finish_reasons == ["stop"] * 3
        answers[minimum] = result.tokens
    mixed = generate(ours, batch["input_ids"], **args,
                     sampling=[Sampling(**settings, min_new_tokens=m) for m in (5, 0, 3)])
    assert mixed == [answers[5][0], at_once[1], answers[3][2]]


# ------------------------------------------------------------------------------------------ stop strings
@pytest.mark.parametrize("stops, prompt, ends_after, text", [
    # split over the tokens 't' '.' ' ' 'E': stops at 'E', the stop string cut from the text
    (("t. E",), "hi", 10, "the cat sa"),
    # in the prompt only ("XYZ"), or across the prompt's end and the first new token ("hit"): no stop
    (("XYZ", "hit"), "XYZ hi", None, "the cat sat. END here"),
    # overlapping: ". E" completes first (at 'E'), before "t. END" would (at 'D')
    (("t. END", ". E"), "hi", 10, "the cat sat"),
    # two completing at the same token: cut before the one that starts first
    ((". E", "sat. E"), "hi", 10, "the cat "),
    # completed by the last allowed token: a stop, not the length
    (("here",), "hi", 14, "the cat sat. END "),
])
def test_stop_strings(tiny_decoding, monkeypatch, stops, prompt, ends_after, text):
    model, tokenizer = tiny_decoding
    script = tokenizer.encode("the cat sat. END here", add_special_tokens=False)  # 15 tokens, one piece each
    assert [tokenizer.decode([t]) for t in script[8:12]] == [".", " ", "E", "N"]
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=True)])
    sampling = Sampling(max_new_tokens=len(script), stop_strings=stops)
    scripted(monkeypatch, [script])
    result = generate_result(model, ids, sampling=sampling, tokenizer=tokenizer)
    count = len(script) if ends_after is None else ends_after + 1
    assert result.tokens == [script[:count]]  # the tokens of the stop string kept, as transformers keeps them
    assert result.texts == [text]
    assert result.finish_reasons == ["length" if ends_after is None else "stop"]
    monkeypatch.undo()
    scripted(monkeypatch, [script])
    deltas = [event.text_delta for event in stream_generate(model, ids, sampling=sampling, tokenizer=tokenizer)]
    assert "".join(deltas) == text and len(deltas) == count  # streaming never hands out a piece of a stop


# ------------------------------------------------------------------------------------------------ seeds
def test_a_seeded_row_draws_the_same_tokens_in_any_batch(vl):
    """What holds: a seeded row's tokens depend on its prompt, settings and seed, not on its neighbours (greedy,
    unseeded ones drawing from torch's global generator, ones ending early) nor on their number. What does not:
    equality with transformers' sampled tokens for the same seed, or with another device's."""
    _, ours, config = vl
    batch = verify.synthetic_batch(config)
    args = dict(attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
    seeded = Sampling(max_new_tokens=8, greedy=False, temperature=1.5, top_k=40, top_p=0.95, seed=11)
    neighbours = [
        [Sampling(max_new_tokens=8), Sampling(max_new_tokens=3)],
        [Sampling(max_new_tokens=8, greedy=False, temperature=2.0), Sampling(max_new_tokens=2, greedy=False)],
        [seeded, Sampling(max_new_tokens=8, greedy=False, seed=11, repetition_penalty=1.3)],
    ]
    runs = [generate(ours, batch["input_ids"], sampling=[*others, seeded], **args)[2] for others in neighbours]
    keep = batch["attention_mask"][2].bool()
    alone = generate(ours, batch["input_ids"][2][keep][None], sampling=seeded)[0]  # row 2 has no image
    assert runs == [alone] * 3
    assert generate(ours, batch["input_ids"][2][keep][None], sampling=Sampling(max_new_tokens=8))[0] != alone
