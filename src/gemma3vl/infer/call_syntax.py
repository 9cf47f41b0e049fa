"""The Python-style call lists Gemma 3 writes function calls in, ``[name(key=value, ...), ...]``: written from
JSON arguments (:func:`literal`) and read back (:func:`read_calls`, :func:`trailing_calls`) by a scanner of our own,
so that a name need not be a Python identifier (OpenAI allows ``-``). Values are Python or JSON literals (strings,
numbers, ``True`` / ``true``, ``None`` / ``null``, lists, dicts), read through ``ast`` as literals only: nothing the
model writes is evaluated. A call list may come in a ```` ```tool_code ```` / ```` ```python ```` fence, in
``print(...)`` (Google's ``tool_code`` examples), or as bare calls without brackets. :mod:`tool_calls` uses it."""

from __future__ import annotations

import ast
import json
import math
import re
import warnings
from typing import Any, Iterator

CALL_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_KEY = re.compile(r"[^\s=(),\[\]{}'\"]+")
_FENCE = re.compile(r"^```[A-Za-z_]*[ \t]*\n(.*?)\n?```$", re.DOTALL)
_PRINTED = re.compile(r"^print\((.*)\)$", re.DOTALL)  # Google's tool_code examples print the call's result
_LITERAL_NAMES = {"True": True, "False": False, "None": None, "true": True, "false": False, "null": None}
# Values are read with ast.parse under this file name; what the model writes is no source code of ours, so Python's
# warnings about it ("invalid decimal literal" for 1if, "invalid escape sequence" for "\e", a SyntaxWarning or a
# DeprecationWarning by Python version) would only be noise on a server's standard error.
_VALUE_SOURCE = "<tool call>"
for _category in (SyntaxWarning, DeprecationWarning):
    warnings.filterwarnings("ignore", category=_category, module=re.escape(_VALUE_SOURCE))


def literal(value: Any) -> str:
    """A JSON value as the Python literal a call writes it with (strings in double quotes, ``True``, ``None``)."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(literal(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(str(key), ensure_ascii=False)}: {literal(item)}" for key, item in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"not a JSON value: {value!r}")


class _NotACall(Exception):
    pass


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _value_end(text: str, pos: int) -> int:
    """Where the literal starting at ``pos`` ends: at a ``,`` or ``)`` outside brackets and strings."""
    depth = 0
    while pos < len(text):
        char = text[pos]
        if char in "\"'":
            quote = text[pos:pos + 3] if text[pos:pos + 3] in ('"""', "'''") else char
            pos += len(quote)
            while not text.startswith(quote, pos):
                if pos >= len(text):
                    raise _NotACall
                pos += 2 if text[pos] == "\\" else 1
            pos += len(quote)
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            if depth == 0:
                return pos
            depth -= 1
        elif char == "," and depth == 0:
            return pos
        pos += 1
    raise _NotACall


def _json_value(node: ast.AST) -> Any:
    """The JSON value of a literal's syntax tree (``true`` / ``null`` read as JSON's); anything else is no call."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, bool, int, float))):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise _NotACall  # JSON has no NaN or infinities
        return node.value
    if isinstance(node, ast.Name) and node.id in _LITERAL_NAMES:
        return _LITERAL_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _json_value(node.operand)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _NotACall
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_json_value(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        if any(key is None for key in node.keys):
            raise _NotACall
        keys = [_json_value(key) for key in node.keys]
        if not all(isinstance(key, str) for key in keys):
            raise _NotACall
        return {key: _json_value(value) for key, value in zip(keys, node.values)}
    raise _NotACall


def _literal_value(source: str) -> Any:
    try:
        tree = ast.parse(source.strip(), filename=_VALUE_SOURCE, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        raise _NotACall from None
    return _json_value(tree.body)


def _scan_calls(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``[name(key=value, ...), ...]``, whole, as (name, arguments) pairs."""
    if not (text.startswith("[") and text.endswith("]")):
        raise _NotACall
    calls: list[tuple[str, dict[str, Any]]] = []
    pos = _skip(text, 1)
    while text[pos] != "]":
        match = CALL_NAME.match(text, pos)
        if match is None:
            raise _NotACall
        name, pos = match.group(), _skip(text, match.end())
        if not text.startswith("(", pos):
            raise _NotACall
        pos = _skip(text, pos + 1)
        arguments: dict[str, Any] = {}
        while text[pos] != ")":
            key = _KEY.match(text, pos)
            if key is None or key.group() in arguments:
                raise _NotACall
            pos = _skip(text, key.end())
            if not text.startswith("=", pos) or text.startswith("==", pos):
                raise _NotACall
            start = _skip(text, pos + 1)
            pos = _value_end(text, start)
            arguments[key.group()] = _literal_value(text[start:pos])
            pos = _skip(text, pos)
            if text[pos] == ",":
                pos = _skip(text, pos + 1)
            elif text[pos] != ")":
                raise _NotACall
        calls.append((name, arguments))
        pos = _skip(text, pos + 1)
        if text[pos] == ",":
            pos = _skip(text, pos + 1)
        elif text[pos] != "]":
            raise _NotACall
    if pos != len(text) - 1 or not calls:
        raise _NotACall
    return calls


def _unfenced(text: str) -> str:
    text = text.strip()
    fenced = _FENCE.match(text)
    text = fenced.group(1).strip() if fenced else text
    printed = _PRINTED.match(text)
    return printed.group(1).strip() if printed else text


def read_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """``text`` read as calls, (name, arguments) pairs, whatever their names; None when the whole text is not a list
    of calls (fenced or not; a bare call too; in ``print(...)``)."""
    body = _unfenced(text)
    try:
        try:
            return _scan_calls(body)
        except (_NotACall, IndexError):
            return _scan_calls(f"[{body}]")  # a bare call, or calls without brackets
    except (_NotACall, IndexError, RecursionError):
        return None


def line_starts(text: str) -> Iterator[int]:
    """Where the lines of ``text`` start: 0, and after each newline."""
    start = 0
    while True:
        yield start
        start = text.find("\n", start) + 1
        if start == 0:
            return


def trailing_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """The calls that end ``text`` on lines of their own, whatever their names (:func:`read_calls` from the start, or
    from the earliest line start that reads as calls to the end); None when it ends with none."""
    for start in line_starts(text):
        calls = read_calls(text[start:])
        if calls is not None:
            return calls
    return None
