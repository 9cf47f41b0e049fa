"""``POST /v1/completions``: OpenAI's legacy completions, with prompt log-probabilities for evaluation harnesses.

A prompt is completed as it is, with no chat template: a string is tokenized raw with the ``<bos>`` the tokenizer
adds (``add_special_tokens=True``; a string that already starts with ``<bos>`` gets no second one, as
``gemma3vl generate --raw`` and transformers' ``apply_chat_template``), a list of token ids is used as given. Text
only: the image soft token is refused. Several prompts in one request are several jobs, whose choices come in
order (prompt ``p``'s choice ``i`` is choice ``p * n + i``, as OpenAI and vLLM number them).

``echo`` puts the prompt before the answer: ``text`` begins with the prompt as sent (a string), or with the
decoded ids (``<bos>`` and other special tokens written out); with ``logprobs: k`` the logprobs cover the prompt
tokens first, the first of them with ``null`` (nothing predicts it), each from ``log_softmax`` of the model's
logits at the position before (``logprobs.score_prompt``). ``max_tokens: 0`` asks for no token: with ``echo`` that
is how lm-evaluation-harness style scoring needs no decode step; without ``echo`` it answers an empty text (as
OpenAI does). ``logprobs`` lists: ``tokens`` (each token's text alone), ``token_logprobs``, ``top_logprobs`` (the
``k`` most likely tokens' texts and logprobs, and the chosen token's, as vLLM gives them) and ``text_offset``
(where each token's text begins in ``text``: a token with no text of its own there, the ``<bos>`` the tokenizer
added, a stop token, a piece of a character split over several tokens, begins where the next text does). A stop
token that ends an answer is in the logprobs (with no text), as vLLM reports it: lm-evaluation-harness drops the
last entry it gets, taking it for the one token it asked for.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from gemma3vl.infer.completion import Completion
from gemma3vl.infer.conversation import EncodedPrompt
from gemma3vl.infer.detokenize import BYTE_PIECE
from gemma3vl.infer.logprobs import TokenLogprob
from gemma3vl.infer.openai_protocol import (
    MAX_TOP_LOGPROBS,
    UNSUPPORTED_UNLESS_DEFAULT,
    ApiError,
    SharedFields,
    _invalid,
    _is_int,
    _parse_response_format,
    json_body,
    now,
    prompt_logprobs_object,
    request_sampling,
    shared_fields,
    usage,
)
from gemma3vl.infer.scheduler import Job, QueueFull
from gemma3vl.infer.structured import Constraint

if TYPE_CHECKING:
    from gemma3vl.infer.server import ChatCompletionServer, RequestRecord

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy endpoint


@dataclass(kw_only=True)
class CompletionRequest(SharedFields):
    prompts: list[str | list[int]]
    max_tokens: int = DEFAULT_MAX_TOKENS
    n: int = 1
    logprobs: int | None = None  # alternatives per token (0 .. 20); None: no logprobs
    echo: bool = False
    add_special_tokens: bool = True  # vLLM's: false sends a text prompt without the <bos> otherwise added


def _parse_prompt(value: Any) -> list[str | list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids, or a list of lists of token ids."""
    def ids(item: Any, param: str) -> list[int]:
        if not item or not all(_is_int(token) for token in item):
            raise _invalid(f"'{param}' must be a non-empty list of token ids (integers)", "prompt")
        return list(item)

    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise _invalid("'prompt' must be a string, a list of strings, a list of token ids or a list of lists of "
                       "token ids", "prompt")
    if all(isinstance(item, str) for item in value):
        return list(value)
    if all(_is_int(item) for item in value):
        return [list(value)]
    if all(isinstance(item, list) for item in value):
        return [ids(item, f"prompt[{i}]") for i, item in enumerate(value)]
    raise _invalid("'prompt' must not mix strings, token ids and lists", "prompt")


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """Validate a ``/v1/completions`` body's syntax and field types (tokenizing and limits come later)."""
    body = json_body(raw)
    if "prompt" not in body:
        hint = " (this is the legacy completions endpoint: send 'messages' to /v1/chat/completions)" \
            if "messages" in body else ""
        raise ApiError(400, f"Missing required parameter: 'prompt'{hint}.", param="prompt",
                       code="missing_required_parameter")
    for key, harmless in UNSUPPORTED_UNLESS_DEFAULT.items():
        if key != "best_of" and key in body and not harmless(body[key]):
            raise ApiError(400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")
    if body.get("suffix") not in (None, ""):
        raise ApiError(400, "'suffix' (insertion) is not supported by this server", param="suffix",
                       code="unsupported_parameter")
    n = body.get("n")
    if n is not None and not (_is_int(n) and n >= 1):
        raise _invalid(f"'n' must be an integer >= 1, got {n!r}", "n")
    n = n or 1
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        if not _is_int(best_of) or best_of < n:
            raise _invalid(f"'best_of' must be an integer >= n ({n}), got {best_of!r}", "best_of")
        raise ApiError(400, f"'best_of' other than n ({n}) is not supported by this server: it returns every choice "
                            f"it samples", param="best_of", code="unsupported_parameter")
    logprobs = body.get("logprobs")
    if logprobs is not None and not (_is_int(logprobs) and 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise _invalid(f"'logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS} (the number of most likely "
                       f"tokens listed per position), got {logprobs!r}", "logprobs")
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise _invalid("'echo' must be a boolean", "echo")
    add_special_tokens = body.get("add_special_tokens")
    if add_special_tokens is not None and not isinstance(add_special_tokens, bool):
        raise _invalid("'add_special_tokens' must be a boolean", "add_special_tokens")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and not (_is_int(max_tokens) and max_tokens >= 0):
        raise _invalid(f"'max_tokens' must be an integer >= 0, got {max_tokens!r}", "max_tokens")
    fields = shared_fields(body)
    schema = _parse_response_format(body.get("response_format"))  # (vLLM's completions take it too)
    if schema is not None:
        if fields["guided"] is not None:
            raise _invalid(f"give one structured-output constraint, not 'response_format' and "
                           f"'{fields['guided'].param}'", fields["guided"].param)
        fields["guided"] = Constraint("json", schema, "response_format")
    return CompletionRequest(
        prompts=_parse_prompt(body["prompt"]),
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        **fields,
        n=n,
        logprobs=logprobs,
        echo=bool(echo),
        add_special_tokens=add_special_tokens is not False,
    )


# ---------------------------------------------------------------------------------------------- text offsets
class TokenWidths:
    """How many characters of a text each token takes, for ``text_offset``: a run of byte-fallback pieces is cut at
    its UTF-8 character boundaries and each character's text counts at the piece of its first byte (the others of
    that character take none); any other token decodes alone (cached per id). Gemma's decoder joins the texts of such
    parts unchanged, so the offsets add up to the decoded text; a run whose characters decode differently one by one
    than together (stray continuation bytes) counts whole at its first piece. ``lock`` guards the tokenizer."""

    def __init__(self, tokenizer: Any, lock: Any = None):
        self.tokenizer = tokenizer
        self.lock = lock if lock is not None else threading.Lock()
        self._cache: dict[tuple[int, bool], str] = {}
        self._byte_values: dict[int, int] | None = None

    def byte_values(self) -> dict[int, int]:
        """The byte-fallback pieces' ids and the byte each stands for (``<0xE2>``: 0xE2)."""
        if self._byte_values is None:
            with self.lock:
                vocab = self.tokenizer.get_vocab()
            self._byte_values = {index: int(piece[3:5], 16) for piece, index in vocab.items()
                                 if BYTE_PIECE.match(piece)}
        return self._byte_values

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        if len(ids) == 1 and (ids[0], skip_special) in self._cache:
            return self._cache[ids[0], skip_special]
        with self.lock:
            text = self.tokenizer.decode(ids, skip_special_tokens=skip_special)
        if len(ids) == 1:
            self._cache[ids[0], skip_special] = text
        return text

    def pieces(self, ids: list[int], skip_special: bool) -> list[str]:
        """Per token the text it adds (within a byte run: a character's text at its first byte, "" at the others)."""
        values, out, i = self.byte_values(), [], 0
        while i < len(ids):
            j = i + 1
            if ids[i] in values:
                while j < len(ids) and ids[j] in values:
                    j += 1
                out += self._byte_run(ids[i:j], values, skip_special)
            else:
                out.append(self._decode(ids[i:j], skip_special))
            i = j
        return out

    def _byte_run(self, run: list[int], values: dict[int, int], skip_special: bool) -> list[str]:
        starts = [k for k in range(len(run)) if k == 0 or values[run[k]] & 0xC0 != 0x80]  # not a continuation byte
        bounds = list(zip(starts, starts[1:] + [len(run)]))
        texts = [self._decode(run[a:b], skip_special) for a, b in bounds]
        whole = texts[0] if len(texts) == 1 else self._decode(run, skip_special)
        if "".join(texts) != whole:
            return [whole] + [""] * (len(run) - 1)
        out: list[str] = []
        for (a, b), text in zip(bounds, texts):
            out += [text] + [""] * (b - a - 1)
        return out


def _offsets(pieces: list[str], start: int, limit: int | None = None) -> list[int]:
    offsets, position = [], start
    for piece in pieces:
        offsets.append(position if limit is None else min(position, limit))
        position += len(piece)
    return offsets


# ---------------------------------------------------------------------------------------------- server side
@dataclass
class PromptJob:
    """One prompt of a request: its job (``n`` choices), the text ``echo`` puts first, and its token ids."""

    job: Job
    ids: list[int]
    echo_text: str
    echo_pieces: list[str]  # per prompt token, the text it takes in ``echo_text``


def text_prompt_ids(runtime: Any, prompt: str, add_special_tokens: bool = True) -> tuple[list[int], bool]:
    """A text prompt's token ids as this endpoint reads text (``/tokenize`` too), and whether ``<bos>`` was added:
    it is, unless ``add_special_tokens`` is false or the text starts with it already."""
    tokenizer = runtime.tokenizer
    bos = getattr(tokenizer, "bos_token", None)
    added_bos = add_special_tokens and not (bos and prompt.startswith(bos))
    with runtime.lock:
        return list(tokenizer(prompt, add_special_tokens=added_bos)["input_ids"]), added_bos


def _encode(app: "ChatCompletionServer", prompt: str | list[int],
            add_special_tokens: bool = True) -> tuple[list[int], str, list[str]]:
    """(ids, echo text, per-token pieces of it) of one prompt; a 400 naming ``prompt`` when it cannot be used."""
    runtime, widths = app.runtime, app.completion_widths
    tokenizer = runtime.tokenizer
    vocab = app.token_id_limit
    if isinstance(prompt, str):
        ids, added_bos = text_prompt_ids(runtime, prompt, add_special_tokens)
    else:
        ids, added_bos = prompt, False
        bad = [token for token in ids if not 0 <= token < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside this model's vocabulary (0 to {vocab - 1})",
                           param="prompt", code="invalid_value")
    if not ids:
        raise ApiError(400, "the prompt has no tokens", param="prompt", code="invalid_value")
    image_token = runtime.model.image_token_id
    if image_token is not None and image_token in ids:
        raise ApiError(400, "the prompt contains the image soft token: /v1/completions takes text only (send images "
                            "to /v1/chat/completions)", param="prompt", code="invalid_value")
    pieces = widths.pieces(ids, skip_special=False)
    if isinstance(prompt, str):
        if added_bos and ids[0] == getattr(tokenizer, "bos_token_id", None):
            pieces[0] = ""  # the <bos> the tokenizer added is not in the prompt's text
        return ids, prompt, pieces
    return ids, "".join(pieces), pieces


def prepare_completion(app: "ChatCompletionServer", request: CompletionRequest) -> list[PromptJob]:
    """Check limits, tokenize every prompt, and make one scheduler job per prompt."""
    settings = app.settings
    app.check_model(request.model)
    if request.n > settings.max_n:
        raise ApiError(400, f"n={request.n} is over this server's limit of {settings.max_n}", param="n",
                       code="invalid_value")
    if request.max_tokens > settings.max_tokens:
        raise ApiError(400, f"max_tokens={request.max_tokens} is over this server's limit of {settings.max_tokens}",
                       param="max_tokens", code="invalid_value")
    sampling = app.constrained(request_sampling(app.runtime, request, max(request.max_tokens, 1)), request,
                               request.guided)
    context = app.scheduler.max_length
    # the prompt's scores: for echo with logprobs, and for vLLM's prompt_logprobs (as many alternatives as the
    # larger asks; each is cut to its own)
    asked = [k for k in (request.logprobs if request.echo else None, request.prompt_logprobs) if k is not None]
    prompt_logprobs = max(asked) if asked else None
    jobs = []
    for prompt in request.prompts:
        ids, echo_text, pieces = _encode(app, prompt, request.add_special_tokens)
        if len(ids) + request.max_tokens > context:
            raise ApiError(400, f"This server's maximum context length is {context} tokens; the prompt takes "
                                f"{len(ids)} and max_tokens asks for {request.max_tokens} more.", param="prompt",
                           code="context_length_exceeded")
        job = Job(prompt=EncodedPrompt(input_ids=torch.tensor(ids, dtype=torch.long)), sampling=sampling,
                  max_new_tokens=request.max_tokens, stop_strings=request.stop, n=request.n,
                  logprobs=request.logprobs, prompt_logprobs=prompt_logprobs)
        jobs.append(PromptJob(job, ids, echo_text, pieces))
    return jobs


class _Choice:
    """One choice's answer as it is built: its text so far and its legacy ``logprobs`` lists."""

    def __init__(self, app: "ChatCompletionServer", request: CompletionRequest):
        self.app, self.request = app, request
        self.length = 0  # characters of ``text`` so far

    def logprobs(self, entries: list[TokenLogprob | None], ids: list[int], pieces: list[str],
                 limit: int | None = None) -> dict[str, list] | None:
        """The legacy lists for ``entries`` (None: the first prompt token, ``ids[0]``), whose texts in ``text`` are
        ``pieces`` starting at ``self.length`` (offsets capped at ``limit``: text cut at a stop string)."""
        if self.request.logprobs is None:
            return None
        texts = self.app.token_texts
        tokens, values, tops = [], [], []
        for entry, token_id in zip(entries, ids):
            tokens.append(texts(token_id)[0])
            if entry is None:
                values.append(None)
                tops.append(None)
                continue
            values.append(entry.logprob)
            top: dict[str, float] = {}
            for alternative, value in entry.top:
                top.setdefault(texts(alternative)[0], value)
            top.setdefault(texts(entry.token_id)[0], entry.logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": _offsets(pieces, self.length, limit)}


def _cut(entries: list[TokenLogprob | None], top: int | None) -> list[TokenLogprob | None]:
    """``entries`` with at most ``top`` alternatives each (the prompt may have been scored for more)."""
    if top is None:
        return entries
    return [None if entry is None else replace(entry, top=entry.top[:top]) for entry in entries]


def _merge(parts: list[dict[str, list] | None]) -> dict[str, list] | None:
    parts = [part for part in parts if part is not None]
    if not parts:
        return None
    return {key: [value for part in parts for value in part[key]] for key in parts[0]}


def _choice_object(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def _response(completion_id: str, created: int, model: str, choices: list[dict], counts: dict | None,
              include_usage: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"id": completion_id, "object": "text_completion", "created": created, "model": model,
                            "choices": choices, "system_fingerprint": None}
    if include_usage:
        body["usage"] = counts
    return body


def _generated(app: "ChatCompletionServer", choice: _Choice, completion: Completion, start: int,
               limit: int) -> dict | None:
    """The legacy logprobs of a choice's generated tokens (and its stop token), their text from ``start``."""
    entries = list(completion.logprobs or ())
    if completion.stop_logprob is not None:
        entries.append(completion.stop_logprob)
    ids = [entry.token_id for entry in entries]
    pieces = app.completion_widths.pieces(ids, skip_special=True)
    choice.length = start
    return choice.logprobs(entries, ids, pieces, limit)


def _log(record: "RequestRecord", prompts: list[PromptJob], completions: list[Completion], stream: bool) -> dict:
    counts = usage(sum(len(p.ids) for p in prompts), sum(c.completion_tokens for c in completions))
    record.detail = (f"completions prompts={len(prompts)} prompt={counts['prompt_tokens']} "
                     f"completion={counts['completion_tokens']} "
                     f"finish={','.join(c.finish_reason for c in completions)} "
                     f"batch={max(p.job.batch_size for p in prompts)} stream={'yes' if stream else 'no'}"
                     + (f" n={prompts[0].job.n}" if prompts[0].job.n > 1 else ""))
    return counts


def serve_completion(handler: Any, body: bytes, record: "RequestRecord") -> None:
    """Answer one ``/v1/completions`` request on ``handler`` (the server's request handler)."""
    app = handler.app
    request = parse_completion_request(body)
    prompts = prepare_completion(app, request)
    jobs = [p.job for p in prompts]
    try:
        app.scheduler.submit_all(jobs)
    except QueueFull as exc:
        raise ApiError(429, f"the server is busy ({exc}); retry later", code="server_busy",
                       type="rate_limit_error") from None
    try:
        if request.stream:
            _stream(handler, app, request, prompts, record)
        else:
            _complete(handler, app, request, prompts, record)
    except BaseException:  # the client went away, a write timed out, a bug: nobody will read the rest
        for job in jobs:
            job.cancel()
        raise


def _complete(handler: Any, app: "ChatCompletionServer", request: CompletionRequest, prompts: list[PromptJob],
              record: "RequestRecord") -> None:
    choices, completions = [], []
    for number, prompt in enumerate(prompts):
        scored: list[TokenLogprob | None] = [None] * len(prompt.ids)
        done: dict[int, Completion] = {}
        for event in app.events(prompt.job, handler._client_gone):
            error = app.failure(event)
            if error is not None:
                raise error
            if event[0] == "prompt_logprobs":
                scored = event[1]
            elif event[0] == "done":
                done[event[1]] = event[2]
        for index in range(request.n):
            completion = done[index]
            completions.append(completion)
            choice = _Choice(app, request)
            echoed = prompt.echo_text if request.echo else ""
            text = echoed + completion.text
            head = choice.logprobs(_cut(scored, request.logprobs), prompt.ids, prompt.echo_pieces) \
                if request.echo else None
            tail = _generated(app, choice, completion, len(echoed), len(text))
            choices.append(_choice_object(number * request.n + index, text, _merge([head, tail]),
                                          completion.finish_reason))
            if request.prompt_logprobs is not None:  # (vLLM's, on each choice)
                choices[-1]["prompt_logprobs"] = prompt_logprobs_object(scored, request.prompt_logprobs,
                                                                        app.token_texts)
    counts = _log(record, prompts, completions, stream=False)
    handler._send_json(200, _response(f"cmpl-{uuid.uuid4().hex}", now(), app.model_name, choices, counts))


def _stream(handler: Any, app: "ChatCompletionServer", request: CompletionRequest, prompts: list[PromptJob],
            record: "RequestRecord") -> None:
    from gemma3vl.infer.server import _sse

    completion_id, created, model = f"cmpl-{uuid.uuid4().hex}", now(), app.model_name

    def send(choice: dict | None, counts: dict | None = None) -> None:
        handler._write_chunk(_sse(_response(completion_id, created, model, [] if choice is None else [choice],
                                            counts, include_usage=request.include_usage)))

    handler.start_event_stream()
    completions: list[Completion] = []
    failed = False
    for number, prompt in enumerate(prompts):
        states = [_Choice(app, request) for _ in range(request.n)]

        def echo(scored: list[TokenLogprob | None]) -> None:
            for index, state in enumerate(states):
                head = state.logprobs(scored, prompt.ids, prompt.echo_pieces)
                send(_choice_object(number * request.n + index, prompt.echo_text, head, None))
                state.length = len(prompt.echo_text)

        if request.echo and request.logprobs is None:
            echo([None] * len(prompt.ids))
        for event in app.events(prompt.job, handler._client_gone):
            error = app.failure(event)
            if error is not None:
                record.status, record.detail = error.status, f"error in stream: {error.message}"
                handler._write_chunk(_sse(error.body()))
                failed = True
                break
            if event[0] == "prompt_logprobs":
                if request.echo:
                    echo(event[1])
            elif event[0] == "text":
                _, index, (text, entries) = event
                state = states[index]
                ids = [entry.token_id for entry in entries or ()]
                lists = state.logprobs(entries or [], ids, app.completion_widths.pieces(ids, skip_special=True))
                send(_choice_object(number * request.n + index, text, lists, None))
                state.length += len(text)
            elif event[0] == "done":
                _, index, completion = event
                completions.append(completion)
                state = states[index]
                stop = [completion.stop_logprob] if completion.stop_logprob is not None else []
                lists = state.logprobs(stop, [e.token_id for e in stop], [""] * len(stop)) if stop else None
                send(_choice_object(number * request.n + index, "", lists, completion.finish_reason))
        if failed:
            for other in prompts:
                other.job.cancel()
            break
    if not failed:
        counts = _log(record, prompts, completions, stream=True)
        if request.include_usage:
            send(None, counts)
    handler._write_chunk(b"data: [DONE]\n\n")
    handler._write_chunk(b"")
