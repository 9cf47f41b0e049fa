"""Batched generation: static KV cache, per-row sampling, stop tokens and strings, streaming, compiled decode.

A run has gpt-fast's shape (reference §5.3 and §8 for what must match transformers):

* ``prefill``: the whole left-padded prompt once, images bidirectional inside their blocks, vision tower once;
* ``decode_step``: one text token per row against the cache, plain causal / sliding-window attention, fixed
  shapes and no host sync inside, so that on CUDA it can be compiled with CUDA graphs (``compile=True``).

Logits are processed in float32 as transformers does: repetition penalty (greedy rows too), then temperature,
top-k, top-p; then argmax for greedy rows and a seeded draw for the others. Every setting is per row (pass one
``Sampling`` per row), and each row draws from its own generator, so a row's tokens do not depend on the rest of
the batch: a server can batch unrelated requests.

Entry points: ``generate`` (token ids per row, as before), ``generate_result`` (plus finish reasons and text),
``stream_generate`` (an iterator of ``StepEvent``).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.cache import KVCache, StaticKVCache
from gemma3vl.model import Gemma3Model, TokenInfo

FINISH_STOP = "stop"  # a stop token id or a stop string
FINISH_LENGTH = "length"  # max_new_tokens reached


@dataclass
class Sampling:
    """How to pick one row's tokens. ``seed`` seeds that row's own generator: the same prompt and settings give
    the same tokens whatever else is in the batch (rows with equal seeds draw equal noise)."""

    max_new_tokens: int = 64
    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    repetition_penalty: float = 1.0  # transformers' semantics; 1.0 = off
    stop_strings: tuple[str, ...] = ()  # checked on the decoded text; needs generate(decode=...)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise Gemma3VLError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not self.greedy and self.temperature <= 0:
            raise Gemma3VLError(f"temperature={self.temperature} must be > 0 (use greedy decoding for 0)")
        if self.top_k is not None and self.top_k < 1:
            raise Gemma3VLError(f"top_k={self.top_k} must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise Gemma3VLError(f"top_p={self.top_p} must be in (0, 1]")
        if not self.repetition_penalty > 0:
            raise Gemma3VLError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        if any(not stop for stop in self.stop_strings):
            raise Gemma3VLError(f"stop_strings={self.stop_strings!r} contains an empty string")


@dataclass
class StepEvent:
    """One new token of one row. ``text_delta`` is the new final text (None without ``decode``); on the row's
    last event ``finished`` is True and ``finish_reason`` is ``"stop"`` or ``"length"``."""

    row: int
    token: int
    text_delta: str | None
    finished: bool
    finish_reason: str | None


@dataclass
class GenerationResult:
    """New token ids per row (the stop token or the tokens of a stop string included, as transformers keeps
    them), why each row ended, and with ``decode`` its text: stop token ids left out, cut before a stop string."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    texts: list[str] | None = None


# ----------------------------------------------------------------------------------------------- sampling
@dataclass
class RowSampling:
    """Per-row sampling settings as tensors [B], neutral values where a row does not use a setting (greedy rows:
    temperature 1, no top-k / top-p), so one vectorised pass serves a mixed batch. The flags are plain Python
    values: deciding what to compute never waits for the device."""

    greedy: torch.Tensor  # bool
    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # long, vocab size = off
    top_p: torch.Tensor  # float32, 1.0 = off
    repetition_penalty: torch.Tensor  # float32, 1.0 = off
    generators: list[torch.Generator | None]  # per row; None: torch's global generator
    sampled: list[bool]  # per row: not greedy
    any_penalty: bool

    @classmethod
    def from_samplings(cls, samplings: Sequence[Sampling], vocab_size: int, device: torch.device) -> "RowSampling":
        sampled = [not s.greedy for s in samplings]

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        def when_sampled(values, off):
            return [value if on else off for value, on in zip(values, sampled)]

        return cls(
            greedy=column([s.greedy for s in samplings], torch.bool),
            temperature=column(when_sampled([s.temperature for s in samplings], 1.0), torch.float32),
            top_k=column(when_sampled([min(s.top_k or vocab_size, vocab_size) for s in samplings], vocab_size),
                         torch.long),
            top_p=column(when_sampled([s.top_p or 1.0 for s in samplings], 1.0), torch.float32),
            repetition_penalty=column([s.repetition_penalty for s in samplings], torch.float32),
            generators=when_sampled(
                [None if s.seed is None else torch.Generator(device=device).manual_seed(s.seed) for s in samplings],
                None,
            ),
            sampled=sampled,
            any_penalty=any(s.repetition_penalty != 1.0 for s in samplings),
        )

    @property
    def any_sampled(self) -> bool:
        return any(self.sampled)


