"""Log-probabilities of generated tokens: OpenAI's ``logprobs`` and ``top_logprobs``.

Which distribution: ``log_softmax`` of the model's raw logits for the step, in float32 (after the final-logit
softcapping, which is part of the model), before any repetition / presence / frequency penalty, temperature,
top-k or top-p, as vLLM reports by default and as OpenAI's numbers behave (they do not change with
temperature). So a sampled token's logprob is its log-probability under the model, not under the processed
distribution it was drawn from; under greedy decoding the chosen token is the top one.

Cost: only rows that asked compute anything. Their logits are gathered, ``log_softmax`` and ``topk`` run on the
device, and only the chosen token's value and the top ``k`` (value, id) pairs per row reach the host, through
a copy that does not wait for the decode step launched after it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from gemma3vl.infer.decode import HostCopy
from gemma3vl.infer.detokenize import BYTE_PIECE


@dataclass
class TokenLogprob:
    """One generated token's log-probability and its ``top`` most likely alternatives (id, logprob), most likely
    first (the token itself among them when it is one of them)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    # a prompt token's rank in its distribution, as vLLM counts it (how many tokens are at least as likely: 1 for
    # the likeliest); None where not computed (generated tokens)
    rank: int | None = None


class LogprobRows:
    """The rows of a batch that report logprobs (``asked``: per row, None or its number of alternatives)."""

    def __init__(self, asked: Sequence[int | None], device: torch.device):
        self.rows = [row for row, top in enumerate(asked) if top is not None]
        self.tops = [asked[row] for row in self.rows]
        self.top = max(self.tops, default=0)
        self.index = torch.tensor(self.rows, dtype=torch.long, device=device)

    @classmethod
    def of(cls, asked: Sequence[int | None], device: torch.device) -> "LogprobRows | None":
        """None when no row asked: then nothing is computed at all."""
        return cls(asked, device) if any(top is not None for top in asked) else None

    def compute(self, logits: torch.Tensor, tokens: torch.Tensor) -> "PendingLogprobs":
        """Queue the work for float32 ``logits`` [B, V] and the ``tokens`` [B] chosen from them."""
        logprobs = logits.index_select(0, self.index).log_softmax(dim=-1)
        chosen = logprobs.gather(1, tokens.index_select(0, self.index)[:, None])
        top = logprobs.topk(self.top, dim=-1)
        return PendingLogprobs(self, HostCopy(torch.cat([chosen, top.values], dim=1)), HostCopy(top.indices))


class PendingLogprobs:
    """The host copies of one step's logprobs; ``by_row`` waits for them (not for later device work)."""

    def __init__(self, rows: LogprobRows, values: HostCopy, ids: HostCopy):
        self.rows, self.values, self.ids = rows, values, ids

    def by_row(self, tokens: Sequence[int]) -> dict[int, TokenLogprob]:
        """Each reporting row's :class:`TokenLogprob` for its chosen token (``tokens``: every row's)."""
        values, ids = self.values.tolist(), self.ids.tolist()
        return {
            row: TokenLogprob(tokens[row], row_values[0], list(zip(row_ids[:top], row_values[1:top + 1])))
            for row, top, row_values, row_ids in zip(self.rows.rows, self.rows.tops, values, ids)
        }


class TokenTexts:
    """Each token's text as the tokenizer decodes it alone (special tokens included: ``<end_of_turn>``), and its
    UTF-8 bytes; a byte-fallback piece (``<0xE2>``, part of a character split over tokens) gives the one raw byte
    it stands for, though its text alone is U+FFFD. Cached per id; ``lock`` guards the tokenizer."""

    def __init__(self, tokenizer: Any, lock: Any = None):
        self.tokenizer = tokenizer
        self.lock = lock if lock is not None else threading.Lock()
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            with self.lock:
                piece = self.tokenizer.convert_ids_to_tokens(token_id)
                text = self.tokenizer.decode([token_id])
            raw = [int(piece[3:5], 16)] if BYTE_PIECE.match(piece) else list(text.encode("utf-8"))
            cached = self._cache[token_id] = (text, raw)
        return cached


# ------------------------------------------------------------------------------------------- prompt logprobs
SCORE_LOGITS_ELEMENTS = 1 << 25  # float32 logits held at once while scoring a prompt (128 MiB, + its log_softmax)


@dataclass
class PromptScores:
    """A prompt scored by the model: per prompt token its :class:`TokenLogprob` given the tokens before it (None for
    the first token, which nothing predicts), and the float32 logits [V] after the last one (the next token's)."""

    entries: list[TokenLogprob | None]
    last_logits: torch.Tensor


@torch.no_grad()
def score_prompt(model: Any, input_ids: torch.Tensor, top: int | None,
                 pixel_values: torch.Tensor | None = None) -> PromptScores:
    """The prompt logprobs of ``input_ids`` [T] (with its images' ``pixel_values``) for the legacy completions
    endpoint's ``echo`` with ``logprobs`` and vLLM's ``prompt_logprobs``: one forward over the prompt
    (``decode.prompt_hidden_states``: chunked with a cache past ``GEMMA3VL_PREFILL_CHUNK`` tokens, as
    ``decode.prefill``), then :func:`scores_of_hidden_states`. ``top`` None: no prompt logprobs, only
    ``last_logits`` (and no logits but the last are computed)."""
    from gemma3vl.infer.decode import prompt_hidden_states
    from gemma3vl.model import TokenInfo

    ids = input_ids[None]
    info = TokenInfo.for_tokens(ids, image_token_id=model.image_token_id)
    hidden = prompt_hidden_states(model, ids, info, pixel_values, cache=None, last_only=top is None)[0]  # [T|1, D]
    return scores_of_hidden_states(model, input_ids, hidden, top)


@torch.no_grad()
def scores_of_hidden_states(model: Any, input_ids: torch.Tensor, hidden: torch.Tensor,
                            top: int | None) -> PromptScores:
    """The prompt logprobs of ``input_ids`` [T] from the decoder's final hidden states over it (``hidden`` [T, D];
    [1, D] of the last column when ``top`` is None): the logits of every position, a few hundred positions at a time (a
    [T, V] float32 array for a long prompt and Gemma's 262k vocabulary would be gigabytes), their ``log_softmax``
    (float32, the raw model distribution as for generated tokens); the next token's value, its rank (vLLM's: the
    number of tokens at least as likely) and the top ``top`` (value, id) pairs reach the host."""
    length = input_ids.shape[0]
    last_logits = model.text.logits(hidden[-1:]).float()[0]
    entries: list[TokenLogprob | None] = [None]
    if top is None:
        return PromptScores(entries, last_logits)
    targets = input_ids[1:].to(hidden.device)
    step = max(1, SCORE_LOGITS_ELEMENTS // last_logits.shape[-1])
    for start in range(0, length - 1, step):
        stop = min(start + step, length - 1)
        logprobs = model.text.logits(hidden[start:stop]).float().log_softmax(dim=-1)  # position t predicts t + 1
        chosen_values = logprobs.gather(1, targets[start:stop, None])
        ranks = (logprobs >= chosen_values).sum(dim=-1).tolist()
        chosen = chosen_values[:, 0].tolist()
        if top:
            best = logprobs.topk(top, dim=-1)
            pairs = [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
        else:
            pairs = [[] for _ in chosen]
        entries += [TokenLogprob(token, value, alternatives, rank)
                    for token, value, alternatives, rank in zip(targets[start:stop].tolist(), chosen, pairs, ranks)]
    return PromptScores(entries, last_logits)
