"""``POST /v1/responses``: OpenAI's Responses API, for the clients that speak it rather than chat completions
(the OpenAI Agents SDK, ``client.responses.create`` / ``.stream`` / ``.parse``).

A request is read into the same :class:`ChatRequest` a chat completion is (the same limits, images, chat template,
sampling and JSON output), so the two endpoints give the same answer to the same conversation:

* ``input``: a string (one user message), or a list of messages ``{"role", "content"}`` (``"type": "message"``
  optional) whose content is a string or a list of ``input_text`` / ``input_image`` parts (``image_url``: a
  ``data:`` URL, or a file or http(s) URL under the server's image settings) and, for earlier assistant turns,
  ``output_text`` (or ``refusal``) parts;
* ``instructions``: the system message (joined before a leading system or developer message of ``input``: Gemma's
  template takes one);
* ``max_output_tokens``, ``temperature``, ``top_p``, ``stream``, ``text.format`` (``text``, ``json_object``, or
  ``json_schema`` with ``name`` / ``schema`` / ``strict``), ``metadata`` (echoed back), and the chat endpoint's
  extensions (``top_k``, ``seed``, ``stop``, the penalties).

Answers are kept in memory (``store``, true unless the request says false, within the server's
``response_store_bytes``, the least recently used dropped first) for ``previous_response_id``, which continues the
conversation a kept response answered (its input, its predecessors', and its answer; not its ``instructions``, as
OpenAI's), and for ``GET`` / ``DELETE /v1/responses/ID``. Kept responses do not survive a restart.

Function tools (``tools: [{"type": "function", "name", "description", "parameters", "strict"}]``, ``tool_choice``
``auto`` / ``none`` / ``required`` / ``{"type": "function", "name"}``, ``parallel_tool_calls``) work as on the chat
endpoint (:mod:`gemma3vl.infer.tool_calls`): input items ``function_call`` (``call_id``, ``name``, ``arguments``) and
``function_call_output`` (``call_id``, ``output``) are the history's calls and results, and an answer that is calls
is answered as ``function_call`` output items (``id`` ``fc_...``, ``call_id`` ``call_...``), streamed as
``response.output_item.added``, ``response.function_call_arguments.delta`` / ``.done`` and
``response.output_item.done``. A kept response keeps its calls, so ``previous_response_id`` with the
``function_call_output`` items continues it.

What this server does not do is refused with a 400 naming the field, never ignored: hosted tools (web search, file
search, ...), ``conversation`` objects, background runs, reasoning settings, ``truncation: auto``, prompt templates.
``include: ["message.output_text.logprobs"]`` (or ``top_logprobs``, 0 to 20) gives the output text's per-token
log-probabilities, as the chat endpoint computes them; ``include``'s other values name items these answers never
hold (reasoning, tool calls, echoed inputs) and change nothing.

The answer is a ``response`` object whose one output item is the assistant ``message`` (one ``output_text``
part); ``status`` is ``completed``, or ``incomplete`` with ``incomplete_details.reason: max_output_tokens`` when
the token limit ended it. Streamed, it is OpenAI's sequence of server-sent events (``event:`` and ``data:`` lines,
each with a ``sequence_number``): ``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta`` per piece of text, ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done``, then ``response.completed`` (or
``response.incomplete``) with the whole response and its usage; a generation that fails sends ``error`` and
``response.failed``.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from gemma3vl.infer.completion import FINISH_LENGTH, Completion
from gemma3vl.infer.openai_protocol import (
    CHAT_UNSUPPORTED_UNLESS_DEFAULT,
    MAX_TOP_LOGPROBS,
    UNSUPPORTED_UNLESS_DEFAULT,
    ApiError,
    ChatRequest,
    ImagePart,
    RequestMessage,
    _invalid,
    _is_int,
    json_body,
    json_schema_of,
    now,
    parse_message,
    prompt_options_of,
    shared_fields,
    tool_use_of_body,
)
from gemma3vl.infer.scheduler import Job, QueueFull
from gemma3vl.infer.tool_calls import (
    FINISH_TOOL_CALLS,
    CallPiece,
    ReadAnswer,
    StreamedCalls,
    StreamedForcedCalls,
    ToolCall,
    ToolError,
    ToolUse,
    checked_arguments,
    read_answer,
)

if TYPE_CHECKING:
    from gemma3vl.infer.logprobs import TokenLogprob
    from gemma3vl.infer.server import RequestRecord

# Fields of the Responses API this server does not implement: refused unless they hold their harmless value.
RESPONSES_UNSUPPORTED = {
    **UNSUPPORTED_UNLESS_DEFAULT,
    **CHAT_UNSUPPORTED_UNLESS_DEFAULT,
    "add_generation_prompt": lambda v: v in (None, True),
    "prompt_logprobs": lambda v: v is None,
    "continue_final_message": lambda v: v in (None, False),
    "conversation": lambda v: v is None,
    "background": lambda v: v in (None, False),
    "reasoning": lambda v: v is None or (isinstance(v, dict) and all(x is None for x in v.values())),
    "truncation": lambda v: v in (None, "disabled"),
    "prompt": lambda v: v is None,
    "max_tool_calls": lambda v: v is None,
    "n": lambda v: v in (None, 1),
}
WHY_UNSUPPORTED = {
    "conversation": "this server keeps no conversation objects: send the conversation in 'input', or continue a kept "
                    "response with 'previous_response_id'",
}
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")  # implemented: tool_use_of_body(flat=True)
PART_TEXT = {"input_text": "text", "output_text": "text", "refusal": "refusal"}
# ``include`` asks for extra data in the answer; only this one concerns what the server produces (the others name
# tool calls, reasoning items or echoed inputs, which its answers never hold, so asking for them changes nothing)
INCLUDE_LOGPROBS = "message.output_text.logprobs"


@dataclass
class ResponseRequest:
    """A ``/v1/responses`` request: the chat request it is answered as, and what the response echoes."""

    chat: ChatRequest
    # the request's own messages, without its instructions (also chat.messages, until serving puts the answered
    # conversation together: continue_from, with_instructions)
    input: list[RequestMessage]
    instructions: str | None = None
    metadata: dict[str, str] | None = None
    text_format: dict[str, Any] | None = None  # as given ({"type": "text"} when absent)
    store: bool = True
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None  # as given (echoed)
    tool_choice: Any = None  # as given (echoed; None: the default)


@dataclass
class KeptResponse:
    response: dict[str, Any]  # as answered
    conversation: list[RequestMessage]  # what it answered (without its instructions), then its answer
    size: int  # bytes counted against the store's budget


class ResponseStore:
    """The responses kept for ``previous_response_id`` and ``GET`` / ``DELETE /v1/responses/ID``: at most
    ``max_bytes`` of them (their JSON, texts and image URLs counted), the least recently used dropped first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._kept: OrderedDict[str, KeptResponse] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response: dict[str, Any], conversation: list[RequestMessage]) -> bool:
        """Keep ``response`` (False: it alone is over the budget, or storing is off)."""
        size = len(json.dumps(response)) + sum(
            len(part) if isinstance(part, str) else len(part.url) for message in conversation for part in message.parts
        ) + sum(len(call.arguments) + len(call.name) for message in conversation for call in message.tool_calls)
        if size > self.max_bytes:
            return False
        with self._lock:
            while self._kept and self._bytes + size > self.max_bytes:
                self._bytes -= self._kept.popitem(last=False)[1].size
            self._kept[response["id"]] = KeptResponse(response, conversation, size)
            self._bytes += size
        return True

    def get(self, response_id: str) -> KeptResponse | None:
        with self._lock:
            kept = self._kept.get(response_id)
            if kept is not None:
                self._kept.move_to_end(response_id)
            return kept

    def delete(self, response_id: str) -> bool:
        with self._lock:
            kept = self._kept.pop(response_id, None)
            if kept is not None:
                self._bytes -= kept.size
            return kept is not None

    def __len__(self) -> int:
        return len(self._kept)