def seen_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] bool: which ids occur in each row's prompt (padding left out, so a row is penalised the same
    alone or in a batch; transformers also penalises the pad id of left-padded rows)."""
    batch = input_ids.shape[0]
    seen = torch.zeros(batch, vocab_size + 1, dtype=torch.bool, device=input_ids.device)
    real = (attention_mask != 0) & (input_ids >= 0) & (input_ids < vocab_size)
    seen.scatter_(1, torch.where(real, input_ids, vocab_size), True)  # padding lands in the extra column
    return seen[:, :vocab_size]


def process_logits(logits: torch.Tensor, rows: RowSampling, seen: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [B, V] logits -> scores: repetition penalty (transformers' RepetitionPenaltyLogitsProcessor:
    positive logits of seen tokens divided by the penalty, negative ones multiplied), then for sampled rows
    temperature, top-k (keep scores >= the k-th largest, ties kept), top-p (drop the low tail whose mass is
    <= 1 - p, always keeping the top token), in transformers' order."""
    scores = logits
    if seen is not None:
        penalty = rows.repetition_penalty[:, None]
        scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
    if not rows.any_sampled:
        return scores
    scores = scores / rows.temperature[:, None]
    vocab = scores.shape[-1]
    ascending, order = scores.sort(dim=-1)
    kth_largest = ascending.gather(1, (vocab - rows.top_k)[:, None])
    ascending = ascending.masked_fill(ascending < kth_largest, float("-inf"))
    tail_mass = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = tail_mass <= (1 - rows.top_p)[:, None]
    drop[:, -1] = False
    ascending = ascending.masked_fill(drop, float("-inf"))
    return torch.empty_like(scores).scatter_(1, order, ascending)


def choose_tokens(scores: torch.Tensor, rows: RowSampling, active: Sequence[bool] | None = None) -> torch.Tensor:
    """[B] tokens: argmax for greedy rows; for sampled rows a draw from softmax(scores) by the exponential race
    ``argmax(p / E)``, E ~ Exp(1) from the row's own generator (no host sync, and a row's draws do not depend on
    the other rows). Rows not ``active`` (finished) draw nothing, as they would not if run alone."""
    greedy = scores.argmax(dim=-1)
    if not rows.any_sampled:
        return greedy
    probs = scores.softmax(dim=-1)
    race = torch.ones_like(probs)
    for row, generator in enumerate(rows.generators):
        if rows.sampled[row] and (active is None or active[row]):
            race[row].exponential_(generator=generator)
    # an exact 0 from exponential_ would give inf (or NaN for a filtered token): clamp it away
    race.clamp_min_(torch.finfo(race.dtype).tiny)
    sampled = (probs / race).argmax(dim=-1)
    return torch.where(rows.greedy, greedy, sampled)


