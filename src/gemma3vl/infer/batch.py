"""``gemma3vl generate --batch``: a JSONL file of prompts in, a JSONL file of answers out.

Each input line is ``{"prompt": ..., "images": [paths relative to the JSONL file], "id": ..., and optional
per-line max_new_tokens, min_new_tokens, temperature, top_k, top_p, min_p, seed, greedy, stop, presence_penalty,
frequency_penalty, repetition_penalty, logit_bias (OpenAI's {"token id": bias}), bad_words (vLLM's: words the answer
never holds), and json (true: the answer is a
JSON object) or json_schema (a JSON Schema the answer follows), or regex / choice / grammar (vLLM's guided decoding)}``;
each prompt is built exactly as ``gemma3vl generate --prompt`` builds it. A line may give ``"messages"`` instead
of ``"prompt"`` (not both, and no ``images`` beside it): a conversation in OpenAI's / transformers' chat form, as
``gemma3vl.infer.messages.turns_of_messages`` reads it (its image paths relative to the JSONL file too), ending
with a user message; it is encoded through the checkpoint's chat template (``runtime.encode_conversation``, as
``gemma3vl.Model.chat`` and the server do), ``--pan-and-scan`` applying, ``--raw`` not (a messages line under
``--raw`` is a bad line). Its answer record carries ``"messages"`` (as given) where a prompt line's carries
``"prompt"``. A messages line may give ``tools`` (with ``tool_choice``, ``parallel_tool_calls``: OpenAI's chat forms;
its messages may then hold ``tool_calls`` and ``tool`` messages), written into the prompt as the server writes them;
an answer that calls functions gets ``"tool_calls"`` (OpenAI's form) and ``finish_reason: "tool_calls"`` beside its
``"answer"`` text. Either kind of line is checked when the file is read (its image files exist; a conversation's
structure, none of its images decoded), and its images are decoded only when its turn comes. The lines run on the
server's
continuous-batching engine (``engine.ContinuousBatcher``) with ``--batch-size`` slots: the next line is encoded
and joins the running batch as soon as a slot frees, so a short answer never waits for a long one, and lines with
any mix of sampling settings share the batch (every row samples with its own settings and seeded generator, so
each greedy or seeded answer is the one ``gemma3vl generate`` gives that line alone). A bad line is reported as
``FILE:LINE: reason`` and skipped, and counted. Answers are written in input order, each as soon as every line
before it is done, to ``OUTPUT.partial``, which is renamed to ``OUTPUT`` at the end.

The engine's rows are sized for the longest line seen so far (prompt + max_new_tokens, rounded up to
``engine.ROW_LENGTH_STEP``), not for the whole context, and grow when a longer line comes
(``ContinuousBatcher.grow``): a file's lengths are only known once its prompts are encoded, and encoding them all
first would hold every image in memory or process it twice.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from gemma3vl.bridge.fsutil import blocking_file
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.completion import FINISH_ERROR, Completion, Row
from gemma3vl.infer.conversation import EncodedPrompt, check_turns
from gemma3vl.infer.engine import run_rows
from gemma3vl.infer.generate import Sampling
from gemma3vl.infer.json_values import is_finite_number as _is_number
from gemma3vl.infer.json_values import is_int as _is_int
from gemma3vl.infer.messages import turns_of_messages
from gemma3vl.infer.prompt import check_image_file, load_image, lone_surrogate_at
from gemma3vl.infer.prompt_options import checked_processor_kwargs, checked_template_kwargs
from gemma3vl.infer.runtime import InferenceRuntime
from gemma3vl.infer.structured import ANY_OBJECT, Constraint, text_constraint
from gemma3vl.infer.tool_calls import ToolUse, forced_constraint, read_answer, tool_use_of

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p")
# apply to greedy lines too: they do not turn sampling on
PENALTY_KEYS = ("presence_penalty", "frequency_penalty", "repetition_penalty")
# the answer's format: any JSON object, one following a JSON Schema, a regular expression's full match, one of a
# list of strings, an EBNF grammar's root (one of them)
JSON_KEYS = ("json", "json_schema", "regex", "choice", "grammar")
TOOL_KEYS = ("tools", "tool_choice", "parallel_tool_calls")  # messages lines only
# messages lines only: vLLM's chat template variables and pan & scan settings (prompt_options)
PROMPT_OPTION_KEYS = ("chat_template_kwargs", "mm_processor_kwargs")
LINE_KEYS = ("id", "prompt", "messages", "images", "max_new_tokens", "min_new_tokens", *SAMPLING_KEYS, "seed",
             "greedy", "stop", *PENALTY_KEYS, "logit_bias", "bad_words", *JSON_KEYS, *TOOL_KEYS, *PROMPT_OPTION_KEYS)


@dataclass
class BatchDefaults:
    """The command line's settings, which a line's own keys override."""

    max_new_tokens: int = 128
    min_new_tokens: int | None = None  # None: the checkpoint's generation config's
    greedy: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    raw: bool = False
    pan_and_scan: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    # what answers must be: --json (structured.ANY_OBJECT) / --json-schema's JSON, --regex, --choice; None: free text
    constraint: Constraint | None = None

@dataclass
class BatchItem:
    line: int  # 1-based line number in the input file
    prompt: str | None  # None on a messages line
    image_paths: list[Path]
    sampling: Sampling
    stop: tuple[str, ...] = ()
    id: Any = None
    has_id: bool = False
    messages: list | None = None  # a messages line's conversation, as read (its images loaded by _encode)
    base_dir: Path | None = None  # what the messages' image paths are relative to (the JSONL file's directory)
    tools: ToolUse | None = None  # a messages line's tools
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # a messages line's chat_template_kwargs
    processor_kwargs: dict[str, Any] = field(default_factory=dict)  # a messages line's mm_processor_kwargs

    def record(self, completion: Completion) -> dict[str, Any]:
        key = {"id": self.id} if self.has_id else {"index": self.line - 1}
        asked = {"prompt": self.prompt} if self.messages is None else {"messages": self.messages}
        read = read_answer(completion.text, self.tools, completion.finish_reason)
        made = {"tool_calls": [call.wire() for call in read.calls]} if read.calls else {}
        return {**key, **asked, "answer": completion.text, **made, "tokens": completion.completion_tokens,
                "finish_reason": read.finish_reason}


@dataclass
class BatchSummary:
    answered: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


def _check_type(obj: dict, key: str, ok: Callable[[Any], bool], wanted: str) -> None:
    if key in obj and not ok(obj[key]):
        raise Gemma3VLError(f"{key!r} must be {wanted}, got {obj[key]!r}")


def _is_stop(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value))


def _line_constraint(obj: dict, default: Constraint | None) -> Constraint | None:
    """What a line's answer must be: its own ``json_schema``, ``json``, ``regex``, ``choice`` or ``grammar`` (one of
    them), else the command line's JSON Schema."""
    given = [key for key in JSON_KEYS if key in obj]
    if len(given) > 1:
        raise Gemma3VLError(f"give one of {', '.join(map(repr, JSON_KEYS))}, not {' and '.join(map(repr, given))}")
    if not given:
        return default
    key = given[0]
    if key == "json":
        return Constraint("json", ANY_OBJECT, key) if obj["json"] else None
    if key == "json_schema":
        return Constraint("json", obj[key], key)
    return text_constraint(key, obj[key], key)


