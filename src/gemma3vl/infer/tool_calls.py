"""Function calling (OpenAI's ``tools``, ``tool_choice``, ``tool_calls`` and ``tool`` messages) for Gemma 3.

Gemma 3's chat template has no place for tools: it takes system, user and assistant turns. Google's guidance for
function calling with Gemma 3 is a prompt that lists the functions and asks for calls written as a Python-style
list, ``[name(parameter=value, ...), ...]`` (vLLM's ``pythonic`` tool parser reads the same form). This module
turns an OpenAI conversation with tools into such plain turns, and reads an answer back as tool calls:

* the functions (name, description, JSON Schema of the parameters) and how to call them go into the system
  message (after its own text: Gemma's template puts it at the top of the first user turn);
* an earlier assistant message's ``tool_calls`` are written as the list of calls the model would have written
  (``[get_weather(city="Paris")]``, after the message's text, if any);
* ``tool`` messages (each answering one of the calls of the assistant message before them) become a user turn
  holding each result in a ```` ```tool_output ```` block, in order; a user message right after them joins that turn
  (the template wants user and assistant turns to alternate);
* an answer that ends with a list of calls to the request's functions on lines of their own (in a
  ```` ```tool_code ```` or ```` ```python ```` fence or not; a bare call without brackets too, or one inside
  ``print(...)`` as Google's ``tool_code`` examples write it) comes back as ``tool_calls`` with
  ``finish_reason: "tool_calls"``, the text before them (if any) as the message's content: the form an assistant
  message with text and calls is written in (:func:`read_answer`); any other answer is the message's text, as it
  is;
* ``tool_choice: "required"`` and a named function are decoded under a grammar (as vLLM does): the named function's
  arguments as one JSON object of its parameters' schema, or a JSON list of ``{"name", "parameters"}`` calls to
  any of the functions; the prompt asks for that JSON, and the answer is read back as the calls.

Values in calls are Python or JSON literals (strings, numbers, ``True`` / ``true``, ``None`` / ``null``, lists,
dicts); a call's ``arguments`` are their JSON text. Function names follow OpenAI's rule (letters, digits, ``_``,
``-``; at most 64), so a name need not be a Python identifier: the calls are written and read by
:mod:`gemma3vl.infer.call_syntax`, never evaluated. The same rendering serves training data (``data.records``): a model fine-tuned on conversations
with tools is served with the prompt it was trained on.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.call_syntax import CALL_NAME, line_starts, literal, read_calls
from gemma3vl.infer.json_calls import JsonCallReader
from gemma3vl.infer.structured import Constraint

if TYPE_CHECKING:
    from gemma3vl.infer.logprobs import TokenLogprob

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
MODES = ("none", "auto", "required")
FINISH_TOOL_CALLS = "tool_calls"


class ToolError(Gemma3VLError):
    """A request's tools, tool choice or tool messages cannot be used; ``param`` is the field at fault."""

    def __init__(self, message: str, param: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Tool:
    """One function the model may call: ``parameters`` is a JSON Schema of its arguments (an object)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: dict(NO_PARAMETERS))

    def listing(self) -> dict[str, Any]:
        """The function as the prompt lists it."""
        entry: dict[str, Any] = {"name": self.name}
        if self.description:
            entry["description"] = self.description
        entry["parameters"] = self.parameters
        return entry


@dataclass(frozen=True)
class ToolCall:
    """A call: ``arguments`` is the JSON text of an object (OpenAI's ``function.arguments``)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: new_call_id())

    def wire(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's form: ``{"id", "type": "function", "function": {"name", "arguments"}}`` (streamed: with its
        ``index``)."""
        call: dict[str, Any] = {} if index is None else {"index": index}
        call.update({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
        return call


@dataclass(frozen=True)
class ToolUse:
    """A request's tools and how they may be called: ``choice`` is ``auto``, ``required``, ``none`` or
    ``function`` (then ``name`` says which); ``parallel`` false asks for at most one call."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    name: str | None = None
    parallel: bool = True

    @property
    def offered(self) -> bool:
        """Whether the model is offered the functions (``tool_choice: "none"`` does not offer them)."""
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        """Whether the answer must be a call (``required`` or a named function): decoded under a grammar."""
        return self.choice in ("required", "function")

    @property
    def forcing(self) -> str:
        """How the request forces a call, for messages: ``'required'`` or ``a named function``."""
        return "'required'" if self.choice == "required" else f"the named function {self.name!r}"

    @property
    def names(self) -> set[str]:
        return {tool.name for tool in self.tools}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ------------------------------------------------------------------------------------------- request fields
def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ToolError(f"'{param}' must be an object", param)
    return value


def parse_tools(value: Any, param: str = "tools", *, flat: bool = False) -> tuple[Tool, ...]:
    """OpenAI's ``tools``: ``[{"type": "function", "function": {"name", "description", "parameters", "strict"}}]``
    (chat completions), or with ``flat`` the Responses API's ``[{"type": "function", "name", ...}]``."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ToolError(f"'{param}' must be a list of tools", param)
    tools: list[Tool] = []
    for index, entry in enumerate(value):
        where = f"{param}[{index}]"
        entry = _object(entry, where)
        if entry.get("type") != "function":
            raise ToolError(f"'{where}.type' {entry.get('type')!r} is not supported (only 'function' tools)",
                            f"{where}.type", "unsupported_parameter")
        if flat:
            tools.append(parse_function(entry, where))
        else:
            tools.append(parse_function(_object(entry.get("function"), f"{where}.function"), f"{where}.function"))
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        if tool.name in seen:
            raise ToolError(f"'{param}[{index}]': the function name {tool.name!r} is given twice", f"{param}[{index}]")
        seen.add(tool.name)
    return tuple(tools)


def parse_function(function: dict[str, Any], where: str) -> Tool:
    """One function's ``name``, ``description`` and ``parameters`` (``strict`` is accepted: the grammar of a forced
    call follows the schema whatever it says)."""
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ToolError(f"'{where}.name' must be 1 to 64 letters, digits, '_' or '-', got {name!r}", f"{where}.name")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise ToolError(f"'{where}.description' must be a string", f"{where}.description")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = dict(NO_PARAMETERS)
    elif not isinstance(parameters, dict):
        raise ToolError(f"'{where}.parameters' must be a JSON Schema object", f"{where}.parameters")
    if not isinstance(function.get("strict", False), (bool, type(None))):
        raise ToolError(f"'{where}.strict' must be a boolean", f"{where}.strict")
    return Tool(name=name, description=description, parameters=parameters)


def parse_tool_choice(value: Any, tools: tuple[Tool, ...], param: str = "tool_choice", *,
                      flat: bool = False) -> tuple[str, str | None]:
    """OpenAI's ``tool_choice``: ``none`` / ``auto`` / ``required``, or ``{"type": "function", "function": {"name"}}``
    (with ``flat``, the Responses API's ``{"type": "function", "name"}``); the default: ``auto`` with tools, ``none``
    without."""
    if value is None:
        return ("auto" if tools else "none"), None
    if isinstance(value, str):
        if value not in MODES:
            raise ToolError(f"'{param}' must be one of none, auto, required or a function, got {value!r}", param)
        if value == "required" and not tools:  # ("auto" with no tools is "none", as OpenAI takes it)
            raise ToolError(f"'{param}' {value!r} needs 'tools'", param)
        return value, None
    choice = _object(value, param)
    if choice.get("type") != "function":
        raise ToolError(f"'{param}.type' {choice.get('type')!r} is not supported (use 'function')", f"{param}.type",
                        "unsupported_parameter")
    function, where = (choice, param) if flat else (_object(choice.get("function"), f"{param}.function"),
                                                    f"{param}.function")
    name = function.get("name")
    if name not in {tool.name for tool in tools}:
        raise ToolError(f"'{where}.name' {name!r} is not one of the request's tools", f"{where}.name")
    return "function", name


def tool_use_of(body: dict[str, Any], *, flat: bool = False) -> ToolUse | None:
    """A request's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` (``flat``: the Responses API's forms);
    None when it gives no tools."""
    tools = parse_tools(body.get("tools"), flat=flat)
    choice, name = parse_tool_choice(body.get("tool_choice"), tools, flat=flat)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if not tools:
        return None
    return ToolUse(tools=tools, choice=choice, name=name, parallel=parallel is not False)


def parse_history_calls(value: Any, param: str, *, need_ids: bool = True) -> tuple[ToolCall, ...]:
    """An assistant message's ``tool_calls`` (``[{"id", "type": "function", "function": {"name", "arguments"}}]``,
    ``arguments`` the JSON text of an object). Without ``need_ids`` (training data, in transformers' chat-template
    convention), ``id`` may be left out and ``arguments`` may be the object itself."""
    if not isinstance(value, list):
        raise ToolError(f"'{param}' must be a list of tool calls", param)
    calls = []
    for index, entry in enumerate(value):
        where = f"{param}[{index}]"
        entry = _object(entry, where)
        call_id = entry.get("id")
        if call_id is None and not need_ids:
            call_id = new_call_id()
        if not isinstance(call_id, str) or not call_id:
            raise ToolError(f"'{where}.id' must be a non-empty string", f"{where}.id")
        if entry.get("type", "function") != "function":
            raise ToolError(f"'{where}.type' must be 'function'", f"{where}.type")
        function = _object(entry.get("function"), f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ToolError(f"'{where}.function.name' must be a non-empty string", f"{where}.function.name")
        arguments = function.get("arguments")
        if isinstance(arguments, dict) and not need_ids:
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(ToolCall(name=name, arguments=checked_arguments(arguments, f"{where}.function.arguments"),
                              id=call_id))
    return tuple(calls)


def checked_arguments(arguments: Any, param: str) -> str:
    """A call's ``arguments`` as given, which must be the JSON text of an object."""
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise ToolError(f"'{param}' must be the JSON text of an object, got {arguments!r}", param)
    return arguments


