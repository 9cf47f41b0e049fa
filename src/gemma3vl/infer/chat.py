"""``gemma3vl chat``: a multi-turn terminal conversation that streams its answers.

The whole history (system text, every user turn with its images, every answer) goes through the
checkpoint's chat template at each turn, so an answer is exactly what ``generate`` gives for the same
history. Images attached with ``/image PATH`` belong to the next message. The loop reads from and writes to
streams given to it, so it can be driven by a script as well as by a terminal: answers (and nothing else) go
to ``output``, one per line; notes and errors go to ``notes``.
"""

from __future__ import annotations

import shlex
import sys
from typing import Callable, TextIO

from PIL import Image

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.cache import StaticKVCache
from gemma3vl.infer.completion import Completion, Row
from gemma3vl.infer.conversation import Turn
from gemma3vl.infer.generate import Sampling
from gemma3vl.infer.prompt import load_image
from gemma3vl.infer.runtime import InferenceRuntime

DEFAULT_COMPILED_LENGTH = 8192  # positions of a compiled chat's one cache (prompt + answer), unless told

HELP = """commands:
  /image PATH   attach an image to your next message (repeatable)
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
        self.pending_images.append(load_image(path))

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


def run_chat(session: ChatSession, input_stream: TextIO, output: TextIO, notes: TextIO, *, prompt: str = "") -> int:
    """Read lines until ``/exit`` or end of input; answer each message, streaming. Returns the exit code."""

    def note(message: str) -> None:
        notes.write(message + "\n")
        notes.flush()

    def stream(text: str) -> None:
        output.write(text)
        output.flush()

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
            command, _, rest = text.partition(" ")
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                session.reset()
                note("(conversation cleared)")
            elif command == "/image":
                try:
                    paths = shlex.split(rest) if rest.strip() else []
                except ValueError as exc:
                    note(f"error: /image {rest}: {exc}")
                    continue
                if not paths:
                    note("error: /image needs a file path")
                for path in paths:
                    try:
                        session.attach(path)
                        note(f"(image attached to your next message: {path})")
                    except Gemma3VLError as exc:
                        note(f"error: {exc}")
            elif command == "/help":
                note(HELP)
            else:
                note(f"unknown command {command} (/help lists them)")
            continue
        if text.startswith("//"):
            text = text[1:]
        try:
            session.ask(text, on_text=stream)
            output.write("\n")
            output.flush()
        except Gemma3VLError as exc:
            note(f"error: {exc}")
        except KeyboardInterrupt:
            output.write("\n")
            note("(interrupted; that message and its answer are not kept)")