def _check_messages(messages: Any, base_dir: Path, runtime: InferenceRuntime, tools: ToolUse | None) -> None:
    """Refuse what encoding ``messages`` would refuse, decoding none of their images (each image file is only
    checked to exist): their parts (``turns_of_messages``) and the chat template's rules (``check_turns``: roles,
    their order, the last message a user one, images on a text-only checkpoint)."""
    tokenizer = runtime.tokenizer
    check_turns(turns_of_messages(messages, base_dir, decode=False, tools=tools), runtime.config,
                getattr(tokenizer, "boi_token", None) or "<start_of_image>",
                getattr(tokenizer, "image_token", None) or "<image_soft_token>")


def parse_line(text: str, line: int, base_dir: Path, defaults: BatchDefaults, runtime: InferenceRuntime) -> BatchItem:
    """One input line as a :class:`BatchItem` (a Gemma3VLError saying what is wrong otherwise)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Gemma3VLError(f"not valid JSON ({exc})") from None
    except ValueError as exc:  # an integer of more than sys.get_int_max_str_digits() digits
        raise Gemma3VLError(f"cannot read the JSON ({exc})") from None
    except RecursionError:
        raise Gemma3VLError("JSON nested too deeply to read") from None
    if not isinstance(obj, dict):
        raise Gemma3VLError("expected a JSON object like {\"prompt\": \"...\"}")
    surrogate = lone_surrogate_at(obj)
    if surrogate is not None:
        # JSON's \ud800 escapes decode to a lone surrogate, which is not text: the tokenizer and the UTF-8 answers
        # file would fail on it (a traceback that ended the whole run)
        where, char = surrogate
        raise Gemma3VLError(f"the line holds a lone surrogate ({char.encode('unicode_escape').decode()})"
                            f"{f' in {where!r}' if where else ''}, which is not Unicode text")
    unknown = sorted(set(obj) - set(LINE_KEYS))
    if unknown:
        raise Gemma3VLError(f"unknown key(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(LINE_KEYS)})")
    conversation = "messages" in obj
    if conversation and "prompt" in obj:
        raise Gemma3VLError("give 'prompt' or 'messages', not both")
    if conversation and "images" in obj:
        raise Gemma3VLError("'images' does not go with 'messages': put the images in the messages' content parts "
                            "({\"type\": \"image\", \"image\": \"PATH\"})")
    if conversation and defaults.raw:
        raise Gemma3VLError("--raw applies to prompt lines only, and this line gives 'messages'")
    if not conversation and not isinstance(obj.get("prompt"), str):
        raise Gemma3VLError("'prompt' (a string) is required, or 'messages' (a list of chat messages)")
    _check_type(obj, "images", lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v),
                "a list of file paths")
    _check_type(obj, "id", lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), "a string or integer")
    _check_type(obj, "max_new_tokens", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    _check_type(obj, "min_new_tokens", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _check_type(obj, "temperature", lambda v: _is_number(v) and v >= 0, "a finite number >= 0")
    _check_type(obj, "top_k", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    _check_type(obj, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    _check_type(obj, "min_p", lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
    _check_type(obj, "seed", _is_int, "an integer")
    _check_type(obj, "greedy", lambda v: isinstance(v, bool), "true or false")
    _check_type(obj, "stop", _is_stop, "a string or a list of strings")
    for key in PENALTY_KEYS:  # (their range: sampling.validate() below)
        _check_type(obj, key, _is_number, "a finite number")
    _check_type(obj, "bad_words", lambda v: isinstance(v, list) and all(isinstance(w, str) and w.strip() for w in v),
                "a list of words (non-blank strings)")
    _check_type(obj, "json", lambda v: isinstance(v, bool), "true or false")
    _check_type(obj, "json_schema", lambda v: isinstance(v, dict), "a JSON Schema (an object)")
    constraint = _line_constraint(obj, defaults.constraint)
    tools = _line_tools(obj, conversation)
    other = None if constraint is None else f"{constraint.param!r} (or --json / --json-schema / --regex / --choice)"
    constraint = forced_constraint(tools, other) or constraint
    _messages_only(obj, PROMPT_OPTION_KEYS, conversation)
    template_kwargs = checked_template_kwargs(obj.get("chat_template_kwargs"))
    processor_kwargs = checked_processor_kwargs(obj.get("mm_processor_kwargs"))
    if conversation:
        _check_messages(obj["messages"], base_dir, runtime, tools)
    images = [base_dir / path for path in obj.get("images", [])]
    for name, path in zip(obj.get("images", []), images):
        if not name or "\0" in name:
            raise Gemma3VLError(f"'images' holds {'an empty path' if not name else f'a path with a NUL byte, {name!r}'}")
        check_image_file(path, name)
    if images and not runtime.config.is_vision_language:
        raise Gemma3VLError("this is a text-only Gemma 3 checkpoint: it cannot take images")
    # A line that sets a sampling setting samples, as the same flags do on the command line without --greedy.
    greedy = obj.get("greedy", defaults.greedy and not any(key in obj for key in SAMPLING_KEYS))
    minimum = obj.get("min_new_tokens", defaults.min_new_tokens)  # None: the checkpoint's
    sampling = runtime.sampling(
        max_new_tokens=obj.get("max_new_tokens", defaults.max_new_tokens),
        greedy=greedy,
        temperature=obj.get("temperature", defaults.temperature),
        top_k=obj.get("top_k", defaults.top_k),
        top_p=obj.get("top_p", defaults.top_p),
        min_p=obj.get("min_p", defaults.min_p),
        seed=obj.get("seed", defaults.seed),
        presence_penalty=obj.get("presence_penalty", defaults.presence_penalty),
        frequency_penalty=obj.get("frequency_penalty", defaults.frequency_penalty),
        repetition_penalty=obj.get("repetition_penalty", defaults.repetition_penalty),
        logit_bias=obj.get("logit_bias"),  # (checked there: an object of token ids in this vocabulary)
        min_new_tokens=minimum,
    )
    sampling = replace(sampling, bad_words_ids=runtime.bad_words_ids(obj.get("bad_words", ())))
    if minimum is not None and minimum > sampling.max_new_tokens:
        raise Gemma3VLError(f"min_new_tokens={minimum} is over max_new_tokens={sampling.max_new_tokens}")
    if constraint is not None:
        # a given min_new_tokens stays (and validate refuses it: the answer ends with its grammar), the checkpoint's
        # goes
        sampling = replace(sampling, grammar=runtime.grammar(constraint), min_new_tokens=minimum or 0)
    sampling.validate()
    stop = obj.get("stop", ())
    return BatchItem(line=line, prompt=obj.get("prompt"), image_paths=images, sampling=sampling,
                     stop=(stop,) if isinstance(stop, str) else tuple(stop), id=obj.get("id"), has_id="id" in obj,
                     messages=obj["messages"] if conversation else None, base_dir=base_dir, tools=tools,
                     template_kwargs=template_kwargs, processor_kwargs=processor_kwargs)


def _messages_only(obj: dict, keys: tuple[str, ...], conversation: bool) -> None:
    """Refuse ``keys`` on a prompt line: they go with messages lines only."""
    given = [key for key in keys if key in obj]
    if given and not conversation:
        raise Gemma3VLError(f"{given[0]!r} goes with 'messages' lines only")


def _line_tools(obj: dict, conversation: bool) -> ToolUse | None:
    """A messages line's ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` (None: no tools)."""
    _messages_only(obj, TOOL_KEYS, conversation)
    return tool_use_of(obj)  # (a ToolError is a Gemma3VLError: the line is reported with its message)


