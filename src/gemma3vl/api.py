"""gemma3vl from Python: the command line's jobs as functions, and one loaded model to ask questions.

    import gemma3vl

    gemma3vl.convert_import("gemma-3-4b-it", "native-4b")             # HF -> native, bit for bit
    model = gemma3vl.load("gemma-3-4b-it", device="cuda")              # an HF or native directory (+ adapter=)
    model.generate("What is the total?", images=["receipt.jpg"], max_new_tokens=64)
    for text in model.stream("Describe it.", images=["receipt.jpg"]):
        print(text, end="", flush=True)
    model.chat([{"role": "user", "content": [{"type": "image", "image": "receipt.jpg"},
                                             {"type": "text", "text": "Who issued it?"}]}])
    result = gemma3vl.fine_tune("gemma3_vl_4b_peft", model="gemma-3-4b-it", data="train.jsonl", out="runs/lora",
                                settings={"train.steps": 200})
    gemma3vl.merge_adapter("gemma-3-4b-it", "runs/lora/adapter", "merged")
    gemma3vl.verify_checkpoint("merged")                              # transformers vs ours, same batch
    gemma3vl.evaluate("merged", "test.parquet", out="eval")

Each function is what its ``gemma3vl`` command runs (the command only parses flags and prints), with the same
checks: bad input raises :class:`gemma3vl.Gemma3VLError` naming the parameter, file or key at fault.
"""

from __future__ import annotations

import functools
import inspect
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Union

import torch
from PIL import Image

from gemma3vl.errors import Gemma3VLError, SettingError
from gemma3vl.infer.completion import Completion, Row
from gemma3vl.infer.conversation import EncodedPrompt
from gemma3vl.infer.messages import images_of, turns_of_messages
from gemma3vl.infer.prompt_options import checked_processor_kwargs, checked_template_kwargs
from gemma3vl.infer.runtime import InferenceRuntime
from gemma3vl.infer.sampling import Sampling
from gemma3vl.infer.structured import Constraint, text_constraint
from gemma3vl.infer.tool_calls import ReadAnswer, ToolUse, forced_constraint, read_answer, tool_use_of

ImageLike = Union[str, Path, Image.Image]  # a file path, a data: URL, or a PIL image

# generate's default answer length (``gemma3vl generate --max-new-tokens``)
DEFAULT_MAX_NEW_TOKENS = 128


# ---------------------------------------------------------------------------------------------- a loaded model
@dataclass
class Answer:
    """One answer with what ``generate(..., details=True)`` adds to its text."""

    text: str
    token_ids: list[int]  # the stop token included when one ended it
    # "stop" (a stop token or string), "length" (max_new_tokens) or, from chat with tools, "tool_calls"
    finish_reason: str
    prompt_tokens: int
    # chat with tools: the calls the answer makes, in OpenAI's form ({"id", "type": "function", "function": {"name",
    # "arguments"}}; None: the answer is text)
    tool_calls: list[dict[str, Any]] | None = None

    @classmethod
    def of(cls, completion: Completion, read: ReadAnswer | None = None) -> "Answer":
        """``completion`` as answered; ``read``: the answer read under tools (its calls and finish reason)."""
        calls = None if read is None or not read.calls else [call.wire() for call in read.calls]
        return cls(completion.text, list(completion.token_ids),
                   completion.finish_reason if read is None else read.finish_reason, completion.prompt_tokens, calls)


