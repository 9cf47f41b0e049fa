"""Many independent completions in one ``generate`` call: left-padded rows, each with its own limits.

``generate`` runs a left-padded batch with one :class:`Sampling` for every row and stops a row at a stop
token. The front-ends need more per row: its own ``max_new_tokens`` (the batch runs to the largest and each
row is cut at its own), stop strings, streamed text, and cancellation (a client that went away). The
per-step callback does that bookkeeping, and ends the whole ``generate`` call early — by raising out of the
callback — once every row is done by its own rules, so a batch never decodes for rows nobody waits for. The
per-row bookkeeping (``RowState``) is also what the server's continuous-batching engine (``engine.py``) runs per slot.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from gemma3vl.infer.conversation import EncodedPrompt
from gemma3vl.infer.detokenize import IncrementalText
from gemma3vl.infer.generate import Sampling, generate
from gemma3vl.infer.logprobs import TokenLogprob

FINISH_STOP = "stop"  # a stop token or a stop string
FINISH_LENGTH = "length"  # the row's max_new_tokens
FINISH_CANCELLED = "cancelled"  # nobody waits for the answer any more
FINISH_ERROR = "error"  # the row could not go on (its JSON grammar reached a dead end): Completion.error says why


@dataclass
class Row:
    """One completion to compute: the prompt, its own token limit and stop strings, and where text goes."""

    prompt: EncodedPrompt
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None  # stream-safe text deltas, in order
    on_finish: Callable[["Completion"], None] | None = None  # once, as soon as this row is done
    is_cancelled: Callable[[], bool] | None = None
    # None: no logprobs; k (0 .. 20): each token's logprob and its k most likely alternatives' (engine.py only)
    logprobs: int | None = None
    # as on_text, with the logprobs of the tokens whose text the delta completes (None: the row reports none);
    # called at the end with those still unsent even when no text is left (an empty delta)
    on_delta: Callable[[str, list[TokenLogprob] | None], None] | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated ids, the stop token included when one ended the row
    finish_reason: str
    prompt_tokens: int
    # with Row.logprobs: one per generated token but a stop token id (which has no text), in order
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None  # why the row failed (finish_reason "error")
    # with Row.logprobs, the stop token's (which ``logprobs`` leaves out) when a stop token ended the row; the legacy
    # completions endpoint reports it, as vLLM does (lm-evaluation-harness drops the last entry it gets)
    stop_logprob: TokenLogprob | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def collate_left_padded(prompts: list[EncodedPrompt], pad_token_id: int) -> dict[str, torch.Tensor | None]:
    """input_ids / attention_mask [B, L] with padding on the left, and every row's pixel values in row order
    (the model fills image slots row by row, image by image)."""
    longest = max(prompt.length for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - prompt.length:] = prompt.input_ids
        attention_mask[row, longest - prompt.length:] = 1
    pixels = [prompt.pixel_values for prompt in prompts if prompt.pixel_values is not None]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat(pixels) if pixels else None,
    }


class _EveryRowDone(Exception):
    """Raised out of ``on_step`` to end ``generate`` early; never escapes :func:`complete`."""


class RowState:
    """One row's progress: its streamed text, and its end (stop token, stop string, its own limit, or cancelled)."""

    def __init__(self, row: Row, tokenizer: Any, sampling: Sampling | None = None):
        """``sampling``: the row's, for how its text is made (``min_new_tokens``: stop strings count only past the
        minimum's text; ``include_stop_strings``: kept in the text; ``skip_special_tokens``)."""
        self.row = row
        sampling = sampling or Sampling()
        self.text = IncrementalText(tokenizer, row.stop_strings, sampling.min_new_tokens,
                                    sampling.include_stop_strings, sampling.skip_special_tokens)
        self.finish_reason: str | None = None
        self.completion: Completion | None = None
        self.logprobs: list[TokenLogprob] | None = None if row.logprobs is None else []
        self.stop_logprob: TokenLogprob | None = None
        self._logprobs_sent = 0
        # The stop token that ended the row: in the Completion's token ids, never in its text (a stop id may be an
        # ordinary token, whose text ``generate`` leaves out too)
        self._stop_token: int | None = None

    def emit(self, final: bool = False) -> None:
        """Hand out the text that can no longer change; with ``on_delta``, the logprobs of the tokens it came
        from too (a token whose text is held back, a byte of a split character, waits with it)."""
        if self.row.on_text is None and self.row.on_delta is None:
            return
        delta = self.text.delta(final=final)
        unsent = None if self.logprobs is None else self.logprobs[self._logprobs_sent:]
        if self.row.on_text is not None and delta:
            self.row.on_text(delta)
        if self.row.on_delta is not None and (delta or (final and unsent)):
            self._logprobs_sent += len(unsent or ())
            self.row.on_delta(delta, unsent)

    def finish(self, reason: str, error: str | None = None) -> None:
        """The row is done: last text, then its Completion to ``on_finish`` (at once, not at the batch's end)."""
        self.finish_reason = reason
        if reason not in (FINISH_CANCELLED, FINISH_ERROR):
            self.emit(final=True)
        token_ids = [*self.text.token_ids, *(() if self._stop_token is None else (self._stop_token,))]
        self.completion = Completion(text=self.text.final_text(), token_ids=token_ids,
                                     finish_reason=reason, prompt_tokens=self.row.prompt.length,
                                     logprobs=self.logprobs, error=error, stop_logprob=self.stop_logprob)
        if self.row.on_finish is not None:
            self.row.on_finish(self.completion)

    def fail(self, error: str) -> None:
        """The row cannot go on: it ends with finish reason ``"error"`` and ``error`` as the reason why."""
        if self.finish_reason is None:
            self.finish(FINISH_ERROR, error)

    def step(self, token: int, stop_ids: set[int], logprob: TokenLogprob | None = None) -> None:
        """The row's next token (and, for a row with ``logprobs``, its :class:`TokenLogprob`)."""
        if self.finish_reason is not None:
            return
        if self.row.is_cancelled is not None and self.row.is_cancelled():
            self.finish(FINISH_CANCELLED)
        elif token in stop_ids:
            self._stop_token = token
            if self.logprobs is not None:
                self.stop_logprob = logprob
            self.finish(FINISH_STOP)
        else:
            if self.logprobs is not None and logprob is not None:
                self.logprobs.append(logprob)
            if self.text.add(token):
                self.finish(FINISH_STOP)
            elif len(self.text.token_ids) >= self.row.max_new_tokens:
                self.finish(FINISH_LENGTH)
            else:
                self.emit()


