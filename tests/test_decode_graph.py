"""``GEMMA3VL_DECODE_GRAPH=1``: the eager decode step captured into CUDA graphs (``decode.CapturedDecodeStep``).

No GPU here, so the CUDA graph is replaced by a stand-in with a CUDA graph's semantics where they matter to
correctness: capturing records the step without its effects (the cache is left exactly as it was), and every
replay runs the recorded step again, reading the graph's own input tensors and rewriting the one output tensor
the capture returned. Against it, ``generate`` and the server's engine must give the eager step's tokens (the
eager step being itself checked against transformers in test_generate_engine.py, on tiny random models), and a
capture that fails must cost nothing but the graph. The real capture runs in
``test_compiled_decode_on_cuda_equals_eager``'s GPU companion (benchmarks/generate.py's ``graph`` row).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import gemma3vl.infer.decode as decode
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.completion import Row
from gemma3vl.infer.engine import ContinuousBatcher
from gemma3vl.infer.generate import Sampling, generate
from gemma3vl.pictures import draw_picture


class StandInGraph:
    """A CUDA graph's behaviour, on the CPU: ``capture`` leaves every tensor it saw as it was, ``replay`` reruns."""

    captures: list["StandInGraph"] = []
    fail_capture = False

    def capture(self, step):
        if StandInGraph.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        saved = [(t, t.clone()) for t in _tensors_of(step)]
        self.output = step()
        for tensor, before in saved:  # capturing records kernels; it does not run them
            tensor.copy_(before)
        self.step = step
        StandInGraph.captures.append(self)
        return self.output

    def replay(self):
        self.output.copy_(self.step())


class StandInStream:
    pass


def _tensors_of(step):
    """Every tensor the step's closure can write: the cache's buffers (keys, values, what each column holds, the
    index). The model's weights are never written by a decode step."""
    cells = {name: cell.cell_contents for name, cell in zip(step.__code__.co_freevars, step.__closure__)}
    cache = cells["cache"]
    found = [*cache.keys, *cache.values, cache.index]
    for info in cache.slots.values():
        found += [info.positions, info.segment_ids, info.image_block_ids]
    return found


@pytest.fixture
def graphed(monkeypatch):
    """Decode steps go through CapturedDecodeStep with the stand-in graph, as GEMMA3VL_DECODE_GRAPH=1 on CUDA."""
    real = decode.CapturedDecodeStep

    class StandInCaptured(real):
        def __init__(self):
            super().__init__(StandInGraph, StandInStream)

    monkeypatch.setattr(decode, "captures_eager_step", lambda device: True)
    monkeypatch.setattr(decode, "CapturedDecodeStep", StandInCaptured)
    StandInGraph.captures, StandInGraph.fail_capture = [], False
    decode._captured.clear()
    decode._spare_caches.clear()
    return StandInGraph


def eager_generate(*args, **kwargs):
    """``generate`` with the plain eager step (whatever the test patched)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode, "captures_eager_step", lambda device: False)
        return generate(*args, **kwargs)


def prompts(runtime):
    picture = draw_picture("red circle")
    return [runtime.encode_prompt("Describe it.", [picture]), runtime.encode_prompt("Count to five.", []),
            runtime.encode_prompt("What colour is the sky? Answer in one long sentence.", [])]


def test_generate_through_the_captured_step_equals_eager(runtime, graphed):
    """Greedy and seeded rows of a left-padded batch, then a second call that reuses the borrowed cache (and
    its graph): the eager step's tokens, with one capture for the first call and none for the second."""
    prompt = prompts(runtime)[0]
    ids, pixels = prompt.input_ids[None].repeat(2, 1), prompt.pixel_values.repeat(2, 1, 1, 1)
    samplings = [Sampling(max_new_tokens=12), Sampling(max_new_tokens=12, greedy=False, seed=3, top_k=5)]
    eager = eager_generate(runtime.model, ids, pixel_values=pixels, sampling=samplings)
    decode._spare_caches.clear()
    first = generate(runtime.model, ids, pixel_values=pixels, sampling=samplings)
    assert first == eager and len(graphed.captures) == 1
    again = generate(runtime.model, ids, pixel_values=pixels, sampling=samplings)
    assert again == eager and len(graphed.captures) == 1  # the same cache: the same graph, replayed


def test_the_engine_through_the_captured_step_gives_each_request_its_solo_answer(runtime, graphed):
    """Rows joining and leaving between replays of the engine's one graph get ``generate``'s answer alone."""
    sampling = runtime.sampling(max_new_tokens=10, greedy=True)
    engine = ContinuousBatcher(runtime.model, runtime.tokenizer, slots=2, max_length=512, compile=False)
    assert engine.compiled  # a replayed graph: the engine keeps one cache for its life
    engine.warm_up()
    results = {}
    waiting = list(enumerate(prompts(runtime)))
    while waiting or engine.active:
        while waiting and engine.free_slots:
            index, prompt = waiting.pop(0)
            engine.add(Row(prompt=prompt, max_new_tokens=10,
                           on_finish=lambda done, index=index: results.__setitem__(index, done.token_ids)),
                       sampling)
        engine.step()
    assert len(graphed.captures) == 1
    for index, prompt in enumerate(prompts(runtime)):
        alone = eager_generate(runtime.model, prompt.input_ids[None], pixel_values=prompt.pixel_values,
                               sampling=replace(sampling, max_new_tokens=10))[0]
        assert results[index] == alone, index


def test_a_failed_capture_keeps_its_step_and_decodes_eagerly_after(runtime, graphed, recwarn):
    """The capture fails (an op that cannot be captured): the call's warm-up step stands (the cache moved on
    once, not twice), the rest decodes eagerly, and the reason is reported once."""
    graphed.fail_capture = True
    prompt = prompts(runtime)[1]
    decode._spare_caches.clear()
    reasons = []
    tokens = generate(runtime.model, prompt.input_ids[None], sampling=Sampling(max_new_tokens=12),
                      on_compile_failure=reasons.append)
    eager = eager_generate(runtime.model, prompt.input_ids[None], sampling=Sampling(max_new_tokens=12))
    assert tokens == eager
    assert len(reasons) == 1 and "capturing the eager step" in reasons[0] and "stream is capturing" in reasons[0]


def test_the_setting_is_read_strictly_and_needs_cuda(monkeypatch):
    monkeypatch.setenv("GEMMA3VL_DECODE_GRAPH", "1")
    assert not decode.captures_eager_step(torch.device("cpu"))
    assert decode.captures_eager_step(torch.device("cuda"))
    monkeypatch.setenv("GEMMA3VL_DECODE_GRAPH", "yes")
    with pytest.raises(Gemma3VLError, match="GEMMA3VL_DECODE_GRAPH='yes'"):
        decode.captures_eager_step(torch.device("cuda"))
    monkeypatch.delenv("GEMMA3VL_DECODE_GRAPH")
    assert not decode.captures_eager_step(torch.device("cuda"))
    assert not copy.copy(decode.DecodeStep(False, torch.device("cpu"))).compiled