class Model:
    """A checkpoint loaded for generation (:func:`load`): its model, processor and generation defaults.

    ``module`` is the plain ``torch.nn.Module`` (``gemma3vl.model.Gemma3Model``), ``processor`` the checkpoint's
    own transformers processor (tokenizer, chat template, image processor).
    """

    def __init__(self, runtime: InferenceRuntime, *, compile: bool = False):
        self.runtime = runtime
        self.compile = compile
        # One generation at a time: calls from several threads (a web app's handlers, a stream being read while
        # another answer is asked for) wait their turn instead of running the model (and, compiled, one CUDA graph)
        # concurrently. Concurrency that batches is a list of prompts here, or ``gemma3vl serve``.
        self._turn = threading.Lock()

    def __repr__(self) -> str:
        return f"<gemma3vl.Model {self.runtime.describe()}>"

    @property
    def module(self) -> torch.nn.Module:
        return self.runtime.model

    @property
    def config(self) -> Any:
        return self.runtime.config

    @property
    def processor(self) -> Any:
        return self.runtime.processor

    @property
    def tokenizer(self) -> Any:
        return self.runtime.tokenizer

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    # ------------------------------------------------------------------------------------------ settings
    def sampling(self, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, greedy: bool = False,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: str | Sequence[str] | None = None, min_p: float | None = None,
                 presence_penalty: float | None = None, frequency_penalty: float | None = None,
                 repetition_penalty: float | None = None, logit_bias: dict[int | str, float] | None = None,
                 json_schema: dict[str, Any] | bool | None = None, min_new_tokens: int | None = None,
                 bad_words: Sequence[str] | None = None, regex: str | None = None,
                 choice: Sequence[str] | None = None, grammar: str | None = None) -> Sampling:
        """The checkpoint's ``generation_config.json`` with these settings on top (None: not given), checked.
        ``min_p`` and ``repetition_penalty``: transformers' (and vLLM's); ``logit_bias``: OpenAI's,
        ``{token id: bias from -100 to 100}`` added to the logits (-100 bans a token). ``min_new_tokens``:
        transformers' (vLLM's ``min_tokens``), no stop before that many tokens (at most ``max_new_tokens``).
        ``bad_words``: vLLM's, words the answer never holds (``InferenceRuntime.bad_words_ids``).
        ``regex`` / ``choice`` / ``grammar``: vLLM's guided decoding, the answer a full match of a regular
        expression, one of a list of strings, or an EBNF grammar's ``root`` (xgrammar's syntax); one constraint,
        ``json_schema`` included.
        ``json_schema``: answers follow this JSON Schema (``True``: any JSON object; needs xgrammar)."""
        _check_int("max_new_tokens", max_new_tokens, low=1)
        if not isinstance(greedy, bool):  # ("false" is a true value: it would decode greedily)
            raise Gemma3VLError(f"greedy={greedy!r} must be True or False")
        if seed is not None:
            _check_int("seed", seed)
        if top_k is not None:
            _check_int("top_k", top_k, low=1)
        if min_new_tokens is not None:
            _check_int("min_new_tokens", min_new_tokens, low=0)
            if min_new_tokens > max_new_tokens:
                raise Gemma3VLError(f"min_new_tokens={min_new_tokens} must be at most max_new_tokens={max_new_tokens}")
        for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                            ("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty),
                            ("repetition_penalty", repetition_penalty)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise Gemma3VLError(f"{name}={value!r} must be a number")
        if max_new_tokens >= self.runtime.context_length:
            raise Gemma3VLError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context "
                                f"of {self.runtime.context_length} tokens")
        sampling = self.runtime.sampling(max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
                                         top_k=top_k, top_p=top_p, seed=seed, presence_penalty=presence_penalty,
                                         frequency_penalty=frequency_penalty, logit_bias=logit_bias, min_p=min_p,
                                         repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens)
        sampling = replace(sampling, stop_strings=_stop_strings(stop),
                           bad_words_ids=_bad_words(self.runtime, bad_words))
        constraint = _constraint(json_schema, regex, choice, grammar)
        if constraint is not None:
            # (a given min_new_tokens stays, and validate refuses it; the checkpoint's does not apply to a grammar)
            sampling = replace(sampling, grammar=self.runtime.grammar(constraint), min_new_tokens=min_new_tokens or 0)
        try:
            sampling.validate()
        except SettingError as exc:
            name = "stop" if exc.name == "stop_strings" else exc.name
            raise Gemma3VLError(f"{name}={exc.value} {exc.requirement}") from None
        return sampling

    def encode(self, prompt: str, images: Sequence[ImageLike] | None = None, *, raw: bool = False,
               pan_and_scan: bool | None = None) -> EncodedPrompt:
        """The token ids (and pixel values) of one user prompt, exactly as ``gemma3vl generate`` builds them:
        the checkpoint's chat template with the images first (``raw``: the text as it is, one
        ``<start_of_image>`` in it per image)."""
        if not isinstance(prompt, str):
            raise Gemma3VLError(f"the prompt must be a string, got {type(prompt).__name__}")
        return self.runtime.encode_prompt(prompt, images_of(images, "images"), raw=raw, pan_and_scan=pan_and_scan)

    def encode_chat(self, messages: Sequence[dict[str, Any]], *, pan_and_scan: bool | None = None,
                    continue_final_message: bool = False, tools: Sequence[dict[str, Any]] | None = None,
                    tool_choice: Any = None, parallel_tool_calls: bool = True,
                    chat_template_kwargs: dict[str, Any] | None = None,
                    mm_processor_kwargs: dict[str, Any] | None = None) -> EncodedPrompt:
        """The token ids (and pixel values) of a conversation ending with a user message (with
        ``continue_final_message``: ending inside its last, assistant, message, for the model to continue it);
        ``tools``, ``chat_template_kwargs`` and ``mm_processor_kwargs`` as :meth:`chat` takes them."""
        use = _tool_use(tools, tool_choice, parallel_tool_calls)
        return self.runtime.encode_conversation(turns_of_messages(messages, tools=use),
                                                pan_and_scan=pan_and_scan, continue_final=continue_final_message,
                                                template_kwargs=checked_template_kwargs(chat_template_kwargs),
                                                processor_kwargs=checked_processor_kwargs(mm_processor_kwargs))

    # ------------------------------------------------------------------------------------------ answers
    def generate(self, prompt: str | Sequence[str], images: Sequence[Any] | None = None, *,
                 raw: bool = False, pan_and_scan: bool | None = None, batch_size: int = 8, details: bool = False,
                 **settings: Any) -> str | Answer | list[str] | list[Answer]:
        """Answer one prompt (a string) or many (a list of strings).

        ``images``: for one prompt, its images (paths, ``data:`` URLs or PIL images); for a list of prompts, one
        entry per prompt (a list of images, or None). ``settings``: :meth:`sampling`'s (``max_new_tokens``,
        ``greedy``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``seed``, ``stop``, ``presence_penalty``,
        ``frequency_penalty``, ``repetition_penalty``, ``logit_bias``, ``min_new_tokens``, ``bad_words``,
        ``json_schema``). Many prompts run through the continuous-batching engine of ``gemma3vl generate --batch``
        with ``batch_size`` rows; each answer is the one its prompt gets alone.
        Returns the answer's text (``details``: an :class:`Answer`), or a list of them in prompt order.
        """
        _check_call("generate", settings, details=details)
        sampling = self.sampling(**settings)
        if isinstance(prompt, str):
            encoded = self._fits(self.encode(prompt, images, raw=raw, pan_and_scan=pan_and_scan), sampling, "prompt")
            completion = self._complete_one(encoded, sampling)
            return Answer.of(completion) if details else completion.text
        prompts = _prompt_list(prompt)
        _check_int("batch_size", batch_size, low=1)
        if images is None:
            per_prompt: list[Any] = [None] * len(prompts)
        elif isinstance(images, (str, Path, Image.Image)) or len(images) != len(prompts):
            raise Gemma3VLError(f"with {len(prompts)} prompts, images must be a list of {len(prompts)} entries (each "
                                "a list of images, or None)")
        else:
            per_prompt = list(images)
        encoded = [self._fits(self.encode(text, extra, raw=raw, pan_and_scan=pan_and_scan), sampling,
                              f"prompt[{index}]")
                   for index, (text, extra) in enumerate(zip(prompts, per_prompt))]
        completions = self._complete_many(encoded, sampling, batch_size)
        return [Answer.of(c) if details else c.text for c in completions]

    def chat(self, messages: Sequence[dict[str, Any]], *, pan_and_scan: bool | None = None, details: bool = False,
             continue_final_message: bool = False, tools: Sequence[dict[str, Any]] | None = None,
             tool_choice: Any = None, parallel_tool_calls: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None, mm_processor_kwargs: dict[str, Any] | None = None,
             **settings: Any) -> str | Answer | list[dict[str, Any]]:
        """Answer the last user message of ``messages``: OpenAI's / transformers' chat format (``role`` system,
        user or assistant; ``content`` a string or a list of ``{"type": "text", "text": ...}`` and
        ``{"type": "image", "image": PATH | data: URL | PIL image}`` or ``{"type": "image_url", "image_url":
        {"url": ...}}`` parts), through the checkpoint's chat template. ``continue_final_message``: the last message
        is the assistant's, and the answer continues it (transformers' option: the answer is the continuation
        only). ``settings`` as for :meth:`generate`.

        ``tools``: functions the model may call, as OpenAI's chat completions take them (``[{"type": "function",
        "function": {"name", "description", "parameters"}}]``), with ``tool_choice`` (``"auto"``, ``"none"``,
        ``"required"`` or ``{"type": "function", "function": {"name"}}``) and ``parallel_tool_calls``, written into
        the prompt as ``gemma3vl serve`` writes them; ``messages`` may then hold assistant ``tool_calls`` and
        ``tool`` messages. When the answer calls functions, ``chat`` returns the calls (OpenAI's ``tool_calls``
        list, to append as ``{"role": "assistant", "tool_calls": calls}``) instead of the text; with ``details``,
        the :class:`Answer`'s ``tool_calls``.

        ``chat_template_kwargs``: variables for the checkpoint's chat template (those it reads; vLLM's request field
        of that name); ``mm_processor_kwargs``: this conversation's pan & scan settings (``do_pan_and_scan``,
        ``pan_and_scan_min_crop_size``, ``pan_and_scan_max_num_crops``, ``pan_and_scan_min_ratio_to_activate``)."""
        _check_call("chat", settings, details=details)
        use = _tool_use(tools, tool_choice, parallel_tool_calls)
        other = next((name for name in ("json_schema", "regex", "choice", "grammar")
                      if settings.get(name) not in (None, False)), None)
        forced = forced_constraint(use, None if other is None else repr(other))  # as the server decodes it
        if forced is not None:
            settings["json_schema"] = forced.value
        sampling = self.sampling(**settings)
        encoded = self._fits(self.encode_chat(messages, pan_and_scan=pan_and_scan,
                                              continue_final_message=continue_final_message, tools=tools,
                                              tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                                              chat_template_kwargs=chat_template_kwargs,
                                              mm_processor_kwargs=mm_processor_kwargs),
                             sampling, "messages")
        completion = self._complete_one(encoded, sampling)
        read = read_answer(completion.text, use, completion.finish_reason)
        if details:
            return Answer.of(completion, read)
        return [call.wire() for call in read.calls] if read.calls else read.content or ""

    def stream(self, prompt: str | Sequence[dict[str, Any]], images: Sequence[ImageLike] | None = None, *,
               raw: bool = False, pan_and_scan: bool | None = None, chat_template_kwargs: dict[str, Any] | None = None,
               mm_processor_kwargs: dict[str, Any] | None = None, **settings: Any) -> Iterator[str]:
        """The answer to one prompt (a string, with ``images``) or a conversation (a list of messages, as
        :meth:`chat` takes, with its ``chat_template_kwargs`` and ``mm_processor_kwargs``), piece by piece as it is
        generated: each piece is text that later tokens can no longer change; the pieces joined are the answer
        ``generate`` / ``chat`` gives. Stopping the iteration early (``break``) stops generating."""
        _check_call("stream", settings)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(item, str) for item in prompt):
            raise Gemma3VLError("stream() answers one prompt (a string) or one conversation (a list of messages), "
                                "not a list of prompts: call it once per prompt, or generate(prompts) for all")
        sampling = self.sampling(**settings)
        if isinstance(prompt, str):
            if chat_template_kwargs or mm_processor_kwargs:
                raise Gemma3VLError("chat_template_kwargs and mm_processor_kwargs are for a conversation (a list of "
                                    "messages), not a prompt string")
            encoded = self.encode(prompt, images, raw=raw, pan_and_scan=pan_and_scan)
        else:
            if images is not None:
                raise Gemma3VLError("a conversation carries its images in its messages; drop images=")
            encoded = self.encode_chat(prompt, pan_and_scan=pan_and_scan, chat_template_kwargs=chat_template_kwargs,
                                       mm_processor_kwargs=mm_processor_kwargs)
        encoded = self._fits(encoded, sampling, "prompt")
        return self._stream(encoded, sampling)

    # ------------------------------------------------------------------------------------------ internals
    def _fits(self, encoded: EncodedPrompt, sampling: Sampling, what: str) -> EncodedPrompt:
        context = self.runtime.context_length
        if encoded.length + sampling.max_new_tokens > context:
            raise Gemma3VLError(f"the {what} is {encoded.length} tokens; with max_new_tokens="
                                f"{sampling.max_new_tokens} that is over the model's context of {context}")
        return encoded

    def _complete_one(self, encoded: EncodedPrompt, sampling: Sampling, on_text: Any = None,
                      is_cancelled: Any = None) -> Completion:
        row = Row(prompt=encoded, max_new_tokens=sampling.max_new_tokens, stop_strings=sampling.stop_strings,
                  on_text=on_text, is_cancelled=is_cancelled)
        with self._turn:
            return self.runtime.complete([row], replace(sampling, stop_strings=()), compile=self.compile,
                                         on_compile_failure=_warn_compile_failure)[0]

    def _complete_many(self, prompts: list[EncodedPrompt], sampling: Sampling, slots: int) -> list[Completion]:
        from gemma3vl.infer.engine import run_rows

        answers: list[Completion | None] = [None] * len(prompts)

        def rows() -> Iterator[tuple[Row, Sampling, int]]:
            for index, encoded in enumerate(prompts):
                def finished(completion: Completion, index: int = index) -> None:
                    answers[index] = completion

                yield (Row(prompt=encoded, max_new_tokens=sampling.max_new_tokens,
                           stop_strings=sampling.stop_strings, on_finish=finished),
                       replace(sampling, stop_strings=()), index)

        with self._turn:
            run_rows(self.runtime, rows(), slots=min(slots, len(prompts)), compile=self.compile,
                     report=_warn_compile_failure)
        missing = [index for index, answer in enumerate(answers) if answer is None]
        if missing:  # never expected: every row the engine takes ends with on_finish
            raise Gemma3VLError(f"no answer was made for prompt(s) {missing}")
        return answers  # type: ignore[return-value]

    def _stream(self, encoded: EncodedPrompt, sampling: Sampling) -> Iterator[str]:
        """Generation runs in a worker thread that hands text to this generator through a queue; closing the
        generator (``break``) cancels the row, so the worker stops at its next token."""
        pieces: queue.Queue = queue.Queue()
        closed = threading.Event()
        done = object()

        def work() -> None:
            try:
                self._complete_one(encoded, sampling, on_text=pieces.put, is_cancelled=closed.is_set)
            except BaseException as exc:  # noqa: BLE001 - handed to the reading thread, raised there
                pieces.put(exc)
            pieces.put(done)

        worker = threading.Thread(target=work, name="gemma3vl-stream", daemon=True)
        worker.start()
        try:
            while True:
                piece = pieces.get()
                if piece is done:
                    return
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
        finally:
            closed.set()
            worker.join()