def read_batch_file(path: Path, defaults: BatchDefaults, runtime: InferenceRuntime,
                    report: Callable[[str], None]) -> tuple[list[BatchItem], int]:
    """The valid items of ``path`` and the number of bad lines (each reported as ``FILE:LINE: reason``)."""
    try:
        # JSONL lines end at "\n" only: str.splitlines would also split at U+2028, U+0085, ... which JSON strings
        # may hold as is. Each line is decoded on its own, so a stray non-UTF-8 byte costs its line, not the run.
        raw_lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        raise Gemma3VLError(f"{path}: cannot read the prompts file ({exc})") from None
    if raw_lines[0].startswith(b"\xef\xbb\xbf"):  # a byte-order mark (Windows editors, PowerShell): not part of line 1
        raw_lines[0] = raw_lines[0][3:]
    items: list[BatchItem] = []
    bad = 0
    for number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as exc:
            report(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                   f"save the file as UTF-8")
            bad += 1
            continue
        if not text.strip():
            continue
        try:
            items.append(parse_line(text, number, path.parent, defaults, runtime))
        except Gemma3VLError as exc:
            report(f"{path}:{number}: {exc}")
            bad += 1
    return items, bad


class _OrderedWriter:
    """Writes records in input order: each one as soon as all earlier lines are answered or skipped."""

    def __init__(self, stream: Any, lines_in_order: list[int]):
        self.stream = stream
        self.order = lines_in_order
        self.next = 0
        self.ready: dict[int, dict | None] = {}

    def put(self, line: int, record: dict | None) -> None:
        self.ready[line] = record
        while self.next < len(self.order) and self.order[self.next] in self.ready:
            record = self.ready.pop(self.order[self.next])
            if record is not None:
                self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.next += 1
        self.stream.flush()


