"""``gemma3vl chat``: a multi-turn terminal conversation that streams its answers.

The whole history (system text, every user turn with its images, every answer) goes through the
checkpoint's chat template at each turn, so an answer is exactly what ``generate`` gives for the same
history. Images attached with ``/image PATH`` belong to the next message. The loop reads from and writes to
streams given to it, so it can be driven by a script as well as by a terminal: answers (and nothing else) go
to ``output``, one per line; notes and errors go to ``notes``.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Callable, TextIO

from PIL import Image

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.cache import StaticKVCache
from gemma3vl.infer.completion import Completion, Row
from gemma3vl.infer.conversation import Turn
from gemma3vl.infer.generate import Sampling
from gemma3vl.infer.prompt import load_image, not_text_at
from gemma3vl.infer.runtime import InferenceRuntime

DEFAULT_COMPILED_LENGTH = 8192  # positions of a compiled chat's one cache (prompt + answer), unless told

HELP = """commands (any case):
  /image PATH   attach an image to your next message (repeatable; quote paths that hold spaces)
  /reset        forget the conversation (and attached images)
  /exit         leave (end of input too)
  /help         this text
a line starting with // sends the rest of it starting with /"""


class ChatSession:
    """The conversation so far and the images waiting for the next user message.

    ``compile`` (CUDA): decode through the compiled CUDA graph. Every turn then runs on one ``StaticKVCache`` of
    ``max_length`` positions (prompt + answer), made at the first turn and reused, so the graph is compiled and
    captured once for the whole conversation, not once per history length; a conversation that outgrows it must
    be ``/reset``. Should compiling fail, the session says so through ``notes`` and decodes eagerly from then on.
    """

    def __init__(self, runtime: InferenceRuntime, sampling: Sampling, *, system: str | None = None,
                 pan_and_scan: bool | None = None, compile: bool = False, max_length: int | None = None,
                 notes: Callable[[str], None] | None = None):
        self.runtime = runtime
        self.sampling = sampling
        self.system = system
        self.pan_and_scan = pan_and_scan
        self.turns: list[Turn] = []
        self.pending_images: list[Image.Image] = []
        self.compile = compile
        self.max_length = min(max_length or DEFAULT_COMPILED_LENGTH, runtime.context_length)
        if self.max_length < 2:
            raise Gemma3VLError(f"--max-sequence-length {max_length} must be >= 2")
        self.notes = notes or (lambda message: None)
        self._cache: StaticKVCache | None = None

    def _answer(self, prompt, max_new_tokens: int, on_text: Callable[[str], None] | None) -> Completion:
        row = Row(prompt=prompt, max_new_tokens=max_new_tokens, on_text=on_text)
        if not self.compile:
            return self.runtime.complete([row], self.sampling)[0]
        if self._cache is None:
            weight = self.runtime.model.text.embed.weight
            self._cache = StaticKVCache(self.runtime.config.text, 1, self.max_length, weight.device, weight.dtype)
        return self.runtime.complete([row], self.sampling, compile=True, cache=self._cache,
                                     on_compile_failure=self._compile_failed)[0]

    def _compile_failed(self, why: str) -> None:
        """The turn in progress goes on eagerly (``generate`` saw to it); so do the later ones."""
        self.notes(f"(--compile: compiling the decode step failed ({why[:300]}); decoding eagerly from now on)")
        self.compile, self._cache = False, None

    def reset(self) -> None:
        self.turns = []
        self.pending_images = []

    def attach(self, path: str) -> None:
        if not self.runtime.config.is_vision_language:
            raise Gemma3VLError("this is a text-only Gemma 3 checkpoint: it cannot take images")
        if os.path.isdir(path):
            raise Gemma3VLError(f"{path}: a directory, not an image file")
        try:
            image = load_image(path)
        except OSError as exc:  # a name too long for the file system, a permission the stat needs, ...
            raise Gemma3VLError(f"{path}: cannot open it ({exc.strerror or exc})") from None
        self.pending_images.append(image)

    def history(self, text: str) -> list[Turn]:
        """The turns the model sees for the user message ``text`` (pending images first, then the text)."""
        system = [Turn("system", [self.system])] if self.system else []
        return [*system, *self.turns, Turn("user", [*self.pending_images, text])]

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> Completion:
        """Answer ``text``; the history changes only once the answer is complete."""
        turns = self.history(text)
        prompt = self.runtime.encode_conversation(turns, pan_and_scan=self.pan_and_scan)
        room = self.runtime.context_length - prompt.length
        if room < 1:
            raise Gemma3VLError(f"the conversation is {prompt.length} tokens, the model's whole context "
                                f"({self.runtime.context_length}); /reset to start again")
        if self.compile:
            room = self.max_length - prompt.length
            if room < 1:
                raise Gemma3VLError(f"the conversation is {prompt.length} tokens and the compiled chat holds "
                                    f"{self.max_length} (--max-sequence-length); /reset to start again")
        max_new_tokens = min(self.sampling.max_new_tokens, room)
        completion = self._answer(prompt, max_new_tokens, on_text)
        self.turns = [*self.turns, turns[-1], Turn("assistant", [completion.text])]
        self.pending_images = []
        return completion