def load(model_dir: str | Path, *, device: str | None = None, dtype: str | None = None,
         adapter: str | Path | None = None, compile: bool = False) -> Model:
    """Load a checkpoint for generation: an HF checkpoint directory (``google/gemma-3-*-it`` as downloaded) or
    a native one (``convert_import``'s). ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``,
    ``cuda:N``; ``dtype``: ``auto`` (bfloat16 on CUDA, float32 on the CPU), ``float32``, ``bfloat16``,
    ``float16``; ``adapter``: a PEFT LoRA/DoRA adapter directory merged into the weights at load; ``compile``:
    decode through a compiled CUDA graph (CUDA only; the first answer compiles)."""
    from gemma3vl.infer.loading import resolve_device, resolve_dtype

    _check_directory("model_dir", model_dir)
    if adapter is not None:
        _check_directory("adapter", adapter)
    resolved = resolve_device(device, flag="device")
    resolve_dtype(dtype, resolved)  # an unknown name, before the model loads
    runtime = InferenceRuntime.load(model_dir, device=str(resolved), dtype=dtype, adapter=adapter)
    return Model(runtime, compile=compile)


# ---------------------------------------------------------------------------------------------- the other jobs
def convert_import(hf_dir: str | Path, out_dir: str | Path, *, max_shard_size: str | int = "5GB",
                   overwrite: bool = False, progress: bool = False) -> Path:
    """An HF checkpoint directory -> a native one (``gemma3vl convert import``); returns ``out_dir``."""
    from gemma3vl import bridge

    return Path(bridge.import_checkpoint(hf_dir, out_dir, max_shard_bytes=_shard_bytes(max_shard_size),
                                         overwrite=overwrite, progress=progress))