# ---------------------------------------------------------------------------------------------- the model
def prefill(
    model: Gemma3Model,
    cache: StaticKVCache | KVCache,
    input_ids: torch.Tensor,
    info: TokenInfo,
    pixel_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the prompt into the cache; float32 logits [B, V] of its last column."""
    return model(input_ids, pixel_values, info=info, cache=cache, logits_to_keep=1)[:, -1].float()


def decode_step(
    model: Gemma3Model, cache: StaticKVCache | KVCache, tokens: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """One token per row (tokens, positions: [B]) -> float32 logits [B, V].

    The function ``torch.compile`` captures. New tokens are text (transformers passes no token_type_ids after
    prefill), so it embeds them directly: ``model.embed``'s image checks would sync with the host.
    """
    info = TokenInfo(
        positions=positions[:, None],
        segment_ids=torch.ones_like(tokens)[:, None],
        image_block_ids=torch.full_like(tokens, -1)[:, None],
    )
    hidden = model.text(model.text.embed_tokens(tokens[:, None]), info, cache)  # [B, 1, D]
    return model.text.logits(hidden[:, -1]).float()


@functools.cache
def compiled_decode_step() -> Callable:
    """``decode_step`` compiled once per process with CUDA graphs; shapes are specialised (one graph per batch
    size and cache length: reuse one ``StaticKVCache`` to keep hitting the same graph)."""
    return torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# NOTE: a compiled step is a CUDA graph captured against the cache's buffer addresses. A call that brings the
# same cache replays it; a new cache means capturing again (cheap: ~20 ms at 4B shapes on an H200), but every
# capture stays in the CUDA-graph tree, which each step searches, so a server must not capture per request.
# Compiled calls that bring no cache therefore borrow one kept per model and batch size (taken out while in use:
# two calls at once never share one). It stays allocated between calls.
_spare_caches: "weakref.WeakKeyDictionary[Gemma3Model, dict[int, StaticKVCache]]" = weakref.WeakKeyDictionary()


def _make_cache(
    cache: str | StaticKVCache, model: Gemma3Model, batch: int, length: int, compiled: bool
) -> StaticKVCache | KVCache:
    weight = model.text.embed.weight
    if isinstance(cache, StaticKVCache):
        if (cache.batch_size, cache.index.device, cache.keys[0].dtype) != (batch, weight.device, weight.dtype) \
                or cache.max_length < length:
            raise Gemma3VLError(
                f"the given StaticKVCache holds {cache.batch_size} rows x {cache.max_length} positions "
                f"({cache.keys[0].dtype}, {cache.index.device}); this call needs {batch} rows x {length} positions "
                f"({weight.dtype}, {weight.device})"
            )
        cache.reset()
        return cache
    if cache == "static":
        if not compiled:
            return StaticKVCache(model.config.text, batch, length, weight.device, weight.dtype)
        spare = _spare_caches.get(model, {}).pop(batch, None)
        if spare is not None and spare.max_length >= length:
            spare.reset()
            return spare
        # rounded up, so that calls of similar lengths share the cache and its graph
        return StaticKVCache(model.config.text, batch, _round_up(length, 256), weight.device, weight.dtype)
    if cache == "dynamic":
        if compiled:
            raise Gemma3VLError("compile=True needs the static cache (cache='static' or a StaticKVCache)")
        return KVCache(model.config.text)
    raise Gemma3VLError(f"cache={cache!r}: expected 'static', 'dynamic' or a StaticKVCache")


def _give_back(model: Gemma3Model, kv: StaticKVCache | KVCache) -> None:
    if isinstance(kv, StaticKVCache):
        _spare_caches.setdefault(model, {})[kv.batch_size] = kv


# ------------------------------------------------------------------------------------------------- text
class RowText:
    """One row's generated text, built incrementally (two short decodes per token, not the whole answer).

    As text-generation-inference does: decode a few tokens of context plus the new ones and hand out what the
    context did not already give; a trailing U+FFFD (a character whose bytes have not all arrived) waits. Stop
    strings are searched in the text; while streaming, a tail that could begin a stop string is held back.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str], skip_ids: Sequence[int]):
        self.decode = decode
        self.stop_strings = tuple(stop_strings)
        self.skip_ids = frozenset(skip_ids)
        self.ids: list[int] = []
        self.text = ""  # settled text so far (cut before a stop string once one is found)
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] is the context re-decoded with each new token
        self._read = 0
        self._emitted = 0

    def add(self, token: int) -> bool:
        """Append a token; True if a stop string has now appeared."""
        if self.stopped or token in self.skip_ids:
            return self.stopped
        self.ids.append(token)
        context = self.decode(self.ids[self._prefix:self._read])
        fresh = self.decode(self.ids[self._prefix:])
        new = fresh[len(context):]
        longest = max((len(s) for s in self.stop_strings), default=1)
        candidate = self.text + new
        cuts = [i for i in (candidate.find(s, max(0, len(self.text) - longest + 1)) for s in self.stop_strings)
                if i >= 0]
        if cuts:  # a stop string ends in the new text (even before an unfinished character)
            self.text = candidate[: min(cuts)]
            self.stopped = True
        elif new and not new.endswith("\ufffd"):
            self.text = candidate
            self._prefix, self._read = self._read, len(self.ids)
        return self.stopped

    def finish(self) -> None:
        """The row ended: its text becomes ``decode(all ids)`` cut before the first stop string (the same as the
        incremental text, except for a tail that was still waiting for bytes)."""
        text = self.decode(self.ids)
        cuts = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        self.text = text[: min(cuts)] if cuts else text
        self.stopped = bool(cuts)

    def delta(self, final: bool) -> str:
        """Text not handed out yet; while not ``final``, minus a tail that may begin a stop string."""
        visible = len(self.text)
        if not final and not self.stopped:
            visible -= max((n for s in self.stop_strings for n in range(1, len(s))
                            if self.text.endswith(s[:n])), default=0)
        out = self.text[self._emitted:visible]
        self._emitted = max(self._emitted, visible)
        return out


