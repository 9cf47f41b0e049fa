"""Continuous batching: requests join a running batch between decode steps and leave it as soon as they end.

The server's engine (``scheduler.py`` drives it from its one model thread). It holds ``slots`` rows in a
``SlotKVCache``, each row its own request at its own length:

* ``add``: a new request is prefilled *alone* (its prompt unpadded, images included) into a batch-1 cache of the
  slot cache's sizes, and that row is copied into a free slot; its prefill logits wait there for the next step;
* ``step``: every occupied row picks its next token (each with its own ``Sampling``, its own seeded generator and
  its own penalty memory: the prompt and answer tokens seen for the repetition penalty, the answer's token counts
  for the presence and frequency penalties; greedy and sampled requests share a batch); a row whose answer must be
  JSON first has its logits masked by its grammar (``structured.py``: only such rows, the mask filled on the host
  while the previous decode step ran); the rows that asked for
  logprobs get them (``logprobs.py``: computed for those rows only, top-k on the device); the tokens go to each request
  (streamed text, stop tokens and strings, its own token limit, cancellation: ``completion.RowState``), finished
  rows free their slots, and one decode step runs for all slots (fixed shapes: on CUDA one compiled CUDA graph
  for the engine's whole life; free slots compute too, and are ignored).

Why a row's answer is the one it gets alone (``generate`` on the same prompt): its keys are exactly its own
(no padding, positions from 0), its mask sees only them, and the way it samples depends on nothing else in the
batch. Differences can only come from floating point (a matmul over 8 rows may round differently from one over
1), which the tests check does not happen on the tiny fp32 model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable

import torch

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.cache import SlotKVCache
from gemma3vl.infer.completion import FINISH_CANCELLED, Row, RowState
from gemma3vl.infer.decode import DecodeStep, HostCopy, prefill, prompt_hidden_states
from gemma3vl.infer.logprobs import LogprobRows, PromptScores, scores_of_hidden_states
from gemma3vl.infer.sampling import (
    RowSampling,
    Sampling,
    choose_tokens,
    count_tokens,
    process_logits,
    row_generator,
    seen_tokens,
)
from gemma3vl.infer.structured import GrammarError, GrammarRows
from gemma3vl.model import Gemma3Model, TokenInfo


class _Slot:
    """What an occupied slot holds: the request's progress and how it samples."""

    def __init__(self, row: Row, sampling: Sampling, tokenizer: Any, device: torch.device, tag: Any):
        self.state = RowState(row, tokenizer, sampling)
        self.sampling = sampling
        self.generator = row_generator(sampling, device)
        self.stop_ids = set(sampling.stop_token_ids)
        self.tag = tag  # the caller's handle (the server's Job)