def _encode(item: BatchItem, runtime: InferenceRuntime, defaults: BatchDefaults) -> EncodedPrompt:
    if item.messages is not None:  # its images are loaded here, its structure was checked by parse_line
        turns = turns_of_messages(item.messages, item.base_dir, tools=item.tools)
        prompt = runtime.encode_conversation(turns, pan_and_scan=defaults.pan_and_scan,
                                             template_kwargs=item.template_kwargs,
                                             processor_kwargs=item.processor_kwargs)
        what = "conversation"
    else:
        images = [load_image(path) for path in item.image_paths]
        prompt = runtime.encode_prompt(item.prompt, images, raw=defaults.raw, pan_and_scan=defaults.pan_and_scan)
        what = "prompt"
    if prompt.length + item.sampling.max_new_tokens > runtime.context_length:
        raise Gemma3VLError(f"the {what} is {prompt.length} tokens; with max_new_tokens="
                            f"{item.sampling.max_new_tokens} that is over the context of {runtime.context_length}")
    return prompt


def _answer_all(runtime: InferenceRuntime, items: list[BatchItem], defaults: BatchDefaults, slots: int,
                finished: Callable[[BatchItem, Completion | None], None],
                bad: Callable[[BatchItem, str], None], compile: bool = False,
                report: Callable[[str], None] = lambda message: print(message, file=sys.stderr)) -> None:
    """Run ``items`` through a ``ContinuousBatcher`` of ``slots`` rows (``engine.run_rows``), in file order: between
    two decode steps every free slot takes the next line (encoded then, so only the running lines' images are in
    memory). ``finished(item, completion)`` hears each line once it ends; a line that fails to encode goes to
    ``bad`` and then to ``finished`` with None. ``compile``: the engine's decode step as one compiled CUDA graph
    (CUDA only; recompiled when a longer line grows the rows)."""

    def rows() -> Iterator[tuple[Row, Sampling, BatchItem] | None]:
        for item in items:
            try:
                prompt = _encode(item, runtime, defaults)
            except Gemma3VLError as exc:
                bad(item, str(exc))
                finished(item, None)
                yield None
                continue
            yield (Row(prompt=prompt, max_new_tokens=item.sampling.max_new_tokens, stop_strings=item.stop,
                       on_finish=lambda completion, item=item: finished(item, completion)), item.sampling, item)

    run_rows(runtime, rows(), slots=slots, compile=compile,
             report=lambda why: report(f"--compile: compiling the decode step failed ({why[:300]}); decoding eagerly"))