def _unsupported(key: str) -> ApiError:
    why = WHY_UNSUPPORTED.get(key)
    message = f"'{key}' is not supported: {why}" if why else f"'{key}' is not supported by this server"
    return ApiError(400, message, param=key, code="unsupported_parameter")


def _parse_part(part: Any, param: str) -> str | ImagePart:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise _invalid(f"'{param}' must be an object with a 'type'", param)
    kind = part["type"]
    if kind in PART_TEXT:
        key = PART_TEXT[kind]
        if not isinstance(part.get(key), str):
            raise _invalid(f"'{param}.{key}' must be a string", f"{param}.{key}")
        return part[key]
    if kind == "input_image":
        url = part.get("image_url")
        if part.get("file_id") is not None and url is None:
            raise ApiError(400, f"'{param}.file_id': this server has no file storage; send the image as "
                                "'image_url' (a data: URL)", param=f"{param}.file_id", code="unsupported_parameter")
        if not isinstance(url, str) or not url:
            raise _invalid(f"'{param}.image_url' must be a non-empty string (a data: URL, or a URL the server may "
                           "fetch)", f"{param}.image_url")
        return ImagePart(url=url, param=f"{param}.image_url")
    raise _invalid(f"'{param}.type' {kind!r} is not supported (use 'input_text' or 'input_image'; 'output_text' "
                   "in assistant messages)", f"{param}.type", "unsupported_content_type")


