"""Batched generation for a left-padded batch: per-row sampling, stop tokens and strings, streaming, compiled decode.

The model side (``prefill``, ``decode_step``, the compiled step, the static cache) is in ``decode.py``; how a row
picks its tokens (``Sampling``, transformers' logits processors, seeded draws) in ``sampling.py``; JSON output
(a row's grammar masks its logits first) in ``structured.py``; streamed text (byte-fallback runs, special tokens,
stop strings) in ``detokenize.py``. This module is the loop around them for a
batch that starts together: ``generate`` (token ids per row), ``generate_result`` (plus finish reasons and text),
``stream_generate`` (an iterator of ``StepEvent``). The server's continuous batching, where rows join and leave
between steps, is the other loop around the same parts (``engine.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.cache import StaticKVCache
from gemma3vl.infer.decode import (  # noqa: F401  (re-exported: generate's public surface)
    DecodeStep,
    HostCopy,
    _spare_caches,
    compiled_decode_step,
    decode_step,
    give_back,
    make_cache,
    prefill,
)
from gemma3vl.infer.detokenize import IncrementalText
from gemma3vl.infer.sampling import (  # noqa: F401  (re-exported)
    RowSampling,
    Sampling,
    choose_tokens,
    count_tokens,
    process_logits,
    row_generator,
    seen_tokens,
    to_device_async,
)
from gemma3vl.infer.structured import GrammarRows
from gemma3vl.model import Gemma3Model, TokenInfo

FINISH_STOP = "stop"  # a stop token id or a stop string
FINISH_LENGTH = "length"  # max_new_tokens reached


@dataclass
class StepEvent:
    """One new token of one row. ``text_delta`` is the new final text (None without ``tokenizer``); on the row's
    last event ``finished`` is True and ``finish_reason`` is ``"stop"`` or ``"length"``."""

    row: int
    token: int
    text_delta: str | None
    finished: bool
    finish_reason: str | None


@dataclass
class GenerationResult:
    """New token ids per row (the stop token or the tokens of a stop string included, as transformers keeps
    them), why each row ended, and with ``tokenizer`` its text: stop token ids left out, cut before a stop
    string."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    texts: list[str] | None = None


@dataclass
class _Step:
    tokens: torch.Tensor  # [B] on the host, pad for rows that had finished before this step
    finished: torch.Tensor  # [B] bool on the host, rows finished now included
    events: list[StepEvent]


def row_event(row: int, token: int, count: int, sampling: Sampling, text: IncrementalText | None) -> StepEvent:
    """The event for a row's ``count``-th new token: whether the row ends with it, and its new text. A stop token
    is not text (``IncrementalText`` never sees it)."""
    stop_token = token in sampling.stop_token_ids
    stop_string = text.add(token) if text is not None and not stop_token else False
    reason = None
    if stop_token or stop_string:
        reason = FINISH_STOP
    elif count == sampling.max_new_tokens:
        reason = FINISH_LENGTH
    delta = None if text is None else text.delta(final=reason is not None)
    return StepEvent(row, token, delta, reason is not None, reason)


def _per_row(sampling: Sampling | Sequence[Sampling] | None, batch: int) -> list[Sampling]:
    if sampling is None or isinstance(sampling, Sampling):
        samplings = [sampling or Sampling()] * batch
    else:
        samplings = list(sampling)
        if len(samplings) != batch:
            raise Gemma3VLError(f"{len(samplings)} Sampling settings given for a batch of {batch} rows")
    for s in samplings:
        s.validate()
    return samplings


