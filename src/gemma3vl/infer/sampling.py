"""How each row picks its next token: per-row settings, transformers' logits processors, a seeded draw.

Logits are processed in float32 as transformers does: OpenAI's ``logit_bias`` (transformers' single-token
``sequence_bias``) and vLLM's ``allowed_token_ids`` (every other token -inf), the repetition penalty (greedy rows
too), then OpenAI's presence and frequency penalties (greedy rows too, as vLLM applies them), the stop tokens of
rows short of their ``min_new_tokens`` masked (transformers' ``MinNewTokensLengthLogitsProcessor``, vLLM's
``min_tokens``), then temperature, top-k, top-p, min-p; then argmax for greedy rows and a seeded draw for the
others. The processed scores equal those of the processors transformers' ``generate`` assembles, bit for bit on
the CPU (tests/test_sampling_parity.py); the draw does not reproduce transformers' ``torch.multinomial`` tokens
for the same seed. Every setting is per row, and each row draws from its own generator, so a row's tokens do not
depend on the rest of the batch: ``generate`` and the server's continuous batching (``engine.py``) put unrelated
requests in one batch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from gemma3vl.errors import Gemma3VLError, SettingError

MAX_OCCURRENCE_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: [-2, 2]
# the seeds a torch.Generator takes: any 64-bit integer, signed or unsigned (derived_seed gives unsigned ones)
SEED_RANGE = (-(2**63), 2**64 - 1)
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's: -100 bans a token in practice, 100 all but forces it


def logit_bias_entries(bias: Mapping[Any, Any] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` ({token id: bias}; the ids as JSON gives them, decimal strings, or ints) as sorted
    ``(id, bias)`` pairs, checked: ids of this vocabulary (0 to ``vocab_size - 1``), each once, and finite biases
    from -100 to 100. A :class:`SettingError` named ``logit_bias`` says which entry is wrong and why."""
    if bias is None:
        return ()
    if not isinstance(bias, Mapping):
        raise SettingError("logit_bias", repr(bias), "must be an object mapping token ids to biases")
    low, high = LOGIT_BIAS_RANGE
    entries: dict[int, float] = {}
    for key, value in bias.items():
        shown = repr(key) if len(repr(key)) <= 40 else f"{repr(key)[:36]}...{repr(key)[-1]}"
        entry = f"{{{shown}: {value!r}}}"
        if isinstance(key, str) and key.isascii() and key.isdigit():
            token = int(key) if len(key) <= 19 else vocab_size  # (int() refuses 4,300 digits and more)
        elif isinstance(key, int) and not isinstance(key, bool):
            token = key
        else:
            raise SettingError("logit_bias", entry, "has a key that is not a token id (a non-negative integer)")
        if not 0 <= token < vocab_size:
            raise SettingError("logit_bias", entry, f"names a token outside the vocabulary (ids 0 to {vocab_size - 1})")
        if token in entries:
            raise SettingError("logit_bias", entry, f"gives token {token} a second time")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:  # NaN too
            raise SettingError("logit_bias", entry, f"has a bias that is not a number from {low:g} to {high:g}")
        entries[token] = float(value)
    return tuple(sorted(entries.items()))


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
    # transformers' / vLLM's min-p: after top-p, drop tokens less likely than min_p x the likeliest; None / 0: off
    min_p: float | None = None
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    repetition_penalty: float = 1.0  # transformers' semantics; 1.0 = off
    stop_strings: tuple[str, ...] = ()  # checked on the decoded text; needs generate(tokenizer=...)
    # transformers' min_new_tokens, vLLM's min_tokens: no stop token (stop_token_ids) is drawn before this many new
    # tokens, and a stop string counts only where it ends after their text (``detokenize.IncrementalText``)
    min_new_tokens: int = 0
    # vLLM's include_stop_str_in_output: the text ends after its stop string instead of before it
    include_stop_strings: bool = False
    # vLLM's skip_special_tokens: False keeps special tokens (<start_of_image>, ...) in the text (stop tokens never)
    skip_special_tokens: bool = True
    # vLLM's allowed_token_ids: the row draws only these tokens (their logits kept, every other one -inf); ()
    # = every token
    allowed_token_ids: tuple[int, ...] = ()
    # transformers' bad_words_ids, over the answer's tokens (not the prompt's, as vLLM's bad_words): a sequence's last
    # token is banned wherever the answer so far ends with the rest of it (a one-token sequence: always)
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    # OpenAI's, over the tokens generated so far (not the prompt): a token's logit loses presence_penalty once it
    # has appeared, and frequency_penalty per time it has; 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # OpenAI's logit_bias as (token id, bias) pairs (``logit_bias_entries``), added to the logits before anything
    # else here, greedy rows too
    logit_bias: tuple[tuple[int, float], ...] = ()
    # an ``xgrammar.CompiledGrammar`` the answer follows (``structured.JsonGrammars``: JSON output); None: free text.
    # Its mask comes before every other step here, so the row samples from within the grammar.
    grammar: Any = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise SettingError("max_new_tokens", self.max_new_tokens, "must be >= 1")
        if not self.greedy and self.temperature <= 0:
            raise SettingError("temperature", self.temperature, "must be > 0 (use greedy decoding for 0)")
        if not self.greedy and not math.isfinite(self.temperature):  # NaN passes the test above; inf samples noise
            raise SettingError("temperature", self.temperature, "must be a finite number")
        if self.top_k is not None and self.top_k < 1:
            raise SettingError("top_k", self.top_k, "must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SettingError("top_p", self.top_p, "must be in (0, 1]")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise SettingError("min_p", self.min_p, "must be in [0, 1]")
        if not 0 < self.repetition_penalty < math.inf:
            raise SettingError("repetition_penalty", self.repetition_penalty, "must be a finite number > 0")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            # (torch.Generator.manual_seed's range; past it, it raises a bare ValueError at the first draw)
            raise SettingError("seed", self.seed, f"must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}")
        if any(not stop for stop in self.stop_strings):
            raise SettingError("stop_strings", repr(self.stop_strings), "contains an empty string")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_OCCURRENCE_PENALTY <= value <= MAX_OCCURRENCE_PENALTY:  # NaN fails too
                raise SettingError(name, value, f"must be a number from -{MAX_OCCURRENCE_PENALTY:g} to "
                                                f"{MAX_OCCURRENCE_PENALTY:g}")
        low, high = LOGIT_BIAS_RANGE  # (logit_bias_entries checks these too; the vocabulary: dense_logit_bias)
        for token, bias in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0 or not low <= bias <= high:
                raise SettingError("logit_bias", (token, bias), f"must pair a token id >= 0 with a bias from {low:g} "
                                                                f"to {high:g}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.allowed_token_ids):
            raise SettingError("allowed_token_ids", self.allowed_token_ids, "must be token ids (integers >= 0)")
        if any(not words or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in words)
               for words in self.bad_words_ids):
            raise SettingError("bad_words_ids", self.bad_words_ids, "must be non-empty sequences of token ids")
        if self.grammar is not None and self.allowed_token_ids:
            raise SettingError("allowed_token_ids", "(given)", "does not go with a grammar (JSON output): the grammar "
                                                               "decides which tokens the answer may hold")
        if isinstance(self.min_new_tokens, bool) or not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise SettingError("min_new_tokens", self.min_new_tokens, "must be an integer >= 0")
        if self.grammar is not None and not self.stop_token_ids:
            raise Gemma3VLError("an answer that follows a grammar needs stop_token_ids: its grammar lets it end only "
                                "with a stop token, once the JSON is complete")
        if self.grammar is not None and self.min_new_tokens:
            # (once its JSON is complete, the grammar allows only a stop token, which min_new_tokens would forbid)
            raise SettingError("min_new_tokens", self.min_new_tokens, "does not go with a grammar (JSON output): "
                                                                      "the answer ends when its JSON does")

    @property
    def occurrence_penalty(self) -> bool:
        """Whether the presence or frequency penalty is on (the tokens generated so far must be counted)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def to_device_async(values: list[bool] | list[int], device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without waiting for the GPU's queued work (pinned memory, async copy; a plain
    ``torch.tensor(values, device=cuda)`` copies from pageable memory and so waits for the stream)."""
    host = torch.tensor(values)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def derived_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th of several samples asked for with one ``seed`` (OpenAI's ``n``): ``seed`` itself
    for the first (so one sample is what ``seed`` alone gives), a 64-bit hash of both for the others (so the
    samples differ, and requests with neighbouring seeds do not share samples)."""
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


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
    min_p: torch.Tensor  # float32, 0.0 = off
    repetition_penalty: torch.Tensor  # float32, 1.0 = off
    presence_penalty: torch.Tensor  # float32, 0.0 = off
    frequency_penalty: torch.Tensor  # float32, 0.0 = off
    generators: list[torch.Generator | None]  # per row; None: torch's global generator
    sampled: list[bool]  # per row: not greedy
    any_penalty: bool  # a row's repetition penalty is on
    any_occurrence_penalty: bool  # a row's presence or frequency penalty is on
    # float32 [B]: top-p's cut ``1 - top_p`` worked out in float64 before the cast, as transformers' comparison with
    # a Python float does (float32(1) - float32(0.95) is 1.2e-8 off).
    top_p_cut: torch.Tensor
    max_top_k: int  # the largest top-k of a row that filters (top_k < vocab); 0: no row does
    any_top_p: bool  # whether a sampled row has top_p < 1 (transformers adds TopPLogitsWarper then only)
    any_min_p: bool  # whether a sampled row has min_p > 0
    # float32 [B, V]: each row's logit_bias, zero elsewhere; None when no row has one
    logit_bias: torch.Tensor | None = None
    # long [B]: each row's min_new_tokens, and bool [B, V]: its stop tokens (those masked until then); None when no
    # row has a minimum
    min_new_tokens: torch.Tensor | None = None
    min_stops: torch.Tensor | None = None
    # bool [B, V]: the tokens each row may draw (every token for a row without allowed_token_ids); None when no row
    # restricts them
    allowed: torch.Tensor | None = None
    # per row its bad_words_ids; () when no row has any
    bad_words_ids: tuple[tuple[tuple[int, ...], ...], ...] = ()

    @classmethod
    def from_samplings(
        cls,
        samplings: Sequence[Sampling],
        vocab_size: int,
        device: torch.device,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> "RowSampling":
        """``generators``: each row's own (a server row keeps its generator while the batch around it changes);
        by default new ones seeded from the settings."""
        sampled = [not s.greedy for s in samplings]
        if generators is None:
            generators = [row_generator(s, device) for s in samplings]

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        def when_sampled(values, off):
            return [value if on else off for value, on in zip(values, sampled)]

        top_k = when_sampled([min(s.top_k or vocab_size, vocab_size) for s in samplings], vocab_size)
        top_p = when_sampled([float(s.top_p or 1.0) for s in samplings], 1.0)
        min_p = when_sampled([float(s.min_p or 0.0) for s in samplings], 0.0)
        return cls(
            greedy=column([s.greedy for s in samplings], torch.bool),
            temperature=column(when_sampled([s.temperature for s in samplings], 1.0), torch.float32),
            top_k=column(top_k, torch.long),
            top_p=column(top_p, torch.float32),
            min_p=column(min_p, torch.float32),
            repetition_penalty=column([s.repetition_penalty for s in samplings], torch.float32),
            presence_penalty=column([s.presence_penalty for s in samplings], torch.float32),
            frequency_penalty=column([s.frequency_penalty for s in samplings], torch.float32),
            generators=when_sampled(list(generators), None),
            sampled=sampled,
            any_penalty=any(s.repetition_penalty != 1.0 for s in samplings),
            any_occurrence_penalty=any(s.occurrence_penalty for s in samplings),
            top_p_cut=column([1.0 - p for p in top_p], torch.float32),
            max_top_k=max((k for k in top_k if k < vocab_size), default=0),
            any_top_p=any(p < 1.0 for p in top_p),
            any_min_p=any(p > 0.0 for p in min_p),
            logit_bias=dense_logit_bias(samplings, vocab_size, device),
            **minimum_length_masks(samplings, vocab_size, device),
            allowed=allowed_tokens(samplings, vocab_size, device),
            bad_words_ids=tuple(s.bad_words_ids for s in samplings) if any(s.bad_words_ids for s in samplings) else (),
        )

    @property
    def needs_answers(self) -> bool:
        """Whether ``process_logits`` needs the tokens each row has generated so far (``answers``)."""
        return self.min_stops is not None or bool(self.bad_words_ids)

    def banned(self, answers: Sequence[Sequence[int]] | None, vocab_size: int) -> torch.Tensor | None:
        """bool [B, V]: what each row may not draw now, given ``answers`` (each row's tokens so far): its stop
        tokens while it is short of its ``min_new_tokens``, and the last token of each of its ``bad_words_ids``
        whose rest the answer ends with. None when no row has either setting."""
        if not self.needs_answers:
            return None
        if answers is None or len(answers) != len(self.sampled):
            raise Gemma3VLError("a row has min_new_tokens or bad_words_ids: process_logits needs each row's answer "
                                "so far (answers=)")
        device = self.greedy.device
        banned = torch.zeros(len(answers), vocab_size, dtype=torch.bool, device=device)
        if self.min_stops is not None:
            short = to_device_async([len(answer) for answer in answers], device) < self.min_new_tokens
            banned |= self.min_stops & short[:, None]
        rows, tokens = [], []
        for row, (sequences, answer) in enumerate(zip(self.bad_words_ids, answers)):
            for sequence in sequences:
                prefix = len(sequence) - 1
                if prefix == 0 or (len(answer) >= prefix and list(answer[len(answer) - prefix:]) == list(
                        sequence[:-1])):
                    if sequence[-1] < vocab_size:
                        rows.append(row)
                        tokens.append(sequence[-1])
        if rows:
            banned[to_device_async(rows, device), to_device_async(tokens, device)] = True
        return banned

    @property
    def any_sampled(self) -> bool:
        return any(self.sampled)


def dense_logit_bias(samplings: Sequence[Sampling], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """float32 [B, V]: each row's ``logit_bias`` at its tokens, 0 elsewhere (built on the host, copied once); None
    when no row has one."""
    if not any(s.logit_bias for s in samplings):
        return None
    bias = torch.zeros(len(samplings), vocab_size, dtype=torch.float32)
    for row, sampling in enumerate(samplings):
        if sampling.logit_bias:
            tokens, values = zip(*sampling.logit_bias)
            if max(tokens) >= vocab_size:
                raise SettingError("logit_bias", max(tokens), f"is outside the vocabulary (ids 0 to {vocab_size - 1})")
            bias[row, list(tokens)] = torch.tensor(values, dtype=torch.float32)
    return bias.to(device)


def allowed_tokens(samplings: Sequence[Sampling], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """bool [B, V]: each row's ``allowed_token_ids`` (all True for a row without); None when no row has them."""
    if not any(s.allowed_token_ids for s in samplings):
        return None
    allowed = torch.ones(len(samplings), vocab_size, dtype=torch.bool)
    for row, sampling in enumerate(samplings):
        if sampling.allowed_token_ids:
            if max(sampling.allowed_token_ids) >= vocab_size:
                raise SettingError("allowed_token_ids", max(sampling.allowed_token_ids),
                                   f"is outside the vocabulary (ids 0 to {vocab_size - 1})")
            allowed[row] = False
            allowed[row, list(sampling.allowed_token_ids)] = True
    return allowed.to(device)


def minimum_length_masks(samplings: Sequence[Sampling], vocab_size: int, device: torch.device) -> dict[str, Any]:
    """``RowSampling``'s ``min_new_tokens`` (long [B]) and ``min_stops`` (bool [B, V]: the stop token ids of each
    row with a minimum), built on the host and copied once; both None when no row has a minimum."""
    if not any(s.min_new_tokens and s.stop_token_ids for s in samplings):
        return {"min_new_tokens": None, "min_stops": None}
    stops = torch.zeros(len(samplings), vocab_size, dtype=torch.bool)
    for row, sampling in enumerate(samplings):
        inside = [token for token in sampling.stop_token_ids if 0 <= token < vocab_size]
        if sampling.min_new_tokens and inside:
            stops[row, inside] = True
    minimum = torch.tensor([s.min_new_tokens for s in samplings], dtype=torch.long)
    return {"min_new_tokens": minimum.to(device), "min_stops": stops.to(device)}


def row_generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    """The generator a seeded sampled row draws from (None: greedy, or unseeded: torch's global one)."""
    if sampling.greedy or sampling.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(sampling.seed)


def seen_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] bool: which ids occur in each row's prompt, image soft tokens included, padding left out (so a row is
    penalised the same alone or in a batch), as transformers 5's ``generate`` does (``prompt_ignore_length``: the
    left padding's length)."""
    batch = input_ids.shape[0]
    seen = torch.zeros(batch, vocab_size + 1, dtype=torch.bool, device=input_ids.device)
    real = (attention_mask != 0) & (input_ids >= 0) & (input_ids < vocab_size)
    seen.scatter_(1, torch.where(real, input_ids, vocab_size), True)  # padding lands in the extra column
    return seen[:, :vocab_size]


def count_tokens(counts: torch.Tensor, tokens: torch.Tensor) -> None:
    """Add each row's new token (``tokens`` [B]) to its occurrence counts (float32 [B, V], in place)."""
    counts.scatter_add_(1, tokens[:, None], torch.ones_like(counts[:, :1]))


def process_logits(logits: torch.Tensor, rows: RowSampling, seen: torch.Tensor | None = None,
                   counts: torch.Tensor | None = None,
                   answers: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """float32 [B, V] logits -> scores, as transformers' processors do them, in its order: each row's ``logit_bias``
    added (``SequenceBiasLogitsProcessor`` with one-token sequences; vLLM adds it first too), every token outside
    a row's ``allowed_token_ids`` set to -inf (vLLM's), the repetition penalty
    (``RepetitionPenaltyLogitsProcessor``: positive logits of seen tokens divided by the penalty, negative ones
    multiplied), then, given ``counts`` (float32 [B, V]: how often each token was generated so far), OpenAI's
    penalties as vLLM applies them: ``frequency_penalty * count`` and ``presence_penalty * (count > 0)`` subtracted
    (a row whose penalties are 0 keeps its scores bit for bit), then, given ``answers`` (each row's tokens so far;
    needed when a row has ``min_new_tokens`` or ``bad_words_ids``), the stop tokens of the rows short of their
    minimum set to -inf (``MinNewTokensLengthLogitsProcessor``) and so are the bad words' banned tokens
    (``NoBadWordsLogitsProcessor`` over the answer), then for sampled rows temperature, top-k (keep
    scores >= the k-th largest, ties kept), top-p (sort what top-k left, drop the low tail whose mass is <= 1 - p,
    always keeping the top token), min-p (``MinPLogitsWarper``: drop the tokens whose probability after the steps
    before is under ``min_p`` times the likeliest one's). A row whose top-k or top-p does not filter (top_k >= V,
    top_p = 1) is left as it is, as transformers adds no warper for it.
    Top-p sorts the scores top-k left, as ``TopPLogitsWarper`` does: with ties at the cut, which of the tied
    tokens go depends on that sort's order."""
    scores = logits
    if rows.logit_bias is not None:
        scores = scores + rows.logit_bias
    if rows.allowed is not None:
        scores = scores.masked_fill(~rows.allowed, float("-inf"))
    if seen is not None:
        penalty = rows.repetition_penalty[:, None]
        scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
    if counts is not None:
        scores = scores - rows.frequency_penalty[:, None] * counts
        scores = scores - rows.presence_penalty[:, None] * (counts > 0)
    blocked = rows.banned(answers, scores.shape[-1])
    if blocked is not None:
        scores = scores.masked_fill(blocked, float("-inf"))
    if not rows.any_sampled:
        return scores
    scores = scores / rows.temperature[:, None]
    vocab = scores.shape[-1]
    if rows.max_top_k:
        largest = scores.topk(min(rows.max_top_k, vocab), dim=-1).values  # [B, max k], descending
        filters = rows.top_k < vocab
        kth_largest = largest.gather(1, (rows.top_k.clamp(max=rows.max_top_k) - 1)[:, None])
        kth_largest = torch.where(filters[:, None], kth_largest, float("-inf"))
        scores = scores.masked_fill(scores < kth_largest, float("-inf"))
    if rows.any_top_p:
        ascending, order = scores.sort(dim=-1)
        tail_mass = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = (tail_mass <= rows.top_p_cut[:, None]) & (rows.top_p < 1)[:, None]
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if rows.any_min_p:  # (rows with min_p 0 drop nothing: no probability is < 0)
        probs = scores.softmax(dim=-1)
        drop = probs < rows.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        drop.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


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