def convert_export(native_dir: str | Path, out_dir: str | Path, *, layout: str = "source",
                   max_shard_size: str | int | None = None, overwrite: bool = False, progress: bool = False) -> Path:
    """A native checkpoint -> an HF one in ``layout`` (``gemma3vl convert export``; ``source``: the layout it
    was imported from); returns ``out_dir``."""
    from gemma3vl import bridge

    _check_layout(layout)
    shard = None if max_shard_size is None else _shard_bytes(max_shard_size)
    return Path(bridge.export_checkpoint(native_dir, out_dir, layout=layout, max_shard_bytes=shard,
                                         overwrite=overwrite, progress=progress))


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, layout: str = "source",
                  overwrite: bool = False, report: Any = None) -> Path:
    """A base checkpoint + a PEFT LoRA/DoRA adapter -> a complete HF checkpoint with the adapter folded in
    (``gemma3vl convert merge``); returns ``out_dir``. ``report`` hears what was merged (a callable)."""
    from gemma3vl import bridge
    from gemma3vl.bridge.checkpoint import open_checkpoint
    from gemma3vl.bridge.fsutil import check_output_dir
    from gemma3vl.bridge.safetensors_io import DTYPES
    from gemma3vl.evaluation.loading import check_adapter
    from gemma3vl.evaluation.loading import merge_adapter as merge_into
    from gemma3vl.infer.loading import load_model

    _check_layout(layout)
    check_adapter(base_dir, adapter_dir)
    check_output_dir(Path(out_dir), overwrite, Path(base_dir), Path(adapter_dir))  # before loading
    with open_checkpoint(base_dir) as base:
        stored = {base.native_dtype(m) for m in base.mappings if not m.optional}
    # Held in the base's own dtype (bf16 for the hub models: half of float32's memory); each adapted projection is
    # merged in float32 and rounded once to it, and the export writes the base's dtypes anyway.
    dtype = DTYPES[stored.pop()] if len(stored) == 1 else torch.float32
    model, _ = load_model(base_dir, device="cpu", dtype=dtype)
    note = merge_into(model, adapter_dir)
    if report is not None:
        report(note)
    return Path(bridge.export_model(model, base_dir, out_dir, layout=layout, overwrite=overwrite))


