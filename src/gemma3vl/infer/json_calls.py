"""Reading a forced tool call's JSON answer as it is generated, so that streams can send each call's name as soon
as it is known and its arguments piece by piece (OpenAI's and vLLM's streams do).

A forced answer (``tool_choice`` a named function, or ``required``: :func:`tool_calls.forced_schema`) is either the
named function's arguments, a JSON object, or a JSON list of ``{"name": ..., "parameters": {...}}`` calls. The
reader keeps, for every call begun, its name (once its string has ended) and the raw text of its arguments as far
as it has been generated: the model's own characters, so that what a stream sent is, joined, exactly the arguments
the finished answer holds. It never fails on text the grammar would not allow: such text only leaves calls
unnamed or incomplete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class ReadCall:
    """One call as far as it has been read: ``name`` (None until its string has ended), ``arguments`` (the raw JSON
    text of its arguments so far), ``complete`` (whether that value has ended)."""

    name: str | None = None
    arguments: str = ""
    complete: bool = False


class JsonCallReader:
    """Reads a forced answer piece by piece (:meth:`feed`); ``calls`` holds every call begun. ``named``: the named
    function a ``tool_choice`` forces (the whole answer is its arguments); None for ``required`` (a list of
    ``{"name", "parameters"}`` objects)."""

    CALL_DEPTH = 2  # inside the list and a call's object

    def __init__(self, named: str | None = None):
        self.named = named
        self.calls: list[ReadCall] = [ReadCall(named)] if named is not None else []
        self.text = ""
        self._stack: list[str] = []  # open containers
        self._in_string = False
        self._escape = False
        self._string_start = 0
        self._key: str | None = None  # the call object's key being read
        self._expect: str | None = None  # "key" or "value", in a call object
        self._value: str | None = None  # the arguments value being read: "container", "string" or "scalar"

    def feed(self, text: str) -> None:
        start = len(self.text)
        self.text += text
        if self.named is not None:  # the answer is the arguments
            self.calls[0].arguments += text
            return
        for index in range(start, len(self.text)):
            self._step(index, self.text[index])

    def _at_arguments(self) -> bool:
        """Whether the next value in the call object is its arguments (``parameters``), not yet begun."""
        return (self._value is None and len(self._stack) == self.CALL_DEPTH and self._expect == "value"
                and self._key == "parameters" and bool(self.calls))

    def _step(self, index: int, char: str) -> None:
        if self._in_string:
            self._string_char(index, char)
            return
        belongs = self._value is not None  # the character is part of the arguments
        depth = len(self._stack)
        if char == '"':
            if self._at_arguments():
                self._value, belongs = "string", True
            self._in_string, self._escape, self._string_start = True, False, index
        elif char in "{[":
            if self._at_arguments():
                self._value, belongs = "container", True
            self._stack.append(char)
            if char == "{" and depth == 1 and self._stack[0] == "[" and self._value is None:  # a call begins
                self.calls.append(ReadCall())
                self._key, self._expect = None, "key"
        elif char in "}]":
            if self._value == "scalar" and depth == self.CALL_DEPTH:
                self._end_arguments()
                belongs = False
            if self._stack:
                self._stack.pop()
            if self._value == "container" and len(self._stack) == self.CALL_DEPTH:
                self._end_arguments(char)
                return
        elif char == ":" and self._value is None and depth == self.CALL_DEPTH:
            self._expect = "value"
        elif char == ",":
            if self._value == "scalar" and depth == self.CALL_DEPTH:
                self._end_arguments()
                belongs = False
            if self._value is None and depth == self.CALL_DEPTH:
                self._expect = "key"
        elif not char.isspace() and self._at_arguments():
            self._value, belongs = "scalar", True
        if belongs:
            self.calls[-1].arguments += char

    def _string_char(self, index: int, char: str) -> None:
        if self._value is not None:
            self.calls[-1].arguments += char
        if self._escape:
            self._escape = False
        elif char == "\\":
            self._escape = True
        elif char == '"':
            self._in_string = False
            if self._value == "string":
                self._end_arguments()
            elif self._value is None and len(self._stack) == self.CALL_DEPTH and self.calls:
                try:
                    value = json.loads(self.text[self._string_start:index + 1])
                except ValueError:  # (not under the grammar)
                    return
                if self._expect == "key":
                    self._key = value
                elif self._expect == "value" and self._key == "name" and isinstance(value, str):
                    self.calls[-1].name = value

    def _end_arguments(self, last: str = "") -> None:
        self.calls[-1].arguments += last
        self.calls[-1].complete = True
        self._value = None
