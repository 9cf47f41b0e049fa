"""Structured output: answers that are valid JSON (any JSON object, or one following a JSON Schema), by decoding
under a grammar with xgrammar (the grammar engine vLLM and SGLang use), an optional dependency:
``pip install 'gemma3vl[structured]'``. Nothing here imports it until a row asks for JSON.

How a row follows its grammar (``GrammarRows``, used by both decoding loops: ``generate`` and the engine):

* it keeps an ``xgrammar.GrammarMatcher``; before the row's token is chosen, the row's logits are masked with the
  matcher's next-token bitmask (disallowed tokens get -inf), *before* the penalties, temperature, top-k and top-p
  (vLLM's order), so a sampled token is drawn from within the grammar; then the matcher accepts the token;
* only rows with a grammar are masked (the others' logits are not touched: bit for bit what they are without
  structured output), and a batch without one does nothing at all;
* the grammar's vocabulary is the model's (``vocab_size`` of the text config: the ids past the tokenizer's, as in
  Gemma 3's 262,208 against 262,144, are never allowed), its stop tokens are the row's own stop ids (EOS ids,
  ``<end_of_turn>``), allowed exactly when the JSON is complete, so a row ends with ``"stop"`` right after its JSON;
  a row that reaches its token limit first ends with ``"length"`` and an incomplete JSON, as OpenAI's do. Special
  tokens the answer's text leaves out (``<start_of_turn>``, ``<start_of_image>``, ...) are never allowed either:
  the text the grammar checks is the text the answer shows;
* host cost: the bitmask is filled on the host, after the row's token is read, which both loops do while the next
  decode step already runs on the device; the bitmask then goes to the device with an asynchronous copy from
  pinned memory, in stream order before the step that uses it.

Whitespace: schemas compile with xgrammar's ``any_whitespace=False``, so the JSON comes out on one line in
``json.dumps``' default layout (``{"a": 1, "b": [2, 3]}``). xgrammar's default (and vLLM's, which offers
``disable_any_whitespace`` against it) allows any whitespace between tokens, and a weak or small model under it can
emit newlines and spaces until its token limit instead of the next value; the fixed layout costs nothing in
validity and makes every token of the answer count. Properties come in the schema's order, and an object holds
only the properties its schema names unless the schema allows more (``additionalProperties``); xgrammar's
``strict_mode``, as vLLM uses it. Known xgrammar limitation (0.2.x, its issue #800): a string with ``minLength`` /
``maxLength`` admits raw control characters and no escapes, which strict JSON parsers refuse; a ``pattern`` bounds a
string without that problem (the tests' schemas use one).

Grammars are compiled once per distinct schema (``JsonGrammars``: one ``GrammarCompiler`` per tokenizer, the
compiled grammars kept by the schema's canonical JSON text, the least recently used dropped past
``CACHE_SIZE``). The same compiler takes vLLM's other constraints (``guided_regex``, ``guided_choice``,
``guided_grammar``, or ``structured_outputs``' ``regex`` / ``choice`` / ``grammar``): a regular expression the
whole answer matches, one of a list of strings, or an EBNF grammar in xgrammar's (GBNF-like) syntax whose rule
``root`` the answer is (:class:`Constraint`).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.sampling import to_device_async

INSTALL_HINT = "pip install 'gemma3vl[structured]'"
ANY_OBJECT: dict[str, Any] = {"type": "object"}  # JSON mode (OpenAI's json_object): any JSON object
CACHE_SIZE = 64  # compiled grammars kept per tokenizer
# xgrammar's C++ errors start with "[12:00:00] /project/cpp/json_schema_converter.cc:5082: "
_LOG_PREFIX = re.compile(r"^\[[\d:.]+\] \S+:\d+: ")


CONSTRAINT_KINDS = ("json", "regex", "choice", "grammar")


@dataclass(frozen=True)
class Constraint:
    """What an answer must be: ``json`` (``value`` a JSON Schema dict), ``regex`` (a regular expression the whole
    answer matches), ``choice`` (one of a list of strings) or ``grammar`` (EBNF, its rule ``root``); ``param``
    names the request field it came from, for errors."""

    kind: str
    value: Any
    param: str = "response_format"

    def key(self) -> str:
        """The canonical text grammars are compiled and cached by."""
        if self.kind == "json":
            return "json:" + schema_text(self.value)
        if self.kind == "choice":
            return "choice:" + json.dumps(list(self.value), ensure_ascii=False)
        return f"{self.kind}:{self.value}"


def text_constraint(kind: str, value: Any, where: str, param: str | None = None) -> Constraint:
    """A ``regex``, ``choice`` or ``grammar`` constraint, its value checked (a non-empty string; a non-empty list of
    non-empty strings for ``choice``): a Gemma3VLError naming ``where`` otherwise. (Whether xgrammar can compile it
    is checked when it is compiled.) What the server, the Python API and batch lines share."""
    if kind == "choice":
        if isinstance(value, str) or not (isinstance(value, (list, tuple)) and value
                                          and all(isinstance(choice, str) and choice for choice in value)):
            raise Gemma3VLError(f"'{where}' must be a non-empty list of non-empty strings, got {value!r}")
        return Constraint(kind, list(value), param or where)
    if kind not in ("regex", "grammar"):
        raise ValueError(f"not a text constraint: {kind!r}")
    if not isinstance(value, str) or not value:
        what = "a regular expression" if kind == "regex" else "an EBNF grammar"
        raise Gemma3VLError(f"'{where}' must be a non-empty string ({what}), got {value!r}")
    return Constraint(kind, value, param or where)


def choice_grammar(choices: Sequence[str]) -> str:
    """xgrammar EBNF whose ``root`` is exactly one of ``choices`` (quotes, backslashes and control characters
    escaped in the string literals)."""
    # (a JSON string literal: "...", with \" \\ \n \t \uXXXX escapes, which xgrammar's EBNF reads alike)
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


class StructuredOutputUnavailable(Gemma3VLError):
    """JSON output was asked for and xgrammar is not installed."""


class GrammarError(Gemma3VLError):
    """A row's grammar allows no next token, or refused the token chosen (should not happen): the row cannot go on."""