def _string(item: dict, key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"Missing required parameter: '{param}.{key}' (a non-empty string).",
                       param=f"{param}.{key}", code="missing_required_parameter")
    return value


def _function_call(item: dict, param: str) -> ToolCall:
    """A ``function_call`` input item (an earlier answer's call) as a call: ``call_id``, ``name``, ``arguments``
    (the JSON text of an object)."""
    try:
        arguments = checked_arguments(item.get("arguments"), f"{param}.arguments")
    except ToolError as exc:
        raise _invalid(str(exc), exc.param) from None
    return ToolCall(name=_string(item, "name", param), arguments=arguments, id=_string(item, "call_id", param))


def _function_output(item: dict, param: str) -> RequestMessage:
    """A ``function_call_output`` input item: the result (a string, or ``input_text`` parts) of the call it names."""
    output = item.get("output")
    if isinstance(output, list):
        parts = [_parse_part(part, f"{param}.output[{i}]") for i, part in enumerate(output)]
        if any(not isinstance(part, str) for part in parts):
            raise _invalid(f"'{param}.output': a function's result is text here (input_text parts)", f"{param}.output")
        output = "".join(parts)
    if not isinstance(output, str):
        raise _invalid(f"'{param}.output' must be a string", f"{param}.output")
    return RequestMessage(role="tool", parts=[output], tool_call_id=_string(item, "call_id", param),
                          param=f"{param}.call_id")


def _parse_input(value: Any) -> list[RequestMessage]:
    """``input``: a string (one user message), or a list of items: messages, and ``function_call`` /
    ``function_call_output`` items (calls join the assistant message before them, or make one)."""
    if isinstance(value, str):
        return [RequestMessage(role="user", parts=[value])]
    if not (isinstance(value, list) and value):
        raise _invalid("'input' must be a string or a non-empty list of messages", "input")
    messages: list[RequestMessage] = []
    for index, item in enumerate(value):
        param = f"input[{index}]"
        kind = item.get("type", "message") if isinstance(item, dict) else "message"
        if kind == "message":
            messages.append(parse_message(item, param, _parse_part))
        elif kind == "function_call":
            call = _function_call(item, param)
            if messages and messages[-1].role == "assistant":
                messages[-1].tool_calls = (*messages[-1].tool_calls, call)
            else:
                messages.append(RequestMessage(role="assistant", parts=[], tool_calls=(call,)))
        elif kind == "function_call_output":
            messages.append(_function_output(item, param))
        else:
            raise ApiError(400, f"'{param}.type' {kind!r} is not supported: this server takes messages, function_call "
                                "and function_call_output items", param=f"{param}.type",
                           code="unsupported_content_type")
    return messages


def with_instructions(messages: list[RequestMessage], instructions: str | None) -> list[RequestMessage]:
    """``messages`` with ``instructions`` as the system message: before a leading system message's own text (Gemma's
    template takes one system message), or a new one."""
    if instructions is None:
        return messages
    if messages and messages[0].role == "system":
        text = "".join(part for part in messages[0].parts if isinstance(part, str))
        return [RequestMessage(role="system", parts=[instructions + ("\n\n" + text if text else "")]), *messages[1:]]
    return [RequestMessage(role="system", parts=[instructions]), *messages]