# -------------------------------------------------------------------------------------------------- prompt
def instructions(use: ToolUse) -> str:
    """What the system message gains: the functions, and how to call them."""
    listing = "\n".join(json.dumps(tool.listing(), ensure_ascii=False) for tool in use.tools)
    head = f"You can call these functions (each with a JSON Schema of its parameters):\n{listing}\n\n"
    if use.choice == "function":
        return head + (f"Call the function {use.name} now: answer with only its arguments, as one JSON object.")
    if use.choice == "required":
        many = "one or more calls" if use.parallel else "exactly one call"
        return head + (f"Call functions now: answer with only a JSON list of {many}, each "
                       '{"name": <function name>, "parameters": <its arguments as a JSON object>}.')
    many = "one or more calls" if use.parallel else "one call at most"
    return head + (f"To call functions, answer with only a list of {many}, nothing else:\n"
                   "[function_name(parameter=value, ...), ...]\n"
                   "Write each value as a Python or JSON literal (strings in double quotes). Each call's result comes "
                   "back in a ```tool_output block. When no function is needed, answer normally.")


def calls_text(calls: tuple[ToolCall, ...] | list[ToolCall]) -> str:
    """Calls as the model writes them: ``[name(key=value, ...), ...]``."""
    written = []
    for call in calls:
        arguments = json.loads(call.arguments)
        written.append(f"{call.name}(" + ", ".join(f"{key}={literal(value)}" for key, value in arguments.items())
                       + ")")
    return "[" + ", ".join(written) + "]"


