"""OpenAI's chat-completions wire format: request validation, response and chunk objects, error bodies.

Kept apart from the HTTP server so the rules are in one place and can be read (and tested) as data: what a
request may contain, which fields are refused rather than silently ignored, and the exact shapes OpenAI's
clients parse (``chat.completion``, ``chat.completion.chunk``, ``{"error": {...}}``).

Status codes: 400 malformed or invalid request; 403 an image source the server's settings do not allow;
404 unknown route or model; 405 wrong method; 411 no Content-Length; 413 request body or image over a size
limit; 422 a valid request this checkpoint cannot serve (images for a text-only model); 500 engine failure;
503 shutting down.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

from gemma3vl.errors import Gemma3VLError, SettingError
from gemma3vl.infer.json_values import is_int as _is_int
from gemma3vl.infer.prompt import lone_surrogate_at
from gemma3vl.infer.prompt_options import PromptOptionError, checked_processor_kwargs, checked_template_kwargs
from gemma3vl.infer.structured import Constraint, text_constraint
from gemma3vl.infer.tool_calls import ToolCall, ToolError, ToolUse, parse_history_calls, tool_use_of

if TYPE_CHECKING:
    from gemma3vl.infer.logprobs import TokenLogprob
    from gemma3vl.infer.runtime import InferenceRuntime
    from gemma3vl.infer.sampling import Sampling

ERROR_TYPES = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    411: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}
ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
PENALTY_RANGE = (-2.0, 2.0)  # presence_penalty and frequency_penalty, as OpenAI's

# Fields whose non-default values would change the answer in ways this server does not implement: refused
# with a 400 rather than ignored. Each maps to a predicate telling whether the given value is harmless. (The chat
# endpoint implements tools: TOOL_FIELDS; the legacy and Responses endpoints refuse them.)
UNSUPPORTED_UNLESS_DEFAULT = {
    "tools": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: v in (None, []),
    "function_call": lambda v: v in (None, "none"),
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "parallel_tool_calls": lambda v: v in (None, True),
    # other servers' sampling extensions (vLLM's, sent through the openai client's extra_body): silently ignoring
    # them would change the answer without a word
    # (vLLM's repetition_penalty, min_p, min_tokens, ignore_eos, stop_token_ids, include_stop_str_in_output,
    # allowed_token_ids, bad_words, prompt_logprobs, guided_*, structured_outputs and skip_special_tokens are
    # implemented: shared_fields)
    "best_of": lambda v: v in (None, 1),
    "use_beam_search": lambda v: v in (None, False),
    "logits_processors": lambda v: v in (None, []),
    "truncate_prompt_tokens": lambda v: v is None,
    "return_tokens_as_token_ids": lambda v: v in (None, False),
}
# vLLM's chat-only extensions, which change how the conversation is read: refused by the chat and Responses
# endpoints unless they hold their harmless value (``echo`` is the legacy endpoint's own, implemented there;
# ``continue_final_message`` with ``add_generation_prompt: false`` is the chat endpoint's: parse_chat_request)
CHAT_UNSUPPORTED_UNLESS_DEFAULT = {
    "echo": lambda v: v in (None, False),
    "add_special_tokens": lambda v: v in (None, False),
    "chat_template": lambda v: v is None,
    "documents": lambda v: v in (None, []),
}
# (vLLM's chat_template_kwargs and mm_processor_kwargs are taken by the chat endpoint, the Responses API and
# /tokenize: prompt_options_of)
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's: a 64-bit integer
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")  # the chat endpoint's (tool_calls.tool_use_of)


class ApiError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def generation_error(message: str, *, stopping: bool) -> ApiError:
    """A generation that ended in an error: 500 ``generation_failed``, or, when a stopping server ended it, 503
    ``unavailable`` (what a request still waiting then gets)."""
    if stopping:
        return ApiError(503, message, code="unavailable")
    return ApiError(500, message, code="generation_failed")


@dataclass
class ImagePart:
    """An ``image_url`` part, not fetched yet; ``param`` names it in errors (``messages[1].content[0]``)."""

    url: str
    param: str


@dataclass
class RequestMessage:
    role: str  # system, user, assistant ("developer" arrives as "system") or, on the chat endpoint, tool
    parts: list[str | ImagePart]
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant message's calls
    tool_call_id: str | None = None  # a tool message's: the call it answers
    param: str | None = None  # where the request gave it ("messages[2]"), for errors found later


@dataclass(kw_only=True)
class SharedFields:
    """What chat and legacy completions requests share (``shared_fields`` parses them)."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, Any] | None = None  # {token id: bias}; its entries are checked against the vocabulary later
    # vLLM's extensions (the openai client's extra_body): transformers' min-p and repetition penalty (None: the
    # checkpoint's generation config), no stop at the checkpoint's EOS ids, more stop token ids, no stop before
    # min_tokens tokens (None: the checkpoint's generation config's min_new_tokens)
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int | None = None
    include_stop_str_in_output: bool = False  # the answer's text ends after its stop string, not before it
    skip_special_tokens: bool = True  # False: special tokens (<start_of_image>, ...) stay in the answer's text
    allowed_token_ids: tuple[int, ...] = ()  # the answer holds only these tokens (); every token)
    bad_words: tuple[str, ...] = ()  # words the answer never holds (vLLM's: tokenized by runtime.bad_words_ids)
    prompt_logprobs: int | None = None  # each prompt token's logprob and this many alternatives' (None: none)
    # vLLM's guided_json / guided_regex / guided_choice / guided_grammar, or structured_outputs: what the answer must
    # be (None: free text, or the chat endpoint's response_format)
    guided: Constraint | None = None