def _parse_text_format(text: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``text.format``: (the JSON Schema the answer follows or None, the format as the response echoes it)."""
    if text is None:
        return None, None
    if not isinstance(text, dict):
        raise _invalid("'text' must be an object like {\"format\": {\"type\": \"text\"}}", "text")
    unknown = sorted(set(text) - {"format", "verbosity"})
    if unknown:
        raise _invalid(f"'text.{unknown[0]}' is not a field this server knows", f"text.{unknown[0]}")
    if text.get("verbosity") not in (None, "medium"):
        raise _unsupported("text.verbosity")
    spec = text.get("format")
    if spec is None:
        return None, None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "text":
        return None, spec
    if kind == "json_object":
        return {"type": "object"}, spec
    if kind == "json_schema":
        return json_schema_of(spec, "text.format", "text.format"), spec
    raise _invalid(f"'text.format' must be an object whose 'type' is 'text', 'json_object' or 'json_schema', got "
                   f"{spec!r}", "text.format")


def parse_response_request(raw: bytes) -> ResponseRequest:
    """Validate a ``/v1/responses`` body (limits, images and the template come later, as for chat requests)."""
    body = json_body(raw)
    if "input" not in body:
        raise ApiError(400, "Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    for key, harmless in RESPONSES_UNSUPPORTED.items():
        if key in body and key not in TOOL_FIELDS and not harmless(body[key]):
            raise _unsupported(key)
    tool_use = tool_use_of_body(body, flat=True)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _invalid("'instructions' must be a string", "instructions")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise _invalid("'metadata' must be an object of string values", "metadata")
    include = body.get("include")
    if include is not None and not (isinstance(include, list) and all(isinstance(item, str) for item in include)):
        raise _invalid("'include' must be a list of strings", "include")
    top = body.get("top_logprobs")
    if top is not None and not (_is_int(top) and 0 <= top <= MAX_TOP_LOGPROBS):
        raise _invalid(f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}", "top_logprobs")
    max_tokens = body.get("max_output_tokens")
    if max_tokens is not None and not (_is_int(max_tokens) and max_tokens >= 1):
        raise _invalid(f"'max_output_tokens' must be an integer >= 1, got {max_tokens!r}", "max_output_tokens")
    options = body.get("stream_options")  # the Responses API's: {"include_obfuscation": bool}; nothing to obfuscate
    if options is not None and (not body.get("stream") or not isinstance(options, dict)):
        raise _invalid("'stream_options' must be an object, and only when 'stream' is true", "stream_options")
    store = body.get("store")
    if store is not None and not isinstance(store, bool):
        raise _invalid("'store' must be a boolean", "store")
    previous = body.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise _invalid("'previous_response_id' must be a response id string", "previous_response_id")
    schema, text_format = _parse_text_format(body.get("text"))
    own = _parse_input(body["input"])
    chat = ChatRequest(
        messages=own,  # the conversation it answers is put together when served (continue_from, with_instructions)
        max_tokens=max_tokens,
        max_tokens_param="max_output_tokens",
        messages_param="input",
        **shared_fields({key: value for key, value in body.items() if key != "stream_options"}),
        json_schema=schema,
        logprobs=INCLUDE_LOGPROBS in (include or ()) or bool(top),  # top_logprobs alone asks for them too
        top_logprobs=top or 0,
        tool_use=tool_use,
        **prompt_options_of(body),
    )
    return ResponseRequest(chat=chat, input=own, instructions=instructions, metadata=metadata,
                           text_format=text_format, store=store is not False, previous_response_id=previous,
                           tools=body.get("tools") or None, tool_choice=body.get("tool_choice"))


def continue_from(request: ResponseRequest, store: ResponseStore) -> list[RequestMessage]:
    """The conversation ``request`` answers: the kept one of its ``previous_response_id`` (if any), then its own
    input; a 404 ``previous_response_not_found`` for an id not kept (never, or dropped from the store)."""
    if request.previous_response_id is None:
        return request.input
    if store.max_bytes == 0:
        raise ApiError(400, "'previous_response_id': this server keeps no responses (serve --response-store 0); "
                            "send the whole conversation in 'input'", param="previous_response_id",
                       code="unsupported_parameter")
    kept = store.get(request.previous_response_id)
    if kept is None:
        raise ApiError(404, f"Previous response with id '{request.previous_response_id}' not found (never kept, "
                            "deleted, or dropped for room: this server keeps responses in memory only)",
                       param="previous_response_id", code="previous_response_not_found")
    if any(not whole_arguments(call.arguments) for message in kept.conversation for call in message.tool_calls):
        raise ApiError(400, f"response '{request.previous_response_id}' ended with a function call its token limit "
                            "cut (incomplete arguments): it cannot be continued; send the conversation in 'input', "
                            "with the call completed", param="previous_response_id", code="invalid_value")
    return [*kept.conversation, *request.input]


def whole_arguments(arguments: str) -> bool:
    """Whether a kept call's arguments are whole (a JSON object; a forced call cut by the token limit is kept as far
    as it went)."""
    try:
        return isinstance(json.loads(arguments), dict)
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------- objects
def response_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseBuilder:
    """The ``response`` object of one request as it goes: in progress, then completed, incomplete or failed."""

    def __init__(self, request: ResponseRequest, model: str, conversation: list[RequestMessage],
                 logprob_items: Callable[[list[TokenLogprob] | None], list[dict[str, Any]]]):
        self.request = request
        self.conversation = conversation  # what it answers (its previous responses' turns included)
        self.logprob_items = logprob_items  # OpenAI's per-token logprob items ([] when the request asks for none)
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created = now()
        self.model = model

    def text_part(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}

    def message(self, part: dict[str, Any] | None, status: str) -> dict[str, Any]:
        """The assistant message item (``part`` None: no content part yet)."""
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [] if part is None else [part]}


    def response(self, status: str, output: list[dict[str, Any]], *, completion: Completion | None = None,
                 error: ApiError | None = None, stored: bool = False) -> dict[str, Any]:
        chat = self.request.chat
        incomplete = completion is not None and completion.finish_reason == FINISH_LENGTH
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None if error is None else {"code": error.code or error.type, "message": error.message},
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": self.request.instructions,
            "max_output_tokens": chat.max_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": chat.tool_use is None or chat.tool_use.parallel,
            "previous_response_id": self.request.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": stored,
            "temperature": 1.0 if chat.temperature is None else chat.temperature,
            "text": {"format": self.request.text_format or {"type": "text"}},
            "tool_choice": self.request.tool_choice or ("auto" if self.request.tools else "none"),
            "tools": self.request.tools or [],
            "top_logprobs": chat.top_logprobs,
            "top_p": 1.0 if chat.top_p is None else chat.top_p,
            "truncation": "disabled",
            "usage": None if completion is None else response_usage(completion.prompt_tokens,
                                                                     completion.completion_tokens),
            "metadata": self.request.metadata or {},
        }

    def finished(self, completion: Completion, store: ResponseStore,
                 read: ReadAnswer | None = None) -> tuple[str, dict[str, Any], ReadAnswer]:
        """The final status (``completed``, or ``incomplete`` at the token limit), the whole response, kept in
        ``store`` (with the conversation it answered) when the request asks for it and it fits, and the answer as
        read (:func:`tool_calls.read_answer`; ``read``: as a stream read it, its calls' ids those it sent)."""
        status = "incomplete" if completion.finish_reason == FINISH_LENGTH else "completed"
        if read is None:
            read = read_answer(completion.text, self.request.chat.tool_use, completion.finish_reason)
        text, calls = read.content, read.calls
        output = [] if text is None else [
            self.message(self.text_part(text, self.logprob_items(completion.logprobs)), status)]
        whole = "completed" if read.finish_reason == FINISH_TOOL_CALLS else "incomplete"  # (a cut forced call)
        output += [function_call_item(call_item_id(call), call, whole) for call in calls or ()]
        answer = RequestMessage(role="assistant", parts=[] if text is None else [text], tool_calls=tuple(calls or ()))
        keep = self.request.store and store.max_bytes > 0
        response = self.response(status, output, completion=completion, stored=keep)
        if keep:
            answered = [*self.conversation, answer]
            response["store"] = store.put(response, answered)  # False: over the store's whole budget
        return status, response, read


# ---------------------------------------------------------------------------------------------- input items
INPUT_IMAGE_URLS = "message.input_image.image_url"  # the include value that asks for input images' URLs


def input_items_page(kept: KeptResponse, query: dict[str, list[str]]) -> dict[str, Any]:
    """``GET /v1/responses/ID/input_items``: the items a kept response answered (its conversation before its answer,
    earlier turns of a ``previous_response_id`` chain included, its instructions not), as OpenAI's list page.
    ``query`` (``urllib.parse.parse_qs``): ``order`` ``desc`` (the default: latest first) or ``asc``, ``limit`` 1
    to 100 (20), ``after`` an item id (the page starts after it, in that order), ``include`` (``include[]``)
    ``message.input_image.image_url`` for input images' URLs (null otherwise). Item ids are the response's own:
    ``msg_<response hex>_<position>``, the same at every call."""

    def one(key: str) -> str | None:
        values = query.get(key)
        return None if not values else values[-1]

    order = one("order") or "desc"
    if order not in ("asc", "desc"):
        raise _invalid(f"'order' must be 'asc' or 'desc', got {order!r}", "order")
    limit_text = one("limit") or "20"
    if not (limit_text.isascii() and limit_text.isdigit() and len(limit_text) <= 3 and 1 <= int(limit_text) <= 100):
        raise _invalid(f"'limit' must be an integer from 1 to 100, got {limit_text!r}", "limit")
    urls = INPUT_IMAGE_URLS in [*query.get("include", []), *query.get("include[]", [])]
    hexa = kept.response['id'].removeprefix('resp_')
    items = [item for index, message in enumerate(kept.conversation[:-1])
             for item in _input_items(hexa, index, message, urls)]
    if order == "desc":
        items.reverse()
    after = one("after")
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise _invalid(f"'after': no item {after!r} in this response's input items", "after")
        items = items[ids.index(after) + 1:]
    page = items[:int(limit_text)]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > len(page)}