def load_xgrammar() -> Any:
    """The ``xgrammar`` module, imported on first use."""
    try:
        import xgrammar
    except ImportError as exc:
        raise StructuredOutputUnavailable(
            f"JSON output (JSON mode, JSON schemas) needs xgrammar, which is not installed ({exc}): {INSTALL_HINT}"
        ) from None
    return xgrammar


def warm_up(runtime: Any, device: torch.device) -> str:
    """Make JSON output ready before the first request asks for it (the server calls this at start, on its engine
    thread): the grammar compiler for the tokenizer (``runtime.json_grammar``: seconds for Gemma's 262k vocabulary),
    the ``json_object`` grammar compiled, and one row's logits masked on ``device`` (on CUDA, xgrammar compiles its
    mask kernel with triton at the first call). Returns what ``/health`` reports as ``structured_output``:
    ``"ready"``, ``"unavailable: ..."`` (xgrammar not installed; plain text is served as ever) or ``"failed: ..."``
    (JSON requests will say why as they come)."""
    try:
        load_xgrammar()
    except StructuredOutputUnavailable:
        return f"unavailable: {INSTALL_HINT}"
    try:
        vocab = runtime.config.text.vocab_size
        rows = GrammarRows(1, vocab, device)
        rows.add(0, runtime.json_grammar(ANY_OBJECT), runtime.json_grammar_stop_ids)
        rows.mask(torch.zeros(1, vocab, device=device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # the server still serves; each JSON request will report its own failure
        return f"failed: {_xgrammar_message(exc)}"
    return "ready"


def _xgrammar_message(exc: Exception) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return _LOG_PREFIX.sub("", lines[0])


def schema_text(schema: Any) -> str:
    """``schema`` (a JSON Schema as a dict) as canonical JSON text: the same schema gives the same text, whatever
    its source's spacing. Keys keep their order, which is part of the schema (properties come out in it)."""
    if not isinstance(schema, dict):
        raise Gemma3VLError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    try:
        return json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:  # NaN or Infinity, which Python's json reads but JSON does not have
        raise Gemma3VLError(f"the JSON schema is not valid JSON ({exc})") from None


def check_schema(schema: Any) -> str:
    """Check that xgrammar can turn ``schema`` into a grammar (no tokenizer needed: before a model loads);
    returns its canonical text."""
    text = schema_text(schema)
    xgr = load_xgrammar()
    try:
        xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
    except Exception as exc:  # xgrammar raises RuntimeError / ValueError / its own errors
        raise Gemma3VLError(f"xgrammar cannot use this JSON schema: {_xgrammar_message(exc)}") from None
    return text


def check_regex(pattern: str) -> None:
    """Check that xgrammar can turn the regular expression ``pattern`` into a grammar (no tokenizer needed: before
    a model loads)."""
    xgr = load_xgrammar()
    try:
        xgr.Grammar.from_regex(pattern)
    except Exception as exc:  # xgrammar raises RuntimeError / ValueError / its own errors
        raise Gemma3VLError(f"xgrammar cannot use this regular expression: {_xgrammar_message(exc)}") from None


def tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> Any:
    """xgrammar's view of the vocabulary: the model's ``vocab_size`` ids (those past the tokenizer's are never
    allowed), ``stop_token_ids`` as its stop tokens, and every other special token (which the answer's text leaves
    out) never allowed: a token xgrammar reads as empty is one it never allows."""
    xgr = load_xgrammar()
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
    vocab = [""] * vocab_size
    for piece, index in tokenizer.get_vocab().items():
        if index < vocab_size:
            vocab[index] = piece
    stops = set(stop_token_ids)
    for index, added in tokenizer.added_tokens_decoder.items():
        if added.special and index not in stops and index < vocab_size:
            vocab[index] = ""
    return xgr.TokenizerInfo(vocab, vocab_type=detected.vocab_type, vocab_size=vocab_size,
                             stop_token_ids=list(stop_token_ids), add_prefix_space=detected.add_prefix_space)


class JsonGrammars:
    """One tokenizer's grammar compiler and its compiled JSON grammars, by the schema's canonical text.

    Thread-safe (the server's handler threads compile while the model thread decodes): a schema is compiled once,
    by the first request that brings it, outside the lock, so a slow compile holds up only the requests waiting for
    that same schema."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]):
        xgr = load_xgrammar()
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(tokenizer_info(tokenizer, vocab_size, stop_token_ids), cache_enabled=False)
        self._compiled: OrderedDict[str, Future] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.compilations = 0

    def compile(self, schema: Any) -> Any:
        """The ``xgrammar.CompiledGrammar`` of answers following the JSON Schema ``schema`` (a dict; ``ANY_OBJECT``
        for any JSON object). A schema xgrammar cannot use is a Gemma3VLError saying why (and is not kept)."""
        return self.compile_constraint(Constraint("json", schema))

    def compile_constraint(self, constraint: Constraint) -> Any:
        """The ``xgrammar.CompiledGrammar`` of ``constraint`` (compiled once per distinct one); one xgrammar cannot
        use is a Gemma3VLError saying why (and is not kept)."""
        text = constraint.key()
        with self._lock:
            compiled = self._compiled.get(text)
            first = compiled is None
            if first:
                compiled = self._compiled[text] = Future()
                self.compilations += 1
                if len(self._compiled) > CACHE_SIZE:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(text)
        if first:
            try:
                compiled.set_result(self._compile(constraint))
            except Exception as exc:
                with self._lock:
                    self._compiled.pop(text, None)
                what = {"json": "JSON schema", "regex": "regular expression", "choice": "choice",
                        "grammar": "grammar"}[constraint.kind]
                compiled.set_exception(Gemma3VLError(f"xgrammar cannot use this {what}: {_xgrammar_message(exc)}"))
        return compiled.result()

    def _compile(self, constraint: Constraint) -> Any:
        if constraint.kind == "json":
            return self.compiler.compile_json_schema(schema_text(constraint.value), any_whitespace=False,
                                                     strict_mode=True)
        if constraint.kind == "regex":
            return self.compiler.compile_regex(constraint.value)
        if constraint.kind == "choice":
            return self.compiler.compile_grammar(choice_grammar(constraint.value))
        return self.compiler.compile_grammar(constraint.value)


class GrammarRows:
    """The rows of a batch (or the engine's slots) whose answers follow a grammar: a matcher each, and the
    next-token bitmask of all ``batch`` rows, filled on the host and copied to the device before it is applied.

    The host bitmask is refilled only after the loop has read the tokens of the step that used it, which waits for
    that step's copy of them, queued after the bitmask's copy: one pinned buffer serves every step."""

    def __init__(self, batch: int, vocab: int, device: torch.device):
        self.xgr = load_xgrammar()
        self.vocab = vocab
        self.device = device
        self.matchers: list[Any] = [None] * batch
        host = self.xgr.allocate_token_bitmask(batch, vocab)
        self.host = host.pin_memory() if device.type == "cuda" else host
        self.bitmask = self.host if device.type != "cuda" else torch.empty_like(host, device=device)
        self._index: torch.Tensor | None = None  # the grammar rows on the device; rebuilt when they change

    @classmethod
    def of(cls, grammars: Sequence[Any], stop_ids: Sequence[Sequence[int]], vocab: int,
           device: torch.device) -> "GrammarRows | None":
        """Rows for a batch whose row ``i`` follows ``grammars[i]`` (None: free text) and stops at ``stop_ids[i]``;
        None when no row has a grammar: then nothing is computed at all."""
        if all(grammar is None for grammar in grammars):
            return None
        rows = cls(len(grammars), vocab, device)
        for row, (grammar, stops) in enumerate(zip(grammars, stop_ids)):
            if grammar is not None:
                rows.add(row, grammar, stops)
        return rows

    @property
    def rows(self) -> list[int]:
        return [row for row, matcher in enumerate(self.matchers) if matcher is not None]

    def add(self, row: int, grammar: Any, stop_ids: Sequence[int]) -> None:
        """Row ``row`` starts an answer that follows ``grammar`` (an ``xgrammar.CompiledGrammar`` for this model's
        vocabulary) and ends at one of ``stop_ids``. A GrammarError when the grammar allows no first token."""
        size = grammar.tokenizer_info.vocab_size
        if size != self.vocab:
            raise Gemma3VLError(f"the grammar was compiled for a vocabulary of {size} tokens; the model has "
                                f"{self.vocab}")
        self.matchers[row] = self.xgr.GrammarMatcher(grammar, override_stop_tokens=list(stop_ids))
        self._index = None
        try:
            self._fill(row)
        except GrammarError:
            self.remove(row)
            raise

    def remove(self, row: int) -> None:
        """Row ``row`` follows no grammar any more (it ended)."""
        if self.matchers[row] is not None:
            self.matchers[row] = None
            self._index = None

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 ``logits`` [batch, V] with each grammar row's disallowed tokens at -inf: a copy when a row has a
        grammar (the raw logits stay for the logprobs), ``logits`` itself when none has."""
        rows = self.rows
        if not rows:
            return logits
        if self._index is None:
            self._index = to_device_async(rows, self.device)
        if self.bitmask is not self.host:
            self.bitmask.copy_(self.host, non_blocking=True)
        masked = logits.clone()
        self.xgr.apply_token_bitmask_inplace(masked, self.bitmask, vocab_size=self.vocab, indices=self._index)
        return masked

    def advance(self, row: int, token: int, ended: bool) -> None:
        """Row ``row`` chose ``token``. An ended row leaves; otherwise its matcher takes the token and the row's next
        allowed tokens go to the host bitmask. A GrammarError when the grammar refuses the token or allows nothing
        after it (the row cannot go on; the caller ends it)."""
        matcher = self.matchers[row]
        if matcher is None:
            return
        if ended:
            self.remove(row)
            return
        try:
            if not self._xgrammar(matcher.accept_token, token):
                raise GrammarError(f"the JSON grammar refused token {token}, which it had allowed")
            self._fill(row)
        except GrammarError:
            self.remove(row)
            raise

    def _fill(self, row: int) -> None:
        self._xgrammar(self.matchers[row].fill_next_token_bitmask, self.host, row)
        if not bool(self.host[row].any()):
            raise GrammarError("the JSON grammar reached a dead end: no token may come next")

    @staticmethod
    def _xgrammar(call: Any, *args: Any) -> Any:
        """A matcher call whose failure (xgrammar's own checks raise RuntimeError) is this row's, not the batch's."""
        try:
            return call(*args)
        except Exception as exc:
            raise GrammarError(f"xgrammar failed: {_xgrammar_message(exc)}") from None