def fine_tune(recipe: str | None = None, *, config: str | Path | None = None, settings: dict[str, Any] | None = None,
              model: str | Path | None = None, data: str | Path | None = None, eval_data: str | Path | None = None,
              out: str | Path | None = None, resume: bool | str | Path = False) -> Any:
    """Fine-tune (``gemma3vl train``): ``recipe`` (``gemma3vl recipes`` lists them) <- the ``config`` YAML/JSON
    file <- ``settings`` (``{"train.steps": 200, "optim.lr": 1e-5, ...}``, the command line's
    ``section.key=value`` overrides, typed or as strings) <- ``model`` / ``data`` / ``eval_data`` / ``out``.
    ``resume``: True continues from the newest checkpoint in ``out``, a path from that checkpoint. Returns a
    ``TrainResult`` (``steps``, ``final_loss``, ``history``: one dict of metrics per step). Under ``torchrun``,
    call it on every rank."""
    from gemma3vl.train.run import run_training

    cfg = training_config(recipe, config, settings=settings, model=model, data=data, eval_data=eval_data, out=out)
    return run_training(cfg, resume=str(resume) if isinstance(resume, Path) else (resume or None))


def training_config(recipe: str | None, config: str | Path | None = None, overrides: Sequence[str] = (), *,
                    settings: dict[str, Any] | None = None, model: str | Path | None = None,
                    data: str | Path | None = None, eval_data: str | Path | None = None,
                    out: str | Path | None = None) -> Any:
    """A run's checked ``TrainConfig``: the recipe <- the ``config`` file <- ``overrides`` (``section.key=value``
    strings, the command line's) <- ``settings`` (a dict) <- the paths. What ``gemma3vl train`` and
    :func:`fine_tune` both run."""
    from gemma3vl.train.config import build_config, set_value

    if settings is not None and not isinstance(settings, dict):
        raise Gemma3VLError(f"settings must be a dict of 'section.key': value, got {type(settings).__name__}")
    cfg = build_config(recipe, None if config is None else str(config), list(overrides))
    for key, value in (settings or {}).items():
        if not isinstance(key, str):
            raise Gemma3VLError(f"settings: the key {key!r} must be a string like 'train.steps'")
        set_value(cfg, key, value)
    for key, value in (("model.path", model), ("data.path", data), ("data.eval_path", eval_data), ("out", out)):
        if value is not None:
            set_value(cfg, key, str(value))
    cfg.validate()
    return cfg