class ContinuousBatcher:
    """``slots`` rows of at most ``max_length`` positions each (prompt + new tokens); see the module docstring.

    Not thread-safe: one thread calls ``add`` and ``step``. ``decode_lock`` guards the tokenizer while rows turn
    tokens into text (the server's handler threads encode prompts with it at the same time). ``compile``: decode
    steps as one compiled CUDA graph (CUDA only); should compiling fail, ``report(reason)`` hears why (without it:
    a ``RuntimeWarning``) and the steps run eagerly.
    """

    def __init__(self, model: Gemma3Model, tokenizer: Any, *, slots: int = 8, max_length: int = 4096,
                 compile: bool = False, decode_lock: Any = None, report: Callable[[str], None] | None = None):
        if slots < 1 or max_length < 2:
            raise Gemma3VLError(f"slots={slots} must be >= 1 and max_length={max_length} >= 2")
        weight = model.text.embed.weight
        self.model = model
        self.tokenizer = tokenizer
        self.device = weight.device
        self.max_length = max_length
        self.cache = SlotKVCache(model.config.text, slots, max_length, weight.device, weight.dtype)
        self._prefill_cache = self.cache.prefill_cache()
        # the prompt whose prefill _prefill_cache holds, and its last logits: the n choices of one request (rows
        # of one prompt object, added one after another) share one prefill
        self._prefilled: tuple[Any, torch.Tensor] | None = None
        self._step = DecodeStep(compile, self.device, report=report)  # compiled: should that fail, eager + report
        self._lock = decode_lock if decode_lock is not None else contextlib.nullcontext()
        self.vocab = model.text.output_weight.shape[0]
        self.slots: list[_Slot | None] = [None] * slots
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(slots, self.vocab, dtype=torch.float32, device=self.device)
        self.seen: torch.Tensor | None = None  # [slots, V], once a row with a repetition penalty joins
        # float32 [slots, V]: each row's answer tokens counted, once a row with a presence / frequency penalty joins
        self.counts: torch.Tensor | None = None
        self._rows: RowSampling | None = None  # rebuilt when a row joins or leaves
        self._logprob_rows: LogprobRows | None = None  # rebuilt with _rows
        self.grammars: GrammarRows | None = None  # once a row whose answer follows a grammar joins
        self.steps = 0

    # ------------------------------------------------------------------------------------------ occupancy
    @property
    def free_slots(self) -> int:
        return sum(slot is None for slot in self.slots)

    @property
    def active(self) -> int:
        return len(self.slots) - self.free_slots

    def tags(self) -> list[Any]:
        return [slot.tag for slot in self.slots if slot is not None]

    @torch.no_grad()
    def add(self, row: Row, sampling: Sampling, tag: Any = None, *,
            prompt_logprobs: int | None = None) -> PromptScores | None:
        """Prefill ``row`` alone and put it in a free slot; its first token comes at the next ``step``. A row whose
        prompt is the very object the previous ``add`` prefilled (another choice of the same request) takes that
        prefill again instead of computing it a second time: the same keys, values and logits.

        ``prompt_logprobs`` (a number of alternatives, 0 included): the same prefill also scores the prompt's tokens
        (``logprobs.scores_of_hidden_states``; the legacy completions' ``echo`` with ``logprobs``), returned; it
        keeps every position's hidden state, not only the last (a [T, D] array)."""
        sampling.validate()
        free = [index for index, slot in enumerate(self.slots) if slot is None]
        if not free:
            raise Gemma3VLError(f"all {len(self.slots)} slots are taken: add a row after one has finished")
        length = row.prompt.length
        if length + row.max_new_tokens > self.max_length:
            raise Gemma3VLError(f"the prompt is {length} tokens; with max_new_tokens={row.max_new_tokens} that is over "
                                f"the engine's {self.max_length} positions per row")
        index = free[0]
        ids = row.prompt.input_ids.to(self.device)[None]  # [1, L], no padding: positions 0 .. L-1
        pixels = row.prompt.pixel_values
        scores = None
        if self._prefilled is not None and self._prefilled[0] is row.prompt and prompt_logprobs is None:
            logits = self._prefilled[1]
        else:
            info = TokenInfo.for_tokens(ids, image_token_id=self.model.image_token_id)
            self._prefilled = None  # (until this prefill is complete)
            self._prefill_cache.reset()
            pixels = None if pixels is None else pixels.to(self.device)
            if prompt_logprobs is None:
                logits = prefill(self.model, self._prefill_cache, ids, info, pixels)
            else:
                hidden = prompt_hidden_states(self.model, ids, info, pixels, cache=self._prefill_cache,
                                              last_only=False)
                scores = scores_of_hidden_states(self.model, ids[0], hidden[0], prompt_logprobs)
                logits = scores.last_logits[None]
            self._prefilled = (row.prompt, logits)
        self.cache.load_row(index, self._prefill_cache)
        self.logits[index] = logits[0]
        self.positions[index] = length
        if sampling.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(len(self.slots), self.vocab, dtype=torch.bool, device=self.device)
            self.seen[index] = seen_tokens(ids, torch.ones_like(ids), self.vocab)[0]
        if sampling.occurrence_penalty:
            if self.counts is None:
                self.counts = torch.zeros(len(self.slots), self.vocab, device=self.device)
            self.counts[index] = 0
        if sampling.grammar is not None:
            if self.grammars is None:
                self.grammars = GrammarRows(len(self.slots), self.vocab, self.device)
            self.grammars.add(index, sampling.grammar, sampling.stop_token_ids)
        self.slots[index] = _Slot(row, sampling, self.tokenizer, self.device, tag)
        self._rows = None
        return scores

    def _row_sampling(self) -> RowSampling:
        if self._rows is None:
            idle = Sampling()  # a free slot: greedy, nothing drawn
            samplings = [idle if slot is None else slot.sampling for slot in self.slots]
            generators = [None if slot is None else slot.generator for slot in self.slots]
            self._rows = RowSampling.from_samplings(samplings, self.vocab, self.device, generators)
            asked = [None if slot is None else slot.state.row.logprobs for slot in self.slots]
            self._logprob_rows = LogprobRows.of(asked, self.device)
        return self._rows

    # ------------------------------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self) -> list[Any]:
        """One token for every occupied row, then one decode step. Returns the tags of the rows that ended."""
        occupied = [slot is not None for slot in self.slots]
        if not any(occupied):
            return []
        rows = self._row_sampling()
        seen = self.seen if rows.any_penalty else None
        counts = self.counts if rows.any_occurrence_penalty else None
        logits = self.logits if self.grammars is None else self.grammars.mask(self.logits)
        answers = None
        if rows.needs_answers:  # (each row's tokens so far: its text's, as a stop token ends a row)
            answers = [() if slot is None else slot.state.text.token_ids for slot in self.slots]
        tokens = choose_tokens(process_logits(logits, rows, seen, counts, answers), rows, occupied)
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        if counts is not None:
            count_tokens(counts, tokens)
        logprobs = None if self._logprob_rows is None else self._logprob_rows.compute(self.logits, tokens)
        chosen = HostCopy(tokens)
        # The next decode step goes to the GPU before the tokens are read on the host (as in ``generate``): the
        # reading and the stop checks overlap it. If every row ends with these tokens its result goes unused; a row
        # added to a freed slot later overwrites that slot's logits, position and cache row, in stream order.
        self.tokens = tokens
        self.logits = self._step(self.model, self.cache, tokens, self.positions)
        self.positions = self.positions + 1
        ended = []
        chosen_ids = chosen.tolist()
        reported = {} if logprobs is None else logprobs.by_row(chosen_ids)
        with self._lock:
            for index, token in enumerate(chosen_ids):
                slot = self.slots[index]
                if slot is None:
                    continue
                slot.state.step(token, slot.stop_ids, reported.get(index))
                if self.grammars is not None:
                    try:
                        self.grammars.advance(index, token, ended=slot.state.finish_reason is not None)
                    except GrammarError as exc:
                        slot.state.fail(str(exc))
                if slot.state.finish_reason is not None:
                    ended.append(slot.tag)
                    self.slots[index] = None
                    self._rows = None
        self.steps += 1
        return ended

    @torch.no_grad()
    def grow(self, max_length: int) -> None:
        """Give every row ``max_length`` positions (more than now), keeping the rows in progress as they are.

        For a caller that cannot know its longest request up front (``generate --batch`` reads a file line by
        line): it sizes the engine for what it has seen and grows it when a longer request comes, instead of
        reserving the whole context for every slot. A row's column ``c`` stays at slot ``c`` of the global layers
        and ``c % S`` of the sliding ring: where the ring was shorter than the window it was ``max_length`` long
        and never wrapped, so ``c`` is below both sizes. With ``compile`` the next step captures a new graph (the
        buffers are new).
        """
        if max_length <= self.max_length:
            return
        old = self.cache
        new = SlotKVCache(self.model.config.text, len(self.slots), max_length, self.device, old.keys[0].dtype)
        for layer, kind in enumerate(old.layer_types):
            size = old.sizes[kind]
            new.keys[layer][:, :, :size].copy_(old.keys[layer])
            new.values[layer][:, :, :size].copy_(old.values[layer])
        for kind, info in old.slots.items():
            size = old.sizes[kind]
            target = new.slots[kind]
            for target_tensor, source_tensor in zip(
                (target.positions, target.segment_ids, target.image_block_ids),
                (info.positions, info.segment_ids, info.image_block_ids),
            ):
                target_tensor[:, :size].copy_(source_tensor)
        new.index.copy_(old.index)
        self.cache = new
        self._prefill_cache = new.prefill_cache()
        self._prefilled = None
        self.max_length = max_length

    def cancel_all(self) -> list[Any]:
        """End every occupied row as cancelled (the server is stopping); returns their tags."""
        with self._lock:
            for slot in self.slots:
                if slot is not None:
                    slot.state.finish(FINISH_CANCELLED)
        return self.drop_all()

    def drop_all(self) -> list[Any]:
        """Empty every slot without a word to the rows (after a failed step, whose caller tells them); their tags."""
        tags = self.tags()
        self.slots = [None] * len(self.slots)
        self._rows = None
        self.grammars = None
        return tags

    @property
    def compiled(self) -> bool:
        """Whether decode steps run compiled (False from the moment compiling failed)."""
        return self._step.compiled

    @property
    def compile_failure(self) -> str | None:
        """Why compiling the decode step failed (then steps run eagerly), else None."""
        return self._step.failure

    @torch.no_grad()
    def warm_up(self) -> None:
        """Compile and capture the decode step now (on CUDA with ``compile``), not at the first request: one step
        over the empty slots, whose results nobody reads. Should compiling fail, the engine decodes eagerly from
        then on (``compile_failure`` says why, and the ``report`` given to the engine heard it)."""
        if self.compiled:
            for _ in range(2):  # the first call compiles, the second captures the CUDA graph
                self._step(self.model, self.cache, self.tokens, self.positions)
            self.cache.index.zero_()


