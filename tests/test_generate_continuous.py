"""Continuous batching (``infer/engine.py``): requests that join a running batch between decode steps, in slots
freed by others, get exactly the answer ``generate`` gives each of them alone.

The oracle is ``generate`` on one unpadded prompt (itself checked against transformers' ``generate`` in
``test_generate_engine.py``), on the tiny fp32 model: greedy, seeded sampling and repetition penalty, prompts of
different lengths with 0, 1 or 2 images, arriving at different steps, more requests than slots.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.cache import SlotKVCache, StaticKVCache
from gemma3vl.infer.completion import Row
from gemma3vl.infer.engine import ContinuousBatcher
from gemma3vl.infer.generate import generate
from gemma3vl.infer.runtime import InferenceRuntime
from gemma3vl.pictures import draw_picture
from gemma3vl.tiny import write_tiny_checkpoint


def alone(runtime, prompt, sampling, max_new_tokens):
    """(tokens, text) of ``generate`` for this one prompt."""
    tokens = generate(runtime.model, prompt.input_ids[None], pixel_values=prompt.pixel_values,
                      sampling=replace(sampling, max_new_tokens=max_new_tokens))[0]
    stop = set(sampling.stop_token_ids)
    return tokens, runtime.tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=True)


def test_rows_joining_and_leaving_get_their_solo_answers(runtime):
    red, blue = draw_picture("red circle"), draw_picture("blue square and green star")
    greedy = runtime.sampling(max_new_tokens=1, greedy=True)
    seeded = runtime.sampling(max_new_tokens=1, temperature=1.3, top_p=0.9, top_k=40, seed=11)
    penalised = replace(greedy, repetition_penalty=1.5)
    # (step at which it arrives, prompt, images, sampling, max_new_tokens)
    requests = [
        (0, "What is in the picture?", [red], greedy, 14),
        (0, "hi", [], seeded, 9),
        (2, "Describe both pictures in detail, please", [red, blue], greedy, 12),
        (3, "Question number 7", [], penalised, 10),
        (4, "Tell me a story about a blue square", [blue], seeded, 16),
        (5, "What colour is the sky", [], greedy, 5),
    ]
    engine = ContinuousBatcher(runtime.model, runtime.tokenizer, slots=3, max_length=700)
    done, streamed, waiting, step = {}, {}, list(enumerate(requests)), 0
    joined_running = 0
    while waiting or engine.active:
        while waiting and waiting[0][1][0] <= step and engine.free_slots:
            number, (_, text, images, sampling, limit) = waiting.pop(0)
            streamed[number] = []
            row = Row(prompt=runtime.encode_prompt(text, images), max_new_tokens=limit,
                      on_text=streamed[number].append, on_finish=lambda c, n=number: done.__setitem__(n, c))
            joined_running += engine.active > 0
            engine.add(row, sampling, tag=number)
        engine.step()
        step += 1
    assert joined_running >= 3  # rows really joined running batches, in slots others had left
    for number, (_, text, images, sampling, limit) in enumerate(requests):
        tokens, answer = alone(runtime, runtime.encode_prompt(text, images), sampling, limit)
        assert done[number].token_ids == tokens, number
        assert done[number].text == answer and "".join(streamed[number]) == answer, number
        assert done[number].finish_reason == ("stop" if tokens[-1] in sampling.stop_token_ids else "length")


def test_slot_cache_rows_are_the_batch_one_cache(runtime):
    """``load_row`` copies a prefilled row whole; a decode step writes each row at its own column."""
    config = runtime.config.text
    slots = SlotKVCache(config, 2, 40, "cpu", torch.float32)
    ids = runtime.encode_prompt("What colour is the sky", []).input_ids[None]
    engine = ContinuousBatcher(runtime.model, runtime.tokenizer, slots=2, max_length=40)
    prefilled = slots.prefill_cache()
    assert isinstance(prefilled, StaticKVCache) and prefilled.sizes == slots.sizes and prefilled.batch_size == 1
    engine._prefill_cache = prefilled
    engine.cache = slots
    engine.add(Row(prompt=runtime.encode_prompt("hi", []), max_new_tokens=3), runtime.sampling(max_new_tokens=3,
                                                                                             greedy=True))
    engine.add(Row(prompt=runtime.encode_prompt("What colour is the sky", []), max_new_tokens=3),
               runtime.sampling(max_new_tokens=3, greedy=True))
    lengths = [runtime.encode_prompt("hi", []).length, ids.shape[1]]
    assert slots.index.tolist() == lengths
    engine.step()
    assert slots.index.tolist() == [n + 1 for n in lengths]
    full = slots.slots["full_attention"]
    for row, n in enumerate(lengths):
        assert full.segment_ids[row].nonzero().flatten().tolist() == list(range(n + 1))
        assert full.positions[row, : n + 1].tolist() == list(range(n + 1))


def test_choices_of_one_prompt_share_one_prefill(runtime, monkeypatch):
    """Rows of the same prompt object added one after another (a request's n choices) are prefilled once; each
    still gets ``generate``'s answer alone for its own seed, and another prompt in between prefills again."""
    import gemma3vl.infer.engine as engine_module

    prefills = []
    real = engine_module.prefill
    monkeypatch.setattr(engine_module, "prefill", lambda *args, **kwargs: prefills.append(1) or real(*args, **kwargs))
    picture = draw_picture("red circle")
    shared, other = runtime.encode_prompt("What is in the picture?", [picture]), runtime.encode_prompt("hi", [])
    samplings = [runtime.sampling(max_new_tokens=6, temperature=1.2, seed=seed) for seed in (1, 2, 3)]
    engine = ContinuousBatcher(runtime.model, runtime.tokenizer, slots=4, max_length=600)
    done = {}
    for number, (prompt, sampling) in enumerate([(shared, samplings[0]), (shared, samplings[1]),
                                                 (other, samplings[0]), (shared, samplings[2])]):
        engine.add(Row(prompt=prompt, max_new_tokens=6, on_finish=lambda c, n=number: done.__setitem__(n, c)),
                   sampling)
    assert len(prefills) == 3  # shared, other, shared again (the cache held other's by then)
    while engine.active:
        engine.step()
    for number, (prompt, sampling) in enumerate([(shared, samplings[0]), (shared, samplings[1]),
                                                 (other, samplings[0]), (shared, samplings[2])]):
        assert done[number].token_ids == alone(runtime, prompt, sampling, 6)[0], number


def test_limits_are_clear_errors(runtime):
    engine = ContinuousBatcher(runtime.model, runtime.tokenizer, slots=1, max_length=30)
    prompt = runtime.encode_prompt("hi", [])
    with pytest.raises(Gemma3VLError, match="over the engine's 30 positions"):
        engine.add(Row(prompt=prompt, max_new_tokens=30), runtime.sampling(max_new_tokens=1, greedy=True))
    engine.add(Row(prompt=prompt, max_new_tokens=2), runtime.sampling(max_new_tokens=1, greedy=True))
    with pytest.raises(Gemma3VLError, match="all 1 slots are taken"):
        engine.add(Row(prompt=prompt, max_new_tokens=2), runtime.sampling(max_new_tokens=1, greedy=True))


def test_slot_decode_step_traces_as_one_graph(runtime, monkeypatch):
    """On CUDA the engine's decode step over the slot cache is compiled with CUDA graphs; here dynamo must trace it
    whole (fullgraph: no break, no host sync: the per-row scatter and the index clamp included), and the traced
    engine must give the eager engine's tokens. Inductor and CUDA graphs are GPU-only (benchmarks/generate.py), so
    the engine's compiled path runs here with dynamo's eager backend standing in for inductor."""
    import gemma3vl.infer.decode as decode

    traced_calls = []

    def traced_step():
        traced = torch.compile(decode.decode_step, backend="eager", fullgraph=True, dynamic=False)

        def step(*args):
            traced_calls.append(1)
            return traced(*args)

        return step

    monkeypatch.setattr(decode, "compiles_on", lambda device: True)
    monkeypatch.setattr(decode, "compiled_decode_step", traced_step)

    prompts = [runtime.encode_prompt(text, images) for text, images in
               [("What is in the picture?", [draw_picture("red circle")]), ("hi", []), ("Question number 2", [])]]
    greedy = runtime.sampling(max_new_tokens=1, greedy=True)
    runs = []
    for traced in (False, True):
        engine = ContinuousBatcher(runtime.model, runtime.tokenizer, slots=2, max_length=300, compile=traced)
        assert engine.compiled == traced
        done = {}
        pending = list(enumerate(prompts))
        while pending or engine.active:
            if pending and engine.free_slots:
                number, prompt = pending.pop(0)
                engine.add(Row(prompt=prompt, max_new_tokens=6, on_finish=lambda c, n=number: done.__setitem__(n, c)),
                           greedy)
            engine.step()
        runs.append([done[n].token_ids for n in range(len(prompts))])
    torch._dynamo.reset()
    assert traced_calls and engine.compile_failure is None  # every traced step went through, none fell back
    assert runs[0] == runs[1]
    assert runs[0][1] == alone(runtime, prompts[1], greedy, 6)[0]


def test_engine_whose_compiling_fails_reports_once_and_serves_eagerly(runtime, failing_compiler):
    """A compiled engine whose step fails to compile (faked) says why through ``report`` at warm-up, keeps it in
    ``compile_failure`` (the server's /health shows it) and gives each row its solo answer, eagerly."""
    heard: list[str] = []
    engine = ContinuousBatcher(runtime.model, runtime.tokenizer, slots=2, max_length=300, compile=True,
                               report=heard.append)
    engine.warm_up()
    assert heard == ["RuntimeError: no triton"] and engine.compile_failure == heard[0] and not engine.compiled
    greedy = runtime.sampling(max_new_tokens=1, greedy=True)
    prompt = runtime.encode_prompt("Question number 2", [])
    done = {}
    engine.add(Row(prompt=prompt, max_new_tokens=5, on_finish=lambda c: done.setdefault(0, c)), greedy)
    while engine.active:
        engine.step()
    assert done[0].token_ids == alone(runtime, prompt, greedy, 5)[0]
    assert failing_compiler == [2] and len(heard) == 1  # the warm-up's one try; never again


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_compiled_engine_on_cuda_equals_solo_generate(tmp_path):
    """GPU only: the engine with compile=True (inductor + one CUDA graph over the slot cache, captured at warm-up)
    gives each joining row its solo eager answer, greedy and seeded, on the tiny fp32 model."""
    directory = write_tiny_checkpoint(tmp_path / "tiny")
    gpu = InferenceRuntime.load(directory, device="cuda", dtype="float32")
    greedy = gpu.sampling(max_new_tokens=1, greedy=True)
    seeded = gpu.sampling(max_new_tokens=1, temperature=1.1, top_k=40, seed=5)
    requests = [("What is in the picture?", [draw_picture("red circle")], greedy), ("hi", [], seeded),
                ("Question number 2", [], greedy), ("Tell me a story", [], seeded)]
    engine = ContinuousBatcher(gpu.model, gpu.tokenizer, slots=2, max_length=300, compile=True)
    engine.warm_up()
    done, pending = {}, list(enumerate(requests))
    while pending or engine.active:
        if pending and engine.free_slots:
            number, (text, images, sampling) = pending.pop(0)
            engine.add(Row(prompt=gpu.encode_prompt(text, images), max_new_tokens=10,
                           on_finish=lambda c, n=number: done.__setitem__(n, c)), sampling)
        engine.step()
    for number, (text, images, sampling) in enumerate(requests):
        assert done[number].token_ids == alone(gpu, gpu.encode_prompt(text, images), sampling, 10)[0], number


def test_an_ordinary_stop_token_ends_the_answer_without_its_text(runtime):
    """A stop id that is an ordinary token (not ``<eos>``/``<end_of_turn>``, which decode to nothing): the engine's
    answer is ``generate``'s, its text without the stop token's (it used to end with it), its token ids with it."""
    greedy = runtime.sampling(max_new_tokens=12, greedy=True)
    prompt = runtime.encode_prompt("Tell me a story about a blue square", [])
    free, _ = alone(runtime, prompt, greedy, 12)
    stop = next(token for token in free[2:] if runtime.tokenizer.decode([token], skip_special_tokens=True).strip())
    stopping = replace(greedy, stop_token_ids=(*greedy.stop_token_ids, stop))
    tokens, expected = alone(runtime, prompt, stopping, 12)
    assert tokens[-1] == stop
    done = {}
    engine = ContinuousBatcher(runtime.model, runtime.tokenizer, slots=1, max_length=200)
    engine.add(Row(prompt=prompt, max_new_tokens=12, on_finish=lambda c: done.setdefault("c", c)), stopping)
    while engine.active:
        engine.step()
    completion = done["c"]
    assert completion.text == expected and completion.finish_reason == "stop"
    assert completion.token_ids == list(tokens)