def verify_checkpoint(model_dir: str | Path, *, native: str | Path | None = None, device: str | None = None,
                      dtype: str | None = None, greedy_tokens: int = 8) -> Any:
    """Run transformers' model (the reference) and ours on the same synthetic image+text batch (``gemma3vl
    verify``): ``model_dir`` is the HF checkpoint, ``native`` a native conversion of it to check instead of
    loading ``model_dir`` into ours. Returns a ``VerifyReport`` (``passed``, ``failures``, the differences)."""
    from gemma3vl import bridge
    from gemma3vl import verify as checks
    from gemma3vl.infer.loading import load_model, resolve_device, resolve_dtype

    _check_int("greedy_tokens", greedy_tokens, low=0)
    resolved = resolve_device(device, flag="device")
    torch_dtype = resolve_dtype(dtype, resolved)
    hf_dir = Path(model_dir)
    if bridge.is_native_dir(hf_dir):
        raise Gemma3VLError(f"{hf_dir}: verify needs the HF checkpoint directory (give the native one as "
                            "--native / native=)")
    config = bridge.read_config(hf_dir)
    ours_dir = Path(native) if native is not None else hf_dir
    if native is not None:
        differ = checks.config_differences(config, bridge.read_config(ours_dir))
        if differ:
            raise Gemma3VLError(f"--native {ours_dir}: not the model of {hf_dir} (they differ in {', '.join(differ)})")
    checks.log(f"loading transformers' model from {hf_dir} ...")
    reference = checks.load_reference(hf_dir, config, torch_dtype, resolved)
    checks.log(f"loading ours from {ours_dir} ...")
    ours, _ = load_model(ours_dir, device=resolved, dtype=torch_dtype)
    return checks.compare(ours, reference, config, dtype=torch_dtype, device=resolved, greedy_tokens=greedy_tokens)