@torch.no_grad()
def _steps(
    model: Gemma3Model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    sampling: Sampling | Sequence[Sampling] | None,
    tokenizer: Any,
    cache: str | StaticKVCache,
    compile: bool,
    on_compile_failure: Callable[[str], None] | None,
) -> Iterator[_Step]:
    device = model.text.embed.weight.device
    batch = input_ids.shape[0]
    samplings = _per_row(sampling, batch)
    if tokenizer is None and any(s.stop_strings for s in samplings):
        raise Gemma3VLError("stop_strings need the text: pass tokenizer= (the checkpoint's tokenizer)")
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    vocab = model.text.output_weight.shape[0]
    rows = RowSampling.from_samplings(samplings, vocab, device)
    grammars = GrammarRows.of([s.grammar for s in samplings], [s.stop_token_ids for s in samplings], vocab, device)
    step_fn = DecodeStep(compile, device, report=on_compile_failure)
    steps = max(s.max_new_tokens for s in samplings)
    kv = make_cache(cache, model, batch, input_ids.shape[1] + steps, step_fn.compiled)

    borrowed = step_fn.compiled and isinstance(cache, str) and cache == "static"
    try:
        info = TokenInfo.for_tokens(input_ids, attention_mask=attention_mask, image_token_id=model.image_token_id)
        logits = prefill(model, kv, input_ids, info, pixel_values)
        positions = info.positions[:, -1] + 1
        seen = seen_tokens(input_ids, attention_mask, vocab) if rows.any_penalty else None
        # how often each row generated each token (presence / frequency penalties)
        occurrences = torch.zeros(batch, vocab, device=device) if rows.any_occurrence_penalty else None
        pads = torch.tensor([s.pad_token_id for s in samplings], device=device)
        texts = [None if tokenizer is None
                 else IncrementalText(tokenizer, s.stop_strings, s.min_new_tokens, s.include_stop_strings,
                                      s.skip_special_tokens)
                 for s in samplings]
        reasons: list[str | None] = [None] * batch
        answers: list[list[int]] = [[] for _ in range(batch)]  # each row's tokens so far (min_new_tokens, bad words)
        for index in range(steps):
            active = [reason is None for reason in reasons]
            if grammars is not None:
                logits = grammars.mask(logits)
            tokens = choose_tokens(process_logits(logits, rows, seen, occurrences, answers), rows, active)
            tokens = torch.where(to_device_async(active, device), tokens, pads)
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            if occurrences is not None:
                count_tokens(occurrences, tokens)
            chosen = HostCopy(tokens)
            # The next step goes to the GPU before this one's tokens are read on the host: the reading, the stop
            # checks, the grammar rows' next masks and the caller's handling of the events overlap the step instead
            # of leaving the GPU idle.
            # It feeds every row's token, as the step after it always did (finished rows get pads from then on);
            # if this turns out to be the last step for every row, its result is simply dropped.
            if index + 1 < steps:
                next_logits = step_fn(model, kv, tokens, positions)
                positions = positions + 1
            events = []
            for row, token in enumerate(chosen.tolist()):
                if reasons[row] is None:
                    answers[row].append(token)
                    events.append(row_event(row, token, len(answers[row]), samplings[row], texts[row]))
                    reasons[row] = events[-1].finish_reason
                    if grammars is not None:  # a GrammarError (a dead end, never expected) ends the whole call
                        grammars.advance(row, token, ended=reasons[row] is not None)
            # Host tensors: a caller reading them must not wait for the step launched above.
            yield _Step(chosen.host, torch.tensor([r is not None for r in reasons]), events)
            if all(reason is not None for reason in reasons) or index + 1 == steps:
                break
            logits = next_logits
    finally:
        if borrowed:
            give_back(model, kv)


def stream_generate(
    model: Gemma3Model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    sampling: Sampling | Sequence[Sampling] | None = None,
    tokenizer: Any = None,
    cache: str | StaticKVCache = "static",
    compile: bool = False,
    on_compile_failure: Callable[[str], None] | None = None,
) -> Iterator[StepEvent]:
    """Yield a ``StepEvent`` per new token of each unfinished row, step by step (arguments as ``generate``).

    Stopping the iteration early (``break``) abandons the generation cleanly.
    """
    for step in _steps(model, input_ids, attention_mask, pixel_values, sampling, tokenizer, cache, compile,
                      on_compile_failure):
        yield from step.events


def generate_result(
    model: Gemma3Model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    sampling: Sampling | Sequence[Sampling] | None = None,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    tokenizer: Any = None,
    cache: str | StaticKVCache = "static",
    compile: bool = False,
    on_compile_failure: Callable[[str], None] | None = None,
) -> GenerationResult:
    """``generate`` that also says why each row ended and, given ``tokenizer``, its text."""
    batch = input_ids.shape[0]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    reasons = [FINISH_LENGTH] * batch
    texts = [""] * batch
    for step in _steps(model, input_ids, attention_mask, pixel_values, sampling, tokenizer, cache, compile,
                      on_compile_failure):
        for event in step.events:
            tokens[event.row].append(event.token)
            texts[event.row] += event.text_delta or ""
            if event.finished:
                reasons[event.row] = event.finish_reason
        if on_step is not None:
            on_step(step.tokens, step.finished)
    return GenerationResult(tokens, reasons, texts if tokenizer is not None else None)


def generate(
    model: Gemma3Model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    sampling: Sampling | Sequence[Sampling] | None = None,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    tokenizer: Any = None,
    cache: str | StaticKVCache = "static",
    compile: bool = False,
    on_compile_failure: Callable[[str], None] | None = None,
) -> list[list[int]]:
    """Generate for a left-padded batch; returns the new token ids per row, stop token included.

    ``sampling``: one ``Sampling`` for every row, or one per row. ``on_step(tokens [B], finished [B])`` is
    called after every step (streaming) with CPU tensors (reading them never waits for the GPU's next step); rows
    that have already finished report their ``pad_token_id``.
    ``tokenizer``: the checkpoint's tokenizer, which turns each row's tokens (stop token ids left out) into
    stream-safe text (``detokenize.IncrementalText``); ``stop_strings`` need it.
    ``cache``: ``"static"`` (preallocated, the default), ``"dynamic"`` (the concatenating reference cache), or a
    ``StaticKVCache`` to reuse (reset here; with ``compile`` this keeps the captured CUDA graph across calls).
    ``compile``: on CUDA, run decode steps through ``torch.compile`` with CUDA graphs (the first call compiles);
    ignored on other devices, where the same function runs eagerly. Should compiling fail, the steps run eagerly
    (same tokens) and ``on_compile_failure(reason)`` hears why (without it: a ``RuntimeWarning``).
    """
    return generate_result(
        model, input_ids, attention_mask=attention_mask, pixel_values=pixel_values, sampling=sampling,
        on_step=on_step, tokenizer=tokenizer, cache=cache, compile=compile,
        on_compile_failure=on_compile_failure,
    ).tokens