@dataclass(kw_only=True)
class ChatRequest(SharedFields):
    messages: list[RequestMessage]
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"  # the field it came from (errors name it)
    messages_param: str = "messages"  # the field the conversation came from (the Responses API's: input)
    n: int = 1  # choices; the server's max_n limits it
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token, with logprobs
    # response_format json_object / json_schema: the JSON Schema the answer follows ({"type": "object"} for
    # json_object); None: free text
    json_schema: dict[str, Any] | None = None
    # vLLM's (transformers' apply_chat_template option): the last, assistant, message is left open and the answer
    # continues it (the answer holds only the continuation)
    continue_final_message: bool = False
    tool_use: ToolUse | None = None  # tools, tool_choice, parallel_tool_calls (None: no tools)
    # vLLM's chat_template_kwargs (the chat template's own variables) and mm_processor_kwargs (pan & scan settings),
    # checked (prompt_options)
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    processor_kwargs: dict[str, Any] = field(default_factory=dict)


def _invalid(message: str, param: str | None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(body: dict, key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_number(value) or not low <= value <= high:
        raise _invalid(f"'{key}' must be a number between {low:g} and {high:g}, got {value!r}", key)
    return float(value)


def _parse_part(part: Any, param: str) -> str | ImagePart:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise _invalid(f"'{param}' must be an object with a 'type'", param)
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise _invalid(f"'{param}.text' must be a string", f"{param}.text")
        return part["text"]
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise _invalid(f"'{param}.image_url.url' must be a non-empty string", f"{param}.image_url.url")
        return ImagePart(url=url, param=f"{param}.image_url.url")
    raise _invalid(f"'{param}.type' {kind!r} is not supported (use 'text' or 'image_url')", f"{param}.type",
                   "unsupported_content_type")


def parse_message(message: Any, param: str,
                  parse_part: Callable[[Any, str], str | ImagePart] | None = None, *,
                  tool_messages: bool = False) -> RequestMessage:
    """One message (``{"role", "content"}``, named ``param`` in errors): its role (``developer`` read as ``system``)
    and its parts, a string content being one text part; a list content's parts read by ``parse_part`` (chat
    completions' ``text`` / ``image_url`` parts by default). Images only in user messages. With ``tool_messages``
    (the chat endpoint), also ``tool`` messages (``tool_call_id``, and the result as content) and an assistant
    message's ``tool_calls`` (its content then may be null)."""
    parse_part = parse_part or _parse_part
    if not isinstance(message, dict):
        raise _invalid(f"'{param}' must be an object with 'role' and 'content'", param)
    role = message.get("role")
    roles = [*ROLE_ALIASES, *(("tool",) if tool_messages else ())]
    if role not in roles:
        raise _invalid(f"'{param}.role' must be one of {', '.join(roles)}; got {role!r}", f"{param}.role")
    content = message.get("content")
    calls: tuple[ToolCall, ...] = ()
    call_id = None
    if tool_messages and message.get("tool_calls") not in (None, []):
        if role != "assistant":
            raise _invalid(f"'{param}.tool_calls': only assistant messages make calls", f"{param}.tool_calls")
        try:
            calls = parse_history_calls(message["tool_calls"], f"{param}.tool_calls")
        except ToolError as exc:
            raise _invalid(str(exc), exc.param) from None
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise ApiError(400, f"Missing required parameter: '{param}.tool_call_id' (the id of the call it "
                                "answers).", param=f"{param}.tool_call_id", code="missing_required_parameter")
    refusal = message.get("refusal") if role == "assistant" else None  # (OpenAI's assistant messages may hold one)
    if refusal is not None and not isinstance(refusal, str):
        raise _invalid(f"'{param}.refusal' must be a string", f"{param}.refusal")
    if isinstance(content, str):
        parts: list[str | ImagePart] = [content]
    elif content is None and role == "assistant" and (calls or "content" in message or refusal is not None):
        parts = [refusal] if refusal else []  # (an assistant turn with nothing said: as OpenAI takes it)
    elif isinstance(content, list):
        if role == "assistant" and parse_part is _parse_part:  # chat's refusal parts: what the assistant said
            content = [{"type": "text", "text": part.get("refusal")}
                       if isinstance(part, dict) and part.get("type") == "refusal" else part for part in content]
        parts = [parse_part(part, f"{param}.content[{i}]") for i, part in enumerate(content)]
    elif "content" not in message:
        raise ApiError(400, f"Missing required parameter: '{param}.content'.", param=f"{param}.content",
                       code="missing_required_parameter")
    else:
        raise _invalid(f"'{param}.content' must be a string or a list of content parts", f"{param}.content")
    role = ROLE_ALIASES.get(role, role)
    if role != "user" and any(isinstance(p, ImagePart) for p in parts):
        raise _invalid(f"'{param}': images can only be sent in user messages", f"{param}.content")
    return RequestMessage(role=role, parts=parts, tool_calls=calls, tool_call_id=call_id, param=param)


def _parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)
            or len(stops) > MAX_STOP_STRINGS):
        raise _invalid(f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
    return tuple(stops)


def _parse_logprobs(body: dict) -> tuple[bool, int]:
    """``logprobs`` (a boolean) and ``top_logprobs`` (0 .. 20 alternatives per token, only with logprobs)."""
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _invalid(f"'logprobs' must be a boolean, got {logprobs!r}", "logprobs")
    top = body.get("top_logprobs")
    if top is None:
        return bool(logprobs), 0
    if not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise _invalid(f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}", "top_logprobs")
    if top and not logprobs:
        raise _invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return bool(logprobs), top


def _parse_response_format(value: Any) -> dict[str, Any] | None:
    """OpenAI's ``response_format``: ``{"type": "text"}`` (free text: None), ``{"type": "json_object"}`` (any JSON
    object) or ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``; the JSON
    Schema the answer must follow. Whether the schema can be compiled is the server's check (it needs xgrammar)."""
    param = "response_format"
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}  # any JSON object (structured.ANY_OBJECT)
    if kind != "json_schema":
        raise _invalid(f"'response_format' must be an object whose 'type' is 'text', 'json_object' or 'json_schema', "
                       f"got {value!r}", param)
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ApiError(400, "Missing required parameter: 'response_format.json_schema' (an object with 'name' and "
                            "'schema').", param=param, code="missing_required_parameter")
    return json_schema_of(spec, "response_format.json_schema", param)