def evaluate(model_dir: str | Path, data: str | Path, *, out: str | Path, **options: Any) -> dict[str, Any]:
    """Score ``model_dir`` on a local dataset (``gemma3vl eval``); writes ``OUT/predictions.jsonl`` and
    ``OUT/report.json`` and returns the report. ``options``: ``layout``, ``metrics`` (a list of names),
    ``adapter``, ``compare`` (another model directory), ``limit``, ``batch_size``, ``max_new_tokens``, ``split``,
    ``device``, ``dtype``, ``resume``, ``compile``, ``max_sequence_length`` (docs/evaluation.md)."""
    from gemma3vl.evaluation.runner import run_eval

    for name in ("batch_size", "max_new_tokens", "limit", "max_sequence_length"):
        if options.get(name) is not None:
            _check_int(name, options[name], low=1)
    if options.get("max_sequence_length") is not None and not options.get("compile"):
        raise Gemma3VLError("max_sequence_length sizes compile's rows: give compile=True too")
    if isinstance(options.get("metrics"), str):
        options["metrics"] = [name.strip() for name in options["metrics"].split(",") if name.strip()]
    try:
        return run_eval(model_dir, data, out=out, **options)
    except TypeError as exc:  # an option run_eval does not take, named by Python
        raise Gemma3VLError(f"evaluate: {exc}") from None