def complete(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: list[Row],
    sampling: Sampling,
    *,
    decode_lock: Any = None,
    compile: bool = False,
    cache: Any = "static",
    on_compile_failure: Callable[[str], None] | None = None,
) -> list[Completion]:
    """Run ``rows`` as one batch with ``sampling`` (its max_new_tokens is replaced by the rows' largest).

    ``decode_lock`` (a context manager) guards the tokenizer when other threads use it at the same time.
    ``compile``, ``cache`` and ``on_compile_failure`` go to ``generate`` (a reused ``StaticKVCache`` keeps one
    compiled graph).
    """
    if not rows:
        return []
    sampling = replace(sampling, max_new_tokens=max(row.max_new_tokens for row in rows))
    states = [RowState(row, tokenizer, sampling) for row in rows]
    stop_ids = set(sampling.stop_token_ids)
    batch = collate_left_padded([row.prompt for row in rows], sampling.pad_token_id)

    lock = decode_lock if decode_lock is not None else contextlib.nullcontext()

    def on_step(tokens: torch.Tensor, finished: torch.Tensor) -> None:
        with lock:
            for state, token in zip(states, tokens.tolist()):
                state.step(token, stop_ids)
        if all(state.finish_reason is not None for state in states):
            raise _EveryRowDone

    device = model.text.embed.weight.device
    pixel_values = batch["pixel_values"]
    try:
        generate(
            model,
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=None if pixel_values is None else pixel_values.to(device),
            sampling=sampling,
            on_step=on_step,
            compile=compile,
            cache=cache,
            on_compile_failure=on_compile_failure,
        )
    except _EveryRowDone:
        pass
    with lock:
        for state in states:
            if state.finish_reason is None:  # generate ended at the batch's max_new_tokens
                state.finish(FINISH_LENGTH)
    return [state.completion for state in states]