def json_schema_of(spec: dict, where: str, param: str) -> dict[str, Any]:
    """The ``schema`` of a JSON-schema output format ``spec`` (``name``, ``schema``, optional ``strict`` and
    ``description``), checked; ``where`` is its path in the request (chat completions' ``response_format.json_schema``,
    the Responses API's ``text.format``), ``param`` the field errors name."""
    for key in ("name", "schema"):
        if key not in spec:
            raise ApiError(400, f"Missing required parameter: '{where}.{key}'.", param=param,
                           code="missing_required_parameter")
    if not isinstance(spec["name"], str) or not spec["name"]:
        raise _invalid(f"'{where}.name' must be a non-empty string", param)
    if not isinstance(spec["schema"], dict):
        raise _invalid(f"'{where}.schema' must be a JSON Schema object", param)
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise _invalid(f"'{where}.strict' must be a boolean", param)
    return spec["schema"]


def shared_fields(body: dict) -> dict[str, Any]:
    """The fields chat and legacy completions share, checked: ``model``, the sampling settings, ``stop``, ``stream``
    (+ ``stream_options.include_usage``) and the penalties, as keyword arguments of either request class."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _invalid("'model' must be a string", "model")
    top_k = body.get("top_k")
    if top_k is not None and not _is_int(top_k):
        raise _invalid(f"'top_k' must be an integer, got {top_k!r}", "top_k")
    seed = body.get("seed")
    if seed is not None and not (_is_int(seed) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise _invalid(f"'seed' must be a 64-bit integer, got {seed!r}", "seed")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage") or False, bool):
            raise _invalid("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
        include_usage = bool(options.get("include_usage"))
        if options.get("continuous_usage_stats") not in (None, False):  # vLLM's: usage in every chunk
            raise ApiError(400, "'stream_options.continuous_usage_stats' is not supported by this server (the usage "
                                "comes in the last chunk, with include_usage)", param="stream_options",
                           code="unsupported_parameter")
    logit_bias = body.get("logit_bias")
    if logit_bias is not None and not isinstance(logit_bias, dict):
        raise _invalid("'logit_bias' must be an object mapping token ids to biases from -100 to 100", "logit_bias")
    repetition_penalty = body.get("repetition_penalty")
    if repetition_penalty is not None and not (_is_number(repetition_penalty) and 0 < repetition_penalty < math.inf):
        raise _invalid(f"'repetition_penalty' must be a number > 0, got {repetition_penalty!r}", "repetition_penalty")
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise _invalid("'ignore_eos' must be a boolean", "ignore_eos")
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is not None and not (isinstance(stop_token_ids, list)
                                           and all(_is_int(t) and t >= 0 for t in stop_token_ids)):
        raise _invalid("'stop_token_ids' must be a list of token ids", "stop_token_ids")
    min_tokens = body.get("min_tokens")
    if min_tokens is not None and not (_is_int(min_tokens) and min_tokens >= 0):
        raise _invalid(f"'min_tokens' must be an integer >= 0, got {min_tokens!r}", "min_tokens")
    include_stop = body.get("include_stop_str_in_output")
    skip_special = body.get("skip_special_tokens")
    # vLLM's spaces_between_special_tokens changes nothing here: Gemma's tokenizer (a fast one, as vLLM's
    # detokenizer then ignores the setting too) writes no space between special tokens either way (tested)
    for name, value in (("include_stop_str_in_output", include_stop), ("skip_special_tokens", skip_special),
                        ("spaces_between_special_tokens", body.get("spaces_between_special_tokens"))):
        if value is not None and not isinstance(value, bool):
            raise _invalid(f"'{name}' must be a boolean", name)
    bad_words = body.get("bad_words")
    if bad_words is not None and not (isinstance(bad_words, list) and all(isinstance(w, str) and w.strip()
                                                                           for w in bad_words)):
        raise _invalid("'bad_words' must be a list of words (non-blank strings)", "bad_words")
    prompt_logprobs = body.get("prompt_logprobs")
    if prompt_logprobs is not None:
        if not (_is_int(prompt_logprobs) and 0 <= prompt_logprobs <= MAX_TOP_LOGPROBS):
            raise _invalid(f"'prompt_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS} (alternatives per "
                           f"prompt token), got {prompt_logprobs!r}", "prompt_logprobs")
        if stream:
            raise _invalid("'prompt_logprobs' does not go with 'stream' (as in vLLM)", "prompt_logprobs")
    guided = guided_constraint(body)
    allowed = body.get("allowed_token_ids")
    if allowed is not None and not (isinstance(allowed, list) and allowed and all(_is_int(t) and t >= 0
                                                                                   for t in allowed)):
        raise _invalid("'allowed_token_ids' must be a non-empty list of token ids", "allowed_token_ids")
    return dict(
        model=model,
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0),
        top_k=top_k if top_k is not None and top_k > 0 else None,  # 0 / -1: no top-k (vLLM's convention)
        seed=seed,
        stop=_parse_stop(body.get("stop")),
        stream=bool(stream),
        include_usage=include_usage,
        presence_penalty=_number(body, "presence_penalty", *PENALTY_RANGE) or 0.0,
        frequency_penalty=_number(body, "frequency_penalty", *PENALTY_RANGE) or 0.0,
        logit_bias=logit_bias or None,
        min_p=_number(body, "min_p", 0.0, 1.0),
        repetition_penalty=None if repetition_penalty is None else float(repetition_penalty),
        ignore_eos=bool(ignore_eos),
        stop_token_ids=tuple(stop_token_ids or ()),
        min_tokens=min_tokens,
        include_stop_str_in_output=bool(include_stop),
        skip_special_tokens=skip_special is not False,
        allowed_token_ids=tuple(sorted(set(allowed or ()))),
        bad_words=tuple(bad_words or ()),
        prompt_logprobs=prompt_logprobs,
        guided=guided,
    )


GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
STRUCTURED_OUTPUTS_KINDS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar",
                            "json_object": "json"}


def guided_constraint(body: dict) -> Constraint | None:
    """vLLM's structured-output fields as one :class:`Constraint`: ``guided_json`` (a JSON Schema, or its JSON
    text), ``guided_regex``, ``guided_choice`` (a list of strings), ``guided_grammar`` (EBNF), or the newer
    ``structured_outputs`` object holding one of ``json`` / ``regex`` / ``choice`` / ``grammar`` / ``json_object``.
    At most one; whether xgrammar can compile it is the server's check."""
    given = [(name, body[name]) for name in (*GUIDED_FIELDS, "structured_outputs") if body.get(name) is not None]
    if len(given) > 1:
        raise _invalid(f"give one structured-output constraint, not {' and '.join(name for name, _ in given)}",
                       given[1][0])
    if not given:
        return None
    name, value = given[0]
    if name == "structured_outputs":
        if not isinstance(value, dict):
            raise _invalid("'structured_outputs' must be an object", name)
        kinds = [key for key in STRUCTURED_OUTPUTS_KINDS if value.get(key) not in (None, False)]
        others = sorted(key for key in value if key not in STRUCTURED_OUTPUTS_KINDS and value[key] is not None)
        if others:
            raise ApiError(400, f"'structured_outputs.{others[0]}' is not supported by this server", param=name,
                           code="unsupported_parameter")
        if len(kinds) != 1:
            raise _invalid("'structured_outputs' must hold one of 'json', 'regex', 'choice', 'grammar' or "
                           "'json_object'", name)
        key = kinds[0]
        if key == "json_object":
            if value[key] is not True:
                raise _invalid("'structured_outputs.json_object' must be true", name)
            return Constraint("json", {"type": "object"}, name)
        return _constraint(STRUCTURED_OUTPUTS_KINDS[key], value[key], f"structured_outputs.{key}", name)
    return _constraint(GUIDED_FIELDS[name], value, name, name)