# ---------------------------------------------------------------------------------------------- checks
def _check_int(name: str, value: Any, *, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Gemma3VLError(f"{name}={value!r} must be an integer")
    if low is not None and value < low:
        raise Gemma3VLError(f"{name}={value} must be >= {low}")


def _check_directory(name: str, path: Any) -> None:
    if not isinstance(path, (str, Path)):
        raise Gemma3VLError(f"{name} must be a directory path, got {type(path).__name__}")
    if not Path(path).is_dir():
        raise Gemma3VLError(f"{name} {path}: {'a file, not a directory' if Path(path).exists() else 'no such directory'}")


def _check_layout(layout: str) -> None:
    from gemma3vl.bridge.layouts import WRITABLE

    if layout not in ("source", *WRITABLE):
        raise Gemma3VLError(f"layout={layout!r} is not one of source, {', '.join(WRITABLE)}")


def _shard_bytes(size: str | int) -> int:
    from gemma3vl.bridge.fsutil import parse_size

    if isinstance(size, bool) or not isinstance(size, (str, int)):
        raise Gemma3VLError(f"max_shard_size={size!r} must be a size like '5GB' or a number of bytes")
    if isinstance(size, int):
        if size < 1:
            raise Gemma3VLError(f"max_shard_size={size} must be >= 1 byte")
        return size
    try:
        return parse_size(size)
    except ValueError as exc:
        raise Gemma3VLError(f"max_shard_size={size!r}: {exc}") from None


# Keyword arguments users reach for that a method does not take, and what to do instead
_INSTEAD = {
    "max_tokens": "use max_new_tokens (OpenAI's max_tokens)",
    "max_length": "use max_new_tokens (the answer's tokens)",
    "images": "a conversation carries its images in its messages' parts",
    "raw": "raw applies to a prompt string (generate or stream)",
    "details": "stream yields the answer's text piece by piece; generate(details=True) or chat(details=True) give an "
               "Answer",
    "do_sample": "sampling is the default; greedy=True decodes greedily",
}


@functools.lru_cache(maxsize=1)
def _sampling_settings() -> tuple[str, ...]:
    """The names :meth:`Model.sampling` takes (the settings of generate, chat and stream)."""
    return tuple(name for name in inspect.signature(Model.sampling).parameters if name != "self")


def _check_call(method: str, settings: dict[str, Any], *, details: Any = False) -> None:
    """``settings`` are :meth:`Model.sampling`'s, and ``details`` a boolean: a :class:`Gemma3VLError` naming the method
    called and the argument (Python's TypeError named ``Model.sampling``, which the caller never called)."""
    known = _sampling_settings()
    for name in settings:
        if name not in known:
            instead = _INSTEAD.get(name)
            raise Gemma3VLError(f"{method}() takes no {name!r}" + (f": {instead}" if instead else
                                f" (its settings: {', '.join(known)})"))
    if not isinstance(details, bool):
        raise Gemma3VLError(f"details={details!r} must be True or False")


def _constraint(json_schema: Any, regex: Any, choice: Any, grammar: Any) -> Constraint | None:
    """The one structured-output constraint of :meth:`Model.sampling`'s arguments (None: free text)."""
    from gemma3vl.infer.structured import ANY_OBJECT

    given = [name for name, value in (("json_schema", json_schema), ("regex", regex), ("choice", choice),
                                      ("grammar", grammar)) if value is not None and value is not False]
    if len(given) > 1:
        raise Gemma3VLError(f"give one of json_schema, regex, choice and grammar, not {' and '.join(given)}")
    if not given:
        return None
    if given[0] == "json_schema":
        if json_schema is not True and not isinstance(json_schema, dict):
            raise Gemma3VLError(f"json_schema must be a JSON Schema (a dict) or True, got {type(json_schema).__name__}")
        return Constraint("json", ANY_OBJECT if json_schema is True else json_schema, "json_schema")
    return text_constraint(given[0], {"regex": regex, "choice": choice, "grammar": grammar}[given[0]], given[0])


def _bad_words(runtime: InferenceRuntime, words: Sequence[str] | None) -> tuple[tuple[int, ...], ...]:
    """``bad_words`` (a list of non-blank strings) as the token sequences they ban."""
    if words is None:
        return ()
    if isinstance(words, str) or not all(isinstance(word, str) and word.strip() for word in words):
        raise Gemma3VLError(f"bad_words must be a list of words (non-blank strings), got {words!r}")
    return runtime.bad_words_ids(words)


def _stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise Gemma3VLError(f"stop must be a string or a list of strings, got {stop!r}")
    return tuple(stop)


def _prompt_list(prompts: Any) -> list[str]:
    if not isinstance(prompts, (list, tuple)):
        raise Gemma3VLError(f"the prompt must be a string or a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise Gemma3VLError("the list of prompts is empty")
    for index, text in enumerate(prompts):
        if not isinstance(text, str):
            raise Gemma3VLError(f"prompt[{index}] must be a string, got {type(text).__name__}")
    return list(prompts)


def _warn_compile_failure(why: str) -> None:
    import warnings

    warnings.warn(f"compiling the decode step failed ({why[:300]}); decoding eagerly", RuntimeWarning, stacklevel=3)


def _tool_use(tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> ToolUse | None:
    """``chat``'s tool arguments, checked as the server checks a request's (a ToolError, a Gemma3VLError, names the
    argument)."""
    return tool_use_of({"tools": tools, "tool_choice": tool_choice, "parallel_tool_calls": parallel_tool_calls})