# ------------------------------------------------------------------------------------------------ engine
@dataclass
class _Step:
    tokens: torch.Tensor  # [B], pad for rows that had finished before this step
    finished: torch.Tensor  # [B] bool, rows finished now included
    events: list[StepEvent]


def _row_event(row: int, token: int, count: int, sampling: Sampling, text: RowText | None) -> StepEvent:
    """The event for a row's ``count``-th new token: whether the row ends with it, and its new text."""
    stop_string = text.add(token) if text is not None else False
    reason = None
    if stop_string or token in sampling.stop_token_ids:
        reason = FINISH_STOP
    elif count == sampling.max_new_tokens:
        reason = FINISH_LENGTH
    delta = None
    if text is not None:
        if reason is not None:
            text.finish()
        delta = text.delta(final=reason is not None)
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
    decode: Callable[[list[int]], str] | None,
    cache: str | StaticKVCache,
    compile: bool,
) -> Iterator[_Step]:
    device = model.text.embed.weight.device
    batch = input_ids.shape[0]
    samplings = _per_row(sampling, batch)
    if decode is None and any(s.stop_strings for s in samplings):
        raise Gemma3VLError("stop_strings need the text: pass decode= (e.g. lambda ids: tokenizer.decode(ids))")
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    vocab = model.text.output_weight.shape[0]
    rows = RowSampling.from_samplings(samplings, vocab, device)
    compiled = compile and device.type == "cuda"
    steps = max(s.max_new_tokens for s in samplings)
    kv = _make_cache(cache, model, batch, input_ids.shape[1] + steps, compiled)
    step_fn = compiled_decode_step() if compiled else decode_step

    borrowed = compiled and isinstance(cache, str) and cache == "static"
    try:
        info = TokenInfo.for_tokens(input_ids, attention_mask=attention_mask, image_token_id=model.image_token_id)
        logits = prefill(model, kv, input_ids, info, pixel_values)
        positions = info.positions[:, -1] + 1
        seen = seen_tokens(input_ids, attention_mask, vocab) if rows.any_penalty else None
        pads = torch.tensor([s.pad_token_id for s in samplings], device=device)
        texts = [None if decode is None else RowText(decode, s.stop_strings, s.stop_token_ids) for s in samplings]
        reasons: list[str | None] = [None] * batch
        counts = [0] * batch
        for _ in range(steps):
            active = [reason is None for reason in reasons]
            tokens = choose_tokens(process_logits(logits, rows, seen), rows, active)
            tokens = torch.where(torch.tensor(active, device=device), tokens, pads)
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            events = []
            for row, token in enumerate(tokens.tolist()):
                if reasons[row] is None:
                    counts[row] += 1
                    events.append(_row_event(row, token, counts[row], samplings[row], texts[row]))
                    reasons[row] = events[-1].finish_reason
            yield _Step(tokens, torch.tensor([r is not None for r in reasons], device=device), events)
            if all(reason is not None for reason in reasons):
                break
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
                logits = step_fn(model, kv, tokens, positions).clone()  # the graph's output is overwritten next step
            else:
                logits = step_fn(model, kv, tokens, positions)
            positions = positions + 1
    finally:
        if borrowed:
            _give_back(model, kv)