def _constraint(kind: str, value: Any, where: str, param: str) -> Constraint:
    if kind == "json":
        if isinstance(value, str):  # (vLLM takes the schema's JSON text too)
            try:
                value = json.loads(value)
            except ValueError:
                raise _invalid(f"'{where}' must be a JSON Schema (an object, or its JSON text)", param) from None
        if not isinstance(value, dict):
            raise _invalid(f"'{where}' must be a JSON Schema (an object, or its JSON text)", param)
    else:
        try:
            return text_constraint(kind, value, where, param)
        except Gemma3VLError as exc:
            raise _invalid(str(exc), param) from None
    return Constraint(kind, value, param)


def request_sampling(runtime: InferenceRuntime, request: SharedFields, max_new_tokens: int) -> Sampling:
    """The :class:`Sampling` of a request's shared fields on top of the checkpoint's defaults, checked: a value out
    of range (a ``logit_bias`` token outside the vocabulary, ...) is a 400 naming its field. Temperature 0 or top-p
    0 mean greedy decoding, as OpenAI's API reads them. The answer stops at the checkpoint's EOS ids (not with
    vLLM's ``ignore_eos``) and at ``stop_token_ids``, not before ``min_tokens`` tokens (at most ``max_new_tokens``,
    the answer's limit, as vLLM checks)."""
    if request.min_tokens is not None and request.min_tokens > max_new_tokens:
        raise _invalid(f"'min_tokens' ({request.min_tokens}) must be at most the answer's token limit "
                       f"({max_new_tokens})", "min_tokens")
    greedy = request.temperature == 0 or request.top_p == 0
    vocab = runtime.config.text.vocab_size
    for name in ("stop_token_ids", "allowed_token_ids"):
        outside = [token for token in getattr(request, name) if token >= vocab]
        if outside:
            raise _invalid(f"'{name}' holds {outside[0]}, outside the vocabulary (ids 0 to {vocab - 1})", name)
    try:
        sampling = runtime.sampling(
            max_new_tokens=max_new_tokens, greedy=greedy, temperature=None if greedy else request.temperature,
            top_k=request.top_k, top_p=None if greedy else request.top_p, seed=request.seed,
            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
            logit_bias=request.logit_bias, min_p=None if greedy else request.min_p,
            repetition_penalty=request.repetition_penalty, min_new_tokens=request.min_tokens,
        )
        stops = () if request.ignore_eos else sampling.stop_token_ids
        sampling = replace(sampling, stop_token_ids=tuple(sorted({*stops, *request.stop_token_ids})),
                           include_stop_strings=request.include_stop_str_in_output,
                           skip_special_tokens=request.skip_special_tokens,
                           allowed_token_ids=request.allowed_token_ids,
                           bad_words_ids=runtime.bad_words_ids(request.bad_words))
        sampling.validate()
    except SettingError as exc:
        raise ApiError(400, str(exc), param=exc.name, code="invalid_value") from None
    except Gemma3VLError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None
    return sampling


