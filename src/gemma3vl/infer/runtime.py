"""Everything a front-end needs from one checkpoint, loaded once: model, processor, sampling defaults.

``chat``, ``serve`` and ``generate --batch`` all load the same four things the way ``generate`` does
(``load_model``, ``load_processor``, ``generation_config.json``). The lock is for the server, whose handler
threads encode prompts while the scheduler thread decodes answers: a Rust tokenizer refuses to be used
from two threads at once while one of them changes its padding/truncation state.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.completion import Completion, Row, complete
from gemma3vl.infer.conversation import EncodedPrompt, Turn, encode_conversation
from gemma3vl.infer.generate import Sampling
from gemma3vl.infer.loading import load_model
from gemma3vl.infer.prompt import build_inputs, load_processor, tokenizer_of
from gemma3vl.infer.sampling_defaults import read_generation_defaults, resolve_sampling, stop_token_ids
from gemma3vl.infer.structured import Constraint, JsonGrammars


@dataclass
class InferenceRuntime:
    model_dir: Path
    model: torch.nn.Module
    config: Gemma3Config
    processor: Any
    generation_defaults: dict[str, Any]
    load_seconds: float = 0.0
    lock: threading.RLock = field(default_factory=threading.RLock)
    adapter_note: str | None = None  # what --adapter merged into the weights
    _grammars: JsonGrammars | None = field(default=None, init=False, repr=False)  # made at the first JSON request

    @classmethod
    def load(cls, model_dir: str | Path, *, device: str | None = None, dtype: str | None = None,
             adapter: str | Path | None = None) -> "InferenceRuntime":
        """``adapter``: a PEFT LoRA/DoRA adapter directory for ``model_dir``, merged into the weights at load (so
        decoding runs the plain model at full speed)."""
        model_dir = Path(model_dir)
        started = time.perf_counter()
        note = None
        if adapter is not None:
            from gemma3vl.evaluation.loading import check_adapter, merge_adapter

            check_adapter(model_dir, adapter)  # before the model loads
        model, config = load_model(model_dir, device=device, dtype=dtype)
        if adapter is not None:
            note = merge_adapter(model, adapter)
        processor = load_processor(model_dir, config)
        defaults = read_generation_defaults(model_dir)
        return cls(model_dir, model, config, processor, defaults, load_seconds=time.perf_counter() - started,
                   adapter_note=note)

    @property
    def tokenizer(self) -> Any:
        return tokenizer_of(self.processor)

    @property
    def device(self) -> torch.device:
        return self.model.text.embed.weight.device

    @property
    def context_length(self) -> int:
        return int(self.config.text.max_position_embeddings)

    def describe(self) -> str:
        dtype = next(self.model.parameters()).dtype
        return (f"loaded {self.model_dir} ({self.config.text.num_hidden_layers} layers, {dtype}, {self.device}) "
                f"in {self.load_seconds:.1f}s" + (f"; {self.adapter_note}" if self.adapter_note else ""))

    def sampling(self, *, max_new_tokens: int, greedy: bool = False, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 presence_penalty: float | None = None, frequency_penalty: float | None = None,
                 logit_bias: Mapping[Any, Any] | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, min_new_tokens: int | None = None) -> Sampling:
        """The checkpoint's generation defaults with these settings on top (None: not given)."""
        return resolve_sampling(self.generation_defaults, self.config, max_new_tokens=max_new_tokens,
                                greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                logit_bias=logit_bias, min_p=min_p, repetition_penalty=repetition_penalty,
                                min_new_tokens=min_new_tokens)

    def json_grammar(self, schema: dict[str, Any]) -> Any:
        """The compiled grammar (for ``Sampling.grammar``) of answers following the JSON Schema ``schema``
        (``structured.ANY_OBJECT``: any JSON object), compiled once per distinct schema. A Gemma3VLError when
        xgrammar is missing or cannot use the schema."""
        return self.grammar(Constraint("json", schema))

    def grammar(self, constraint: Constraint) -> Any:
        """The compiled grammar of ``constraint`` (JSON, a regular expression, a choice or an EBNF grammar),
        compiled once per distinct one; a Gemma3VLError when xgrammar is missing or cannot use it."""
        with self.lock:  # the tokenizer, read once to make the compiler
            if self._grammars is None:
                self._grammars = JsonGrammars(self.tokenizer, self.config.text.vocab_size,
                                              self.json_grammar_stop_ids)
        return self._grammars.compile_constraint(constraint)

    def bad_words_ids(self, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """vLLM's ``bad_words`` as the token sequences they ban (``Sampling.bad_words_ids``): each word (leading
        spaces stripped) as it tokenizes at the start of a text, and with a space before it (a word in the middle
        of a text) when that gives another first token and as many tokens (vLLM's rule); each sequence once."""
        sequences: list[tuple[int, ...]] = []
        with self.lock:  # (the tokenizer, shared with the server's model thread)
            for word in words:
                alone = tuple(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
                spaced = tuple(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
                if not alone:
                    raise Gemma3VLError(f"bad word {word!r} has no tokens")
                sequences.append(alone)
                if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
                    sequences.append(spaced)
        return tuple(dict.fromkeys(sequences))

    @property
    def json_grammar_stop_ids(self) -> list[int]:
        """The stop tokens JSON grammars end at (the checkpoint's EOS ids and ``<end_of_turn>``)."""
        return list(stop_token_ids(self.generation_defaults, self.config))

    def encode_conversation(self, turns: list[Turn], *, pan_and_scan: bool | None = None,
                            continue_final: bool = False, template_kwargs: Mapping[str, Any] | None = None,
                            processor_kwargs: Mapping[str, Any] | None = None) -> EncodedPrompt:
        with self.lock:
            return encode_conversation(self.processor, self.config, turns, pan_and_scan=pan_and_scan,
                                       continue_final=continue_final, template_kwargs=template_kwargs,
                                       processor_kwargs=processor_kwargs)

    def encode_prompt(self, prompt: str, images: list, *, raw: bool = False,
                      pan_and_scan: bool | None = None) -> EncodedPrompt:
        """One user prompt exactly as ``gemma3vl generate --prompt`` builds it (``--raw`` included)."""
        with self.lock:
            inputs = build_inputs(self.processor, self.config, prompt, images, raw=raw, pan_and_scan=pan_and_scan)
        return EncodedPrompt(input_ids=inputs["input_ids"][0], pixel_values=inputs.get("pixel_values"))

    def complete(self, rows: list[Row], sampling: Sampling, *, compile: bool = False, cache: Any = "static",
                 on_compile_failure: Callable[[str], None] | None = None) -> list[Completion]:
        return complete(self.model, self.tokenizer, rows, sampling, decode_lock=self.lock, compile=compile,
                        cache=cache, on_compile_failure=on_compile_failure)