def stream_generate(
    model: Gemma3Model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    sampling: Sampling | Sequence[Sampling] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    cache: str | StaticKVCache = "static",
    compile: bool = False,
) -> Iterator[StepEvent]:
    """Yield a ``StepEvent`` per new token of each unfinished row, step by step (arguments as ``generate``).

    Stopping the iteration early (``break``) abandons the generation cleanly.
    """
    for step in _steps(model, input_ids, attention_mask, pixel_values, sampling, decode, cache, compile):
        yield from step.events


def generate_result(
    model: Gemma3Model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    sampling: Sampling | Sequence[Sampling] | None = None,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    cache: str | StaticKVCache = "static",
    compile: bool = False,
) -> GenerationResult:
    """``generate`` that also says why each row ended and, given ``decode``, its text."""
    batch = input_ids.shape[0]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    reasons = [FINISH_LENGTH] * batch
    texts = [""] * batch
    for step in _steps(model, input_ids, attention_mask, pixel_values, sampling, decode, cache, compile):
        for event in step.events:
            tokens[event.row].append(event.token)
            texts[event.row] += event.text_delta or ""
            if event.finished:
                reasons[event.row] = event.finish_reason
        if on_step is not None:
            on_step(step.tokens, step.finished)
    return GenerationResult(tokens, reasons, texts if decode is not None else None)


def generate(
    model: Gemma3Model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    sampling: Sampling | Sequence[Sampling] | None = None,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    cache: str | StaticKVCache = "static",
    compile: bool = False,
) -> list[list[int]]:
    """Generate for a left-padded batch; returns the new token ids per row, stop token included.

    ``sampling``: one ``Sampling`` for every row, or one per row. ``on_step(tokens [B], finished [B])`` is
    called after every step (streaming); rows that have already finished report their ``pad_token_id``.
    ``decode(ids) -> str`` turns a row's new token ids (stop token ids left out) into text; ``stop_strings`` need it.
    ``cache``: ``"static"`` (preallocated, the default), ``"dynamic"`` (the concatenating reference cache), or a
    ``StaticKVCache`` to reuse (reset here; with ``compile`` this keeps the captured CUDA graph across calls).
    ``compile``: on CUDA, run decode steps through ``torch.compile(mode="reduce-overhead")`` (CUDA graphs; the
    first call compiles); ignored on other devices, where the same function runs eagerly.
    """
    return generate_result(
        model, input_ids, attention_mask=attention_mask, pixel_values=pixel_values, sampling=sampling,
        on_step=on_step, decode=decode, cache=cache, compile=compile,
    ).tokens