def output_block(text: str) -> str:
    """A tool's result as the user turn carries it."""
    return f"```tool_output\n{text}\n```"


# ---------------------------------------------------------------------------------------------- the answer
def parse_calls(text: str, use: ToolUse) -> list[ToolCall] | None:
    """The answer ``text`` as calls to ``use``'s functions, or None when it is not (then it is the answer's text):
    the whole answer a list of calls (:func:`read_calls`), every name one of the functions, at most one call unless
    parallel calls are allowed."""
    scanned = read_calls(text)
    if scanned is None:
        return None
    names = use.names
    if any(name not in names for name, _ in scanned) or (len(scanned) > 1 and not use.parallel):
        return None
    return [ToolCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False)) for name, arguments in scanned]


def forced_schema(use: ToolUse) -> dict[str, Any]:
    """The JSON Schema a forced answer follows: the named function's parameters, or (``required``) a list of
    ``{"name", "parameters"}`` calls to any of the functions."""
    if use.choice == "function":
        return next(tool.parameters for tool in use.tools if tool.name == use.name)
    options = [{"type": "object", "properties": {"name": {"const": tool.name}, "parameters": tool.parameters},
                "required": ["name", "parameters"], "additionalProperties": False} for tool in use.tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": options[0] if len(options) == 1 else {"anyOf": options}}
    if not use.parallel:
        schema["maxItems"] = 1
    return schema


def forced_constraint(use: ToolUse | None, other: str | None = None) -> Constraint | None:
    """The structured-output constraint a forced call decodes under (``tool_choice`` ``required`` or a named
    function: :func:`forced_schema`), None when no call is forced. ``other``: the answer's other constraint, as the
    caller names it (``'response_format'``, ``'regex'``, ...), refused by every front-end in the same words: the
    call's grammar decides the answer."""
    if use is None or not use.forced:
        return None
    if other is not None:
        raise ToolError(f"tool_choice {use.forcing} decodes under its own grammar: not with {other}", "tool_choice")
    return Constraint("json", forced_schema(use), "tool_choice")


def forced_calls(text: str, use: ToolUse, reader: JsonCallReader | None = None) -> tuple[list[ToolCall] | None, bool]:
    """A forced answer (JSON under :func:`forced_schema`) as its calls, their arguments the model's own JSON text
    (what a stream sends of them: :class:`StreamedForcedCalls`), and whether it is whole (JSON of that form). An
    answer cut short (by the token limit, or a stop string) gives the calls begun whose name is known, their
    arguments as far as they go, as OpenAI and vLLM return a cut forced call (None when no name is known).
    ``reader``: one a stream already fed ``text`` (it is not read again)."""
    if reader is None or reader.text != text:
        reader = JsonCallReader(use.name if use.choice == "function" else None)
        reader.feed(text)
    begun = [ToolCall(read.name, read.arguments) for read in reader.calls if read.name is not None] or None
    try:
        value = json.loads(text)
    except ValueError:
        return begun, False
    if use.choice == "function":
        whole = isinstance(value, dict)
    else:
        read = reader.calls
        whole = (isinstance(value, list) and bool(value) and len(read) == len(value)
                 and all(call.name is not None and call.complete for call in read))
    return begun, whole


@dataclass(frozen=True)
class ReadAnswer:
    """An answer under tools as its client gets it: ``content`` (None: no text), ``calls`` (None: none) and the
    ``finish_reason`` (``tool_calls`` for calls the answer ended with by itself)."""

    content: str | None
    calls: list[ToolCall] | None
    finish_reason: str


def read_answer(text: str, use: ToolUse | None, finish_reason: str = "stop",
                reader: JsonCallReader | None = None) -> ReadAnswer:
    """An answer under ``use``: the whole answer calls (content None); or text, then calls from the start of a line
    to the end (the form :func:`converse` writes an assistant message with text and calls in: the text, a newline,
    the calls), the text without the white space before the calls; or text alone. Only an answer that ended by
    itself (``finish_reason`` "stop") makes calls, except a forced one (``tool_choice`` ``required`` or a named
    function), which is never text: its calls as far as they went (:func:`forced_calls`), ``tool_calls`` only
    when whole. ``reader``: a forced answer's, as a stream read it (:func:`forced_calls`)."""
    if use is None or not use.offered:
        return ReadAnswer(text, None, finish_reason)
    if use.forced:
        calls, whole = forced_calls(text, use, reader)
        return ReadAnswer(None, calls, FINISH_TOOL_CALLS if whole and finish_reason == "stop" else finish_reason)
    if finish_reason == "stop":
        for start in line_starts(text):
            rest = text[start:]
            if may_become_calls(rest, use):
                calls = parse_calls(rest, use)
                if calls is not None:
                    return ReadAnswer(text[:start].rstrip() or None, calls, FINISH_TOOL_CALLS)
    return ReadAnswer(text, None, finish_reason)


def split_answer(text: str, use: ToolUse | None, finish_reason: str = "stop") -> tuple[str | None,
                                                                                   list[ToolCall] | None]:
    """:func:`read_answer`'s content and calls."""
    answer = read_answer(text, use, finish_reason)
    return answer.content, answer.calls


HEAD_WINDOW = 256  # characters after the leading white space that tell whether a text may begin calls
_BLANK = re.compile(r"\s*")


def may_become_calls(text: str, use: ToolUse) -> bool:
    """Whether an answer starting with ``text`` may still turn out to be calls (a stream holds its text back
    while it may). Only the first :data:`HEAD_WINDOW` characters after the leading white space are read (a name is
    at most 64): a stream asks at every piece, and must not read all the text it holds each time."""
    if use.forced:
        return True
    first = _BLANK.match(text).end()
    start = text[first:first + HEAD_WINDOW]
    if start.startswith("print("):  # (every form parse_calls reads must be held: see call_syntax._unfenced)
        start = start[len("print("):].lstrip()
    elif start and "print(".startswith(start):
        return True
    if not start or start[0] in "[`":
        return True
    match = CALL_NAME.match(start)
    if match is None:
        return False
    word, rest = match.group(), start[match.end():]
    if not rest:  # (a word that fills the window is no name: names are at most 64 characters)
        return any(name.startswith(word) for name in use.names)
    return word in use.names and (not rest.strip() or rest.lstrip().startswith("("))


class StreamedCalls:
    """One streamed choice's text under tools: what may still be calls is held back, the rest is sent as it comes.
    Held: from the earliest line (the answer's start included) from which the rest may still be calls
    (:func:`may_become_calls`), with the white space before it; everything, for a forced call. So what was sent
    is always the start of :func:`read_answer`'s text, and ``finish`` sends the rest of that text, then the
    calls. (Logprobs go with the next text sent.)"""

    def __init__(self, use: ToolUse):
        self.use = use
        self.sent = ""
        self.pending = ""
        self.pending_logprobs: list[TokenLogprob] | None = None

    def feed(self, text: str, logprobs: list[TokenLogprob] | None) -> tuple[str, list[TokenLogprob] | None] | None:
        """The delta to send now (text and logprobs), or None while all of it is held."""
        self.pending += text
        if logprobs is not None:
            self.pending_logprobs = [*(self.pending_logprobs or ()), *logprobs]
        cut = 0 if self.use.forced else self._free_length()
        if cut == 0:
            return None
        text, self.pending = self.pending[:cut], self.pending[cut:]
        self.sent += text
        logprobs, self.pending_logprobs = self.pending_logprobs, None
        return text, logprobs

    def _free_length(self) -> int:
        """How much of the pending text cannot be part of calls (the line starts are read in order, up to the first
        that may begin calls: usually the first, when text is held)."""
        for start in line_starts(self.pending):
            if (start or not self.sent) and may_become_calls(self.pending[start:], self.use):
                return len(self.pending[:start].rstrip())
        return len(self.pending)

    def finish(self, text: str, finish_reason: str) -> tuple[str, list[TokenLogprob] | None, ReadAnswer]:
        """At the end of the answer (``text``, all of it): the text still to send, its logprobs, and the answer as
        read (:func:`read_answer`: its calls, None when it is text, and finish reason)."""
        answer = read_answer(text, self.use, finish_reason)
        rest = self.pending if answer.calls is None else (answer.content or "")[len(self.sent):]
        logprobs, self.pending, self.pending_logprobs = self.pending_logprobs, "", None
        return rest, logprobs, answer


@dataclass(frozen=True)
class CallPiece:
    """A piece of a streamed call: its position in the answer, the call (its id and name; as ``arguments``, this
    piece's text of them) and whether it is the call's first piece (OpenAI's first delta of a call carries its id,
    type and name; the later ones its position and more arguments)."""

    index: int
    call: ToolCall
    first: bool

    def wire(self) -> dict[str, Any]:
        """The chat endpoint's ``tool_calls`` delta entry."""
        if self.first:
            return self.call.wire(self.index)
        return {"index": self.index, "function": {"arguments": self.call.arguments}}


class StreamedForcedCalls:
    """One streamed choice's forced call (``tool_choice`` ``required`` or a named function) as it is generated: each
    call as soon as its name is known, then its arguments piece by piece (:class:`json_calls.JsonCallReader`);
    nothing is sent as text. The pieces joined are the calls :func:`read_answer` gives the whole answer, ids
    included. (Logprobs are kept for the end: ``finish`` returns them.)"""

    def __init__(self, use: ToolUse):
        self.use = use
        self.reader = JsonCallReader(use.name if use.choice == "function" else None)
        self.ids: list[str] = []  # of the calls sent so far
        self.sent: list[int] = []  # characters of each one's arguments sent
        self.logprobs: list[TokenLogprob] | None = None

    def feed(self, text: str, logprobs: list[TokenLogprob] | None) -> list[CallPiece]:
        """The pieces to send now."""
        if logprobs is not None:
            self.logprobs = [*(self.logprobs or ()), *logprobs]
        self.reader.feed(text)
        return self._pieces()

    def _pieces(self) -> list[CallPiece]:
        pieces = []
        for index, read in enumerate(self.reader.calls):
            if read.name is None:  # (calls are sent in order: a later one waits for this one's name)
                break
            if index == len(self.ids):  # its first piece: its name, and its arguments so far
                self.ids.append(new_call_id())
                self.sent.append(0)
                pieces.append(CallPiece(index, ToolCall(read.name, read.arguments, self.ids[index]), True))
            elif len(read.arguments) > self.sent[index]:
                pieces.append(CallPiece(index, ToolCall(read.name, read.arguments[self.sent[index]:], self.ids[index]),
                                        False))
            self.sent[index] = len(read.arguments)
        return pieces

    def finish(self, text: str, finish_reason: str) -> tuple[list[CallPiece], list[TokenLogprob] | None, ReadAnswer]:
        """At the end of the answer (``text``, all of it): the pieces still to send, the logprobs, and the answer as
        read (:func:`read_answer`; its calls' ids those sent)."""
        pieces = self._pieces()
        answer = read_answer(text, self.use, finish_reason, self.reader)
        if answer.calls is not None:
            answer = replace(answer, calls=[replace(call, id=self.ids[index]) if index < len(self.ids) else call
                                            for index, call in enumerate(answer.calls)])
        logprobs, self.logprobs = self.logprobs, None
        return pieces, logprobs, answer


@dataclass
class Message:
    """A message as :func:`converse` reads it (the server's ``RequestMessage`` has the same fields) and writes it
    (system, user and assistant only): ``parts`` are text and images, in order."""

    role: str
    parts: list[Any]
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # a tool message's; None: the first call not yet answered (training data)
    # where the request or record gave it (None: messages[<its index>]); a tool message's errors name
    # f"{param}.tool_call_id", or param itself when it names the call id's field already (Responses' "input[2].call_id")
    param: str | None = None


def involves_tools(messages: list[Any], use: ToolUse | None) -> bool:
    """Whether a conversation has tools, calls or results, which :func:`converse` writes out (turns added and joined:
    their positions no longer match the request's)."""
    return use is not None or any(message.tool_calls or message.role == "tool" for message in messages)


def converse(messages: list[Any], use: ToolUse | None) -> list[Message]:
    """``messages`` (objects with ``role``, ``parts``, ``tool_calls``, ``tool_call_id``: :class:`Message`) as plain
    system / user / assistant messages: the functions in the system message, earlier calls as the assistant wrote
    them, tool results in a user turn. A ``tool`` message must answer a call of the assistant message before it
    (OpenAI's rule): a :class:`ToolError` naming it otherwise. Each plain message's ``param`` names the message it
    was written from (the first, when several are joined), for errors found later."""
    plain: list[Message] = []
    pending: list[str] = []  # the calls the last assistant message made, not yet answered
    from_tools = False  # whether plain[-1] is the user turn of tool results
    for index, message in enumerate(messages):
        where = getattr(message, "param", None) or f"messages[{index}]"
        role, parts = message.role, list(message.parts)
        if role == "tool":
            answers = message.tool_call_id if message.tool_call_id is not None else next(iter(pending), None)
            if answers not in pending:
                said = "" if message.tool_call_id is None else f"; {message.tool_call_id!r} is not one of them (or " \
                                                                 "is answered already)"
                responses = where.endswith(".call_id")  # (the Responses API's function_call_output item)
                what = ("a function_call_output must answer one of the function_call items of the answer before it"
                        if responses else "a 'tool' message must answer one of the 'tool_calls' of the assistant "
                                          "message before it")
                raise ToolError(f"'{where}': {what}{said}", where if responses else f"{where}.tool_call_id")
            pending.remove(answers)
            if not all(isinstance(part, str) for part in parts):
                raise ToolError(f"'{where}': a tool's result is text (images go in user messages)", f"{where}.content")
            block = output_block("".join(parts))
            if from_tools:
                plain[-1].parts[-1] += "\n" + block
            else:
                plain.append(Message("user", [block], param=where))
                from_tools = True
            continue
        if role == "user" and from_tools:
            first = parts[0] if parts else ""
            if isinstance(first, str):
                plain[-1].parts[-1] += "\n\n" + first
                parts = parts[1:]
            plain[-1].parts.extend(parts)
            from_tools = False
            continue
        from_tools = False
        calls = tuple(getattr(message, "tool_calls", ()) or ())
        if calls:
            text = "".join(part for part in parts if isinstance(part, str)).strip()
            parts = [(text + "\n" if text else "") + calls_text(calls)]
            pending = [call.id for call in calls]
        else:
            pending = []
        plain.append(Message(role, parts, param=where))
    if use is not None and use.offered:
        if plain and plain[0].role == "system":
            text = "".join(part for part in plain[0].parts if isinstance(part, str))
            plain[0] = Message("system", [f"{text}\n\n{instructions(use)}" if text.strip() else instructions(use)],
                               param=plain[0].param)
        else:
            plain.insert(0, Message("system", [instructions(use)], param="the system message the tools are in"))
    return plain


def message_object(text: str | None, calls: list[ToolCall] | None) -> dict[str, Any]:
    """A choice's ``message``: its text (null when it is only calls), and its calls."""
    message = {"role": "assistant", "content": text, "refusal": None}
    if calls:
        message["tool_calls"] = [call.wire() for call in calls]
    return message