ROW_LENGTH_STEP = 256  # positions per row grow in steps of this many (capped at the context)
_END = object()  # run_rows: the rows are all taken


def row_length(needed: int, context_length: int) -> int:
    """Positions per engine row for a prompt and answer of ``needed`` tokens (within the context)."""
    return min(context_length, -(-needed // ROW_LENGTH_STEP) * ROW_LENGTH_STEP)


def run_rows(runtime: Any, rows: Iterator[tuple[Row, Sampling, Any] | None], *, slots: int, compile: bool = False,
             report: Callable[[str], None] | None = None, max_length: int | None = None,
             too_long: Callable[[Row, Any, int], None] | None = None) -> None:
    """Answer ``rows`` (``(row, sampling, tag)``, or None for an item that was skipped) on one engine of ``slots``
    rows of ``runtime``'s model: between two decode steps every free slot takes the next one, so each is read
    (and its images decoded) only then, and a short answer never waits for a long one. Each row's ``on_finish``
    hears its answer.

    The rows are sized for the longest so far (``row_length``) and grow when a longer one comes; with
    ``max_length``, the engine is made at once with rows of that many positions (capped at the context) and never
    grows (a compiled step would compile again): a row that needs more goes to ``too_long(row, tag, max_length)``.
    ``compile``: the decode step as one compiled CUDA graph, compiled (``warm_up``) before the first row;
    ``report`` hears a compile failure (decoding then goes on eagerly)."""
    engine = None

    def make(length: int) -> ContinuousBatcher:
        made = ContinuousBatcher(runtime.model, runtime.tokenizer, slots=slots, max_length=length,
                                 decode_lock=runtime.lock, compile=compile, report=report)
        made.warm_up()
        return made

    if max_length is not None:
        engine = make(min(max_length, runtime.context_length))
    more = True
    while True:
        while more and (engine is None or engine.free_slots):
            item = next(rows, _END)
            if item is _END:
                more = False
                continue
            if item is None:
                continue
            row, sampling, tag = item
            needed = row.prompt.length + row.max_new_tokens
            if max_length is not None and needed > engine.max_length:
                too_long(row, tag, engine.max_length)
                continue
            if engine is None:
                engine = make(row_length(needed, runtime.context_length))
            elif max_length is None and needed > engine.max_length:
                engine.grow(row_length(needed, runtime.context_length))
            engine.add(row, sampling, tag=tag)
        if engine is None or not engine.active:
            return
        engine.step()