def json_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or the 400 ``invalid_json`` that says why it is not one."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, an integer of > 4300 digits, deep nesting
        raise ApiError(400, f"We could not parse the JSON body of your request ({exc}).", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    surrogate = lone_surrogate_at(body)
    if surrogate is not None:  # (JSON's "\ud800": the tokenizer, and any UTF-8 output, would fail on it)
        where, char = surrogate
        raise ApiError(400, f"'{where}' holds a lone surrogate ({char.encode('unicode_escape').decode()}), which is "
                            "not Unicode text", param=where or None, code="invalid_value")
    return body


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Validate a request body's syntax and field types (limits and image fetching come later)."""
    body = json_body(raw)
    if "messages" not in body:
        raise ApiError(400, "Missing required parameter: 'messages'.", param="messages",
                       code="missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty list", "messages")
    for key, harmless in {**UNSUPPORTED_UNLESS_DEFAULT, **CHAT_UNSUPPORTED_UNLESS_DEFAULT}.items():
        if key in body and key not in TOOL_FIELDS and not harmless(body[key]):
            raise ApiError(400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")
    tool_use = tool_use_of_body(body)
    n = body.get("n")
    if n is not None and not (_is_int(n) and n >= 1):
        raise _invalid(f"'n' must be an integer >= 1, got {n!r}", "n")
    logprobs, top_logprobs = _parse_logprobs(body)
    max_tokens, max_tokens_param = None, "max_tokens"
    for key in ("max_tokens", "max_completion_tokens"):  # the newer name wins when both are given
        value = body.get(key)
        if value is not None:
            if not _is_int(value) or value < 1:
                raise _invalid(f"'{key}' must be an integer >= 1, got {value!r}", key)
            max_tokens, max_tokens_param = value, key
    return ChatRequest(
        messages=[parse_message(message, f"messages[{i}]", tool_messages=True) for i, message in enumerate(messages)],
        max_tokens=max_tokens,
        max_tokens_param=max_tokens_param,
        **shared_fields(body),
        n=n or 1,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        json_schema=_parse_response_format(body.get("response_format")),
        continue_final_message=continue_final_message_of(body),
        tool_use=tool_use,
        **prompt_options_of(body),
    )


def prompt_options_of(body: dict) -> dict[str, dict[str, Any]]:
    """vLLM's ``chat_template_kwargs`` and ``mm_processor_kwargs`` of a request, checked
    (:mod:`gemma3vl.infer.prompt_options`), as ``template_kwargs`` and ``processor_kwargs``; a 400 naming the field."""
    try:
        return {"template_kwargs": checked_template_kwargs(body.get("chat_template_kwargs")),
                "processor_kwargs": checked_processor_kwargs(body.get("mm_processor_kwargs"))}
    except PromptOptionError as exc:
        raise _invalid(str(exc), exc.field) from None


def tool_use_of_body(body: dict, *, flat: bool = False) -> ToolUse | None:
    """A request's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` (:mod:`gemma3vl.infer.tool_calls`; ``flat``:
    the Responses API's forms), a 400 naming the field at fault. (A forced call, ``required`` or a named function, is
    decoded under its own grammar: the server refuses it beside another constraint, ``ChatCompletionServer.prepare``.)"""
    try:
        use = tool_use_of(body, flat=flat)
    except ToolError as exc:
        raise _invalid(str(exc), exc.param, exc.code) from None
    return use


def continue_final_message_of(body: dict) -> bool:
    """vLLM's ``continue_final_message`` (with ``add_generation_prompt`` false or left out): the chat template
    without a generation prompt, the last message open. ``add_generation_prompt: false`` alone would have the model
    write the next turn's header itself: refused."""
    continuing, prompt = body.get("continue_final_message"), body.get("add_generation_prompt")
    for name, value in (("continue_final_message", continuing), ("add_generation_prompt", prompt)):
        if value is not None and not isinstance(value, bool):
            raise _invalid(f"'{name}' must be a boolean", name)
    if continuing and prompt:
        raise _invalid("'continue_final_message' and 'add_generation_prompt' cannot both be true: the final message "
                       "is continued, or the model starts a new one", "continue_final_message")
    if prompt is False and not continuing:
        raise ApiError(400, "'add_generation_prompt': false is supported only with 'continue_final_message': true",
                       param="add_generation_prompt", code="unsupported_parameter")
    if continuing and body.get("response_format") not in (None, {"type": "text"}):
        raise _invalid("'continue_final_message' does not go with a JSON response_format: the JSON answer starts "
                       "afresh", "continue_final_message")
    return bool(continuing)


# ---------------------------------------------------------------------------------------------- responses
def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def logprobs_object(entries: list[TokenLogprob], token_text: Callable[[int], tuple[str, list[int]]]) -> dict[str, Any]:
    """A choice's (or a chunk's) ``logprobs``: ``{"content": [...], "refusal": null}``, one item per token with its
    text, logprob, UTF-8 bytes and ``top_logprobs``; ``token_text(id)`` gives a token's text and bytes."""

    def token(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    content = [{**token(entry.token_id, entry.logprob), "top_logprobs": [token(*pair) for pair in entry.top]}
               for entry in entries]
    return {"content": content, "refusal": None}


def prompt_logprobs_object(entries: list[TokenLogprob | None], top: int,
                           token_text: Callable[[int], tuple[str, list[int]]]) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token (None for the first, which nothing predicts) a dict from token
    id to ``{"logprob", "rank", "decoded_token"}``: the prompt's own token (its rank: how many tokens are at least
    as likely), then the ``top`` likeliest (ranks 1 to ``top``), each token once."""

    def item(token_id: int, logprob: float, rank: int | None) -> dict[str, Any]:
        return {"logprob": logprob, "rank": rank, "decoded_token": token_text(token_id)[0]}

    listed: list[dict[str, Any] | None] = []
    for entry in entries:
        if entry is None:
            listed.append(None)
            continue
        tokens = {str(entry.token_id): item(entry.token_id, entry.logprob, entry.rank)}
        for rank, (token_id, logprob) in enumerate(entry.top[:top], start=1):
            tokens.setdefault(str(token_id), item(token_id, logprob, rank))
        listed.append(tokens)
    return listed


def choice_object(index: int, message: dict[str, Any], finish_reason: str,
                  logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``chat.completion`` choice; ``message`` is ``tool_calls.message_object``'s."""
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_object(completion_id: str, created: int, model: str, choices: list[dict[str, Any]],
                      usage_counts: dict[str, int]) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_counts,
        "system_fingerprint": None,
    }


def chunk_choice(index: int, delta: dict[str, Any], finish_reason: str | None = None,
                 logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def chunk_object(completion_id: str, created: int, model: str, choices: list[dict[str, Any]], *,
                 include_usage: bool = False, usage_counts: dict[str, int] | None = None) -> dict[str, Any]:
    """One streamed chunk; no ``choices`` and ``usage_counts`` make the usage-only chunk that ends a stream
    requested with ``stream_options.include_usage``."""
    chunk: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
    }
    if include_usage:
        chunk["usage"] = usage_counts
    return chunk


def models_object(model: str, created: int, max_model_len: int) -> dict[str, Any]:
    """``GET /v1/models``: the one model served, with vLLM's ``max_model_len`` (the positions a request may take,
    prompt and answer together), which clients read to size their requests."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "gemma3vl",
                                        "max_model_len": max_model_len}]}