def check_output_path(output_path: str | Path, input_path: str | Path) -> None:
    """Refuse an answers file that cannot be written, before any model is loaded or line answered."""
    output_path, input_path = Path(output_path), Path(input_path)
    if output_path.is_dir():
        raise Gemma3VLError(f"{output_path}: is a directory (--output names the answers file, e.g. answers.jsonl)")
    blocking = blocking_file(output_path)
    if blocking is not None:
        raise Gemma3VLError(f"{output_path}: cannot be written ({blocking} is a file, not a directory)")
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise Gemma3VLError(f"{output_path}: the output would overwrite the prompts file")
    partial = output_path.with_name(output_path.name + ".partial")
    if input_path.exists() and partial.resolve() == input_path.resolve():
        # the answers are written to OUTPUT.partial first, then renamed: the prompts file would be lost
        raise Gemma3VLError(f"{output_path}: its answers are written to {partial} first, which is the prompts file; "
                            f"choose another --output")


def run_batch_file(runtime: InferenceRuntime, input_path: str | Path, output_path: str | Path, *,
                   defaults: BatchDefaults, batch_size: int = 8, progress: bool = True,
                   report: Callable[[str], None] | None = None, compile: bool = False) -> BatchSummary:
    """Answer every valid line of ``input_path`` into ``output_path`` (JSONL).

    Answers go to ``OUTPUT.partial`` first, renamed to ``OUTPUT`` when every line is done; a run that fails or
    is interrupted leaves the partial file (the answers so far, in input order) and says so.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise Gemma3VLError(f"--batch-size {batch_size} must be >= 1")
    input_path, output_path = Path(input_path), Path(output_path)
    summary = BatchSummary()
    # tqdm.write keeps a message on its own line above the progress bar
    say = report or (lambda message: tqdm.write(message, file=sys.stderr))

    def bad(message: str) -> None:
        summary.errors.append(message)
        say(message)

    check_output_path(output_path, input_path)
    items, summary.skipped = read_batch_file(input_path, defaults, runtime, bad)
    partial = output_path.with_name(output_path.name + ".partial")
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        stream = open(partial, "w", encoding="utf-8")
    except OSError as exc:
        raise Gemma3VLError(f"{output_path}: cannot write the answers ({exc.strerror or exc})") from None
    done = False
    with tqdm(total=len(items), desc="generate", unit="prompt", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        try:
            with stream:
                writer = _OrderedWriter(stream, [item.line for item in items])

                def bad_line(item: BatchItem, reason: str) -> None:
                    bad(f"{input_path}:{item.line}: {reason}")

                def finished(item: BatchItem, completion: Completion | None) -> None:
                    if completion is not None and completion.finish_reason == FINISH_ERROR:
                        bad_line(item, completion.error)  # its JSON grammar reached a dead end
                        completion = None
                    if completion is None:
                        summary.skipped += 1
                    else:
                        summary.answered += 1
                    writer.put(item.line, None if completion is None else item.record(completion))
                    bar.update(1)

                _answer_all(runtime, items, defaults, min(batch_size, max(len(items), 1)), finished, bad_line,
                            compile=compile, report=say)
            os.replace(partial, output_path)
            done = True
        finally:
            if not done and partial.exists():
                say(f"stopped early: the answers so far are in {partial}")
    return summary


def describe_summary(summary: BatchSummary, output_path: str | Path, seconds: float) -> str:
    return (f"answered {summary.answered} prompt(s), skipped {summary.skipped} bad line(s), "
            f"in {seconds:.1f}s -> {output_path}")

