"""Sampling settings from the checkpoint's ``generation_config.json`` plus what the user asked for.

One rule for every front-end (``generate``, ``generate --batch``, ``chat``, ``serve``): the checkpoint's
generation config gives the defaults (hub Gemma 3: sampling with top-k 64, top-p 0.95); an explicit
temperature, top-k or top-p turns sampling on; temperature 0 or ``greedy`` means argmax. The stop token ids
are the union of the generation config's ``eos_token_id`` and the model config's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.generate import Sampling
from gemma3vl.infer.prompt import processor_dir
from gemma3vl.infer.sampling import logit_bias_entries


def read_generation_defaults(model_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's ``generation_config.json`` as a dict ({} when there is none)."""
    generation_file = processor_dir(model_dir) / "generation_config.json"
    if not generation_file.is_file():
        return {}
    try:
        defaults = json.loads(generation_file.read_text())
    except json.JSONDecodeError as exc:
        raise Gemma3VLError(f"{generation_file}: not valid JSON ({exc})") from None
    if not isinstance(defaults, dict):
        raise Gemma3VLError(f"{generation_file}: expected a JSON object")
    return defaults


def stop_token_ids(defaults: dict[str, Any], config: Gemma3Config) -> tuple[int, ...]:
    """The ids that end an answer: the generation config's ``eos_token_id`` and the model config's, sorted."""
    stop = defaults.get("eos_token_id")
    if stop is None:
        stop = list(config.stop_token_ids)
    stop_ids = tuple(stop) if isinstance(stop, list) else (stop,)
    return tuple(sorted(set(stop_ids) | set(config.stop_token_ids)))


def resolve_sampling(
    defaults: dict[str, Any],
    config: Gemma3Config,
    *,
    max_new_tokens: int,
    greedy: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    logit_bias: Mapping[Any, Any] | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    min_new_tokens: int | None = None,
) -> Sampling:
    """A :class:`Sampling` from the generation-config ``defaults`` and explicit settings (None: not given).

    As transformers' ``generate``: a generation-config value that is absent or ``null`` takes transformers' global
    default (temperature 1.0, top-k 50, top-p 1.0), so sampling from a checkpoint whose config names no top-k still
    keeps the 50 most likely tokens, as it would there; its ``min_p`` too. The generation config's
    ``repetition_penalty`` applies unless ``repetition_penalty`` is given, greedy or not, as it does in
    transformers. The presence and frequency penalties (OpenAI's; transformers' generation config has none) are
    off unless given, and do not turn sampling on: they apply to greedy decoding too; so does ``logit_bias``
    (OpenAI's {token id: bias}, checked against the vocabulary here). ``min_new_tokens`` (vLLM's ``min_tokens``)
    replaces the generation config's, which transformers reads too."""
    stop_ids = stop_token_ids(defaults, config)
    sample = bool(defaults.get("do_sample", False)) and not greedy
    if temperature is not None or top_k is not None or top_p is not None or min_p is not None:
        sample = not greedy
    if temperature == 0:
        sample = False
    return Sampling(
        max_new_tokens=max_new_tokens,
        greedy=not sample,
        temperature=temperature if temperature is not None else _default(defaults, "temperature", float),
        top_k=top_k if top_k is not None else _default(defaults, "top_k", int),
        top_p=top_p if top_p is not None else _default(defaults, "top_p", float),
        min_p=min_p if min_p is not None else _default(defaults, "min_p", float),
        seed=seed,
        stop_token_ids=stop_ids,
        pad_token_id=config.text.pad_token_id,
        # transformers applies the generation config's repetition penalty to greedy and sampled decoding alike
        repetition_penalty=(repetition_penalty if repetition_penalty is not None
                            else _default(defaults, "repetition_penalty", float)),
        presence_penalty=presence_penalty or 0.0,
        frequency_penalty=frequency_penalty or 0.0,
        logit_bias=logit_bias_entries(logit_bias, config.text.vocab_size),
        # (transformers adds no MinNewTokensLengthLogitsProcessor for a value <= 0)
        min_new_tokens=(min_new_tokens if min_new_tokens is not None
                        else max(0, _default(defaults, "min_new_tokens", int))),
    )


# transformers' GenerationConfig._get_default_generation_params: what generate uses for a value left unset
TRANSFORMERS_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "repetition_penalty": 1.0,
                         "min_new_tokens": 0}


def _default(defaults: dict[str, Any], key: str, kind: type) -> Any:
    """The generation config's ``key`` (absent or null: transformers' global default), checked to be a number."""
    value = defaults.get(key)
    if value is None:
        return TRANSFORMERS_DEFAULTS[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise Gemma3VLError(f"the checkpoint's generation_config.json: {key}={value!r} is not a number")
    if key == "top_k" and value == 0:
        return None  # transformers: top_k=0 adds no top-k filter
    return kind(value)