def _read_line(stream: TextIO, prompt: str, output: TextIO) -> str | None:
    """One line, or None at the end of input. A terminal gets line editing (``input``)."""
    if stream is sys.stdin and stream.isatty():
        try:
            return input(prompt)
        except EOFError:
            return None
    if prompt:
        output.write(prompt)
        output.flush()
    line = stream.readline()
    return None if line == "" else line.rstrip("\n")


def _image_paths(rest: str) -> list[str]:
    """The paths of ``/image REST``: REST itself when it names a file (spaces, quotes and backslashes as typed),
    else REST split as a shell would (quoted paths); ``~`` is the home directory."""
    rest = rest.strip()
    if not rest:
        return []
    try:
        if os.path.isfile(os.path.expanduser(rest)):
            return [os.path.expanduser(rest)]
    except (OSError, ValueError):
        pass
    try:
        words = shlex.split(rest)
    except ValueError as exc:
        raise Gemma3VLError(f"/image {rest}: {exc} (quote a path that holds spaces or quotes)") from None
    return [os.path.expanduser(word) for word in words]


def _still_attached(session: ChatSession) -> str:
    count = len(session.pending_images)
    return f"; {count} image(s) still attached to your next message" if count else ""


def _decode_leniently(stream: TextIO) -> None:
    """Bytes that are not UTF-8 must not end the chat with a traceback, nor lose the lines read with them (a
    text stream drops its whole buffer on a decoding error): they decode to lone surrogates, which a path
    keeps (``os.fsencode`` gives the bytes back) and a message is refused for."""
    if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
        try:
            stream.reconfigure(errors="surrogateescape")
        except (ValueError, OSError):
            pass


def run_chat(session: ChatSession, input_stream: TextIO, output: TextIO, notes: TextIO, *, prompt: str = "") -> int:
    """Read lines until ``/exit`` or end of input; answer each message, streaming. Returns the exit code.

    Commands are told apart from messages by a leading ``/`` and read in any case (``/IMAGE``); a failed
    command or turn leaves the conversation and the attached images as they were."""

    def note(message: str) -> None:
        notes.write(message + "\n")
        notes.flush()

    def stream(text: str) -> None:
        try:
            output.write(text)
        except UnicodeEncodeError:  # an output that cannot show some character (a non-UTF-8 terminal)
            encoding = getattr(output, "encoding", None) or "ascii"
            output.write(text.encode(encoding, "replace").decode(encoding))
        output.flush()

    _decode_leniently(input_stream)

    while True:
        try:
            line = _read_line(input_stream, prompt, output)
        except KeyboardInterrupt:
            output.write("\n")
            return 0
        if line is None:
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            command, *arguments = text.split(None, 1)  # any whitespace after the command (a tab too)
            command, rest = command.lower(), "".join(arguments)
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                session.reset()
                note("(conversation cleared)")
            elif command == "/image":
                try:
                    _attach_images(session, rest, note)
                except KeyboardInterrupt:  # a slow image: the chat goes on, with what was attached before
                    note("(interrupted)" + _still_attached(session))
            elif command == "/help":
                note(HELP)
            else:
                note(f"unknown command {command} (/help lists them; // sends a line starting with /)")
            continue
        if text.startswith("//"):
            text = text[1:]
        if not_text_at(text) is not None:
            note("error: the message is not UTF-8 text; it was not sent" + _still_attached(session))
            continue
        try:
            session.ask(text, on_text=stream)
            output.write("\n")
            output.flush()
        except Gemma3VLError as exc:
            note(f"error: {exc}" + _still_attached(session))
        except KeyboardInterrupt:
            output.write("\n")
            note("(interrupted; that message and its answer are not kept" + _still_attached(session) + ")")


def _attach_images(session: ChatSession, rest: str, note: Callable[[str], None]) -> None:
    """``/image REST``: each path attached or its error noted; the images attached before stay."""
    try:
        paths = _image_paths(rest)
    except Gemma3VLError as exc:
        note(f"error: {exc}")
        return
    if not paths:
        note("error: /image needs a file path")
        return
    if not session.runtime.config.is_vision_language:
        note("error: this is a text-only Gemma 3 checkpoint: it cannot take images")
        return
    for path in paths:
        try:
            session.attach(path)
            note(f"(image attached to your next message: {path})")
        except Gemma3VLError as exc:
            note(f"error: {exc}")