def call_item_id(call: ToolCall) -> str:
    """An answer's ``function_call`` item id, from its call's (so a stream names the item before the answer ends)."""
    return f"fc_{call.id.removeprefix('call_')}"


def function_call_item(item_id: str, call: ToolCall, status: str = "completed") -> dict[str, Any]:
    """A call as a ``function_call`` item (``incomplete`` when the token limit cut its answer)."""
    return {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": status}


def _input_items(hexa: str, index: int, message: RequestMessage, urls: bool) -> list[dict[str, Any]]:
    """One kept message as Responses items (ids ``msg_<hexa>_<index>``, the same at every call): an input message
    (``input_text`` / ``input_image`` parts), an earlier answer as an output message (``output_text``) and its calls
    as ``function_call`` items, a result as a ``function_call_output`` item."""
    if message.role == "tool":
        return [{"id": f"fco_{hexa}_{index}", "type": "function_call_output", "call_id": message.tool_call_id,
                 "output": "".join(part for part in message.parts if isinstance(part, str)), "status": "completed"}]
    if message.role == "assistant":
        content = [{"type": "output_text", "text": part, "annotations": [], "logprobs": []}
                   for part in message.parts if isinstance(part, str) and (part or not message.tool_calls)]
    else:
        content = [{"type": "input_text", "text": part} if isinstance(part, str) else
                   {"type": "input_image", "detail": "auto", "file_id": None, "image_url": part.url if urls else None}
                   for part in message.parts]
    items = [] if message.tool_calls and not content else [
        {"id": f"msg_{hexa}_{index}", "type": "message", "role": message.role, "status": "completed",
         "content": content}]
    return items + [function_call_item(f"fc_{hexa}_{index}_{k}", call) for k, call in enumerate(message.tool_calls)]


# ---------------------------------------------------------------------------------------------- serving
def serve_response(handler: Any, body: bytes, record: "RequestRecord") -> None:
    """Answer one ``/v1/responses`` request on ``handler`` (the server's request handler)."""
    app = handler.app
    request = parse_response_request(body)
    conversation = continue_from(request, app.responses)
    job = app.prepare(replace(request.chat, messages=with_instructions(conversation, request.instructions)))
    try:
        app.scheduler.submit(job)
    except QueueFull as exc:
        raise ApiError(429, f"the server is busy ({exc}); retry later", code="server_busy",
                       type="rate_limit_error") from None
    builder = ResponseBuilder(request, app.model_name, conversation,
                              lambda entries: (app.logprobs(entries) or {}).get("content", []))
    try:
        if request.chat.stream:
            _stream(handler, job, builder, record)
        else:
            _complete(handler, job, builder, record)
    except BaseException:  # the client went away, a write timed out, a bug: nobody will read the rest
        job.cancel()
        raise


def _complete(handler: Any, job: Job, builder: ResponseBuilder, record: "RequestRecord") -> None:
    app = handler.app
    completion = None
    for event in app.events(job, handler._client_gone):
        error = app.failure(event)
        if error is not None:
            raise error
        if event[0] == "done":
            completion = event[2]
    _, response, read = builder.finished(completion, app.responses)
    handler._finished(job, [completion], record, stream=False, reasons=[read.finish_reason])
    handler._send_json(200, response)


class _EventWriter:
    """Server-sent events of the Responses API: ``event: TYPE`` and ``data: {...}``, numbered in order."""

    def __init__(self, handler: Any):
        self.handler = handler
        self.sequence = 0

    def send(self, kind: str, **fields: Any) -> None:
        from gemma3vl.infer.server import _json_bytes

        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        self.handler._write_chunk(b"event: " + kind.encode() + b"\ndata: " + _json_bytes(data) + b"\n\n")


def _stream(handler: Any, job: Job, builder: ResponseBuilder, record: "RequestRecord") -> None:
    app = handler.app
    where = {"item_id": builder.message_id, "output_index": 0, "content_index": 0}
    handler.start_event_stream()
    events = _EventWriter(handler)
    events.send("response.created", response=builder.response("in_progress", []))
    events.send("response.in_progress", response=builder.response("in_progress", []))
    use: ToolUse | None = builder.request.chat.tool_use
    # the text is held back while it may be calls (tool_calls.StreamedCalls): the message item opens with its first
    # text, or at the end when the answer is no calls; a forced call is streamed as it is generated
    # (tool_calls.StreamedForcedCalls: each function_call item added once its name is known, its arguments in deltas)
    forced = use is not None and use.forced
    held = None if use is None or not use.offered else StreamedForcedCalls(use) if forced else StreamedCalls(use)
    opened = False

    def send_piece(piece: CallPiece) -> None:
        item_id = call_item_id(piece.call)
        if piece.first:
            events.send("response.output_item.added", output_index=piece.index,
                        item=function_call_item(item_id, replace(piece.call, arguments=""), "in_progress"))
        if piece.call.arguments:
            events.send("response.function_call_arguments.delta", item_id=item_id, output_index=piece.index,
                        delta=piece.call.arguments)

    def open_message() -> None:
        nonlocal opened
        if not opened:
            events.send("response.output_item.added", output_index=0, item=builder.message(None, "in_progress"))
            events.send("response.content_part.added", **where, part=builder.text_part(""))
            opened = True

    if held is None:
        open_message()
    for event in app.events(job, handler._client_gone):
        error = app.failure(event)
        if error is not None:
            record.status, record.detail = error.status, f"error in stream: {error.message}"
            events.send("error", code=error.code or error.type, message=error.message, param=None)
            events.send("response.failed", response=builder.response("failed", [], error=error))
            job.cancel()
            break
        if event[0] == "text":
            _, _, (text, entries) = event
            if forced:
                for piece in held.feed(text, entries):
                    send_piece(piece)
                continue
            delta = (text, entries) if held is None else held.feed(text, entries)
            if delta is not None:
                open_message()
                events.send("response.output_text.delta", **where, delta=delta[0],
                            logprobs=builder.logprob_items(delta[1]))
        elif event[0] == "done":
            completion = event[2]
            read = None
            if forced:  # (never text: the call as far as it went)
                pieces, _, read = held.finish(completion.text, completion.finish_reason)
                for piece in pieces:
                    send_piece(piece)
            status, response, read = builder.finished(completion, app.responses, read)
            handler._finished(job, [completion], record, stream=True, reasons=[read.finish_reason])
            output = response["output"]
            if held is not None and not forced:
                text, entries, _ = held.finish(completion.text, completion.finish_reason)
                if text or entries:
                    open_message()
                    events.send("response.output_text.delta", **where, delta=text,
                                logprobs=builder.logprob_items(entries))
            if output and output[0]["type"] == "message":
                open_message()
                part = output[0]["content"][0]
                events.send("response.output_text.done", **where, text=part["text"], logprobs=part["logprobs"])
                events.send("response.content_part.done", **where, part=part)
                events.send("response.output_item.done", output_index=0, item=output[0])
            _stream_calls(events, output, streamed=forced)
            events.send(f"response.{status}", response=response)
    handler._write_chunk(b"")  # end of the chunked body


def _stream_calls(events: _EventWriter, output: list[dict[str, Any]], streamed: bool = False) -> None:
    """The answer's ``function_call`` items (of its ``output``), each added, its arguments as one delta, done
    (``streamed``: added and their arguments sent already, as a forced call's are)."""
    for index, item in enumerate(output):
        if item["type"] != "function_call":
            continue
        if not streamed:
            events.send("response.output_item.added", output_index=index,
                        item={**item, "arguments": "", "status": "in_progress"})
            events.send("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                        delta=item["arguments"])
        events.send("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                    name=item["name"], arguments=item["arguments"])
        events.send("response.output_item.done", output_index=index, item=item)
