"""Per-prompt options beyond the messages: the chat template's own variables (vLLM's ``chat_template_kwargs``) and
the image processor's pan & scan settings (vLLM's ``mm_processor_kwargs``), each checked before any image is read.

A template variable is handed to the chat template only when the template reads it: a key it never names could not
change the prompt, and is left out (as vLLM leaves it out), where transformers would pass it on to the processor as
an image setting. Names the template receives from transformers or from the request itself (``messages``,
``add_generation_prompt``, the special tokens, ...) are refused: they are set by their own fields, never here.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.json_values import is_finite_number, is_int

# Names the chat template is given by transformers' renderer, or are its helpers, or control the encoding itself:
# never set through template variables. (The special tokens' names are added from the tokenizer.)
RENDERER_NAMES = frozenset({"messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                            "raise_exception", "strftime_now", "chat_template", "tokenize", "conversation"})
# vLLM's mm_processor_kwargs keys that Gemma 3's image processor takes, with their checks
PAN_AND_SCAN_OPTIONS = {
    "do_pan_and_scan": (lambda v: isinstance(v, bool), "a boolean"),
    "pan_and_scan_min_crop_size": (lambda v: is_int(v) and v >= 1, "an integer >= 1 (pixels)"),
    "pan_and_scan_max_num_crops": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "pan_and_scan_min_ratio_to_activate": (lambda v: is_finite_number(v) and v > 0, "a number > 0"),
}


class PromptOptionError(Gemma3VLError):
    """A template variable or processor setting that cannot be used; ``field`` names the request's field
    (``chat_template_kwargs`` or ``mm_processor_kwargs``)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def checked_template_kwargs(value: Any, where: str = "chat_template_kwargs") -> dict[str, Any]:
    """``chat_template_kwargs`` as given (an object of template variables; None: none), its names checked against
    the ones the renderer and the request set; the special tokens' names are checked with the checkpoint
    (:func:`template_inputs`)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PromptOptionError(f"{where} must be an object of chat template variables, got {type(value).__name__}",
                                where)
    for key in value:
        if not isinstance(key, str):
            raise PromptOptionError(f"{where}: the variable name {key!r} is not a string", where)
        if key in RENDERER_NAMES or key in _apply_chat_template_parameters():
            raise PromptOptionError(f"{where}.{key}: set by the request itself, not as a chat template variable"
                                    f"{_own_field(key)}", where)
    return dict(value)


def _own_field(key: str) -> str:
    fields = {"add_generation_prompt": "add_generation_prompt", "continue_final_message": "continue_final_message",
              "tools": "tools", "messages": "messages", "conversation": "messages"}
    return f" (use '{fields[key]}')" if key in fields else ""


@functools.lru_cache(maxsize=1)
def _apply_chat_template_parameters() -> frozenset[str]:
    """The named parameters of transformers' ``ProcessorMixin.apply_chat_template`` (``tokenize``, ``return_dict``,
    ``processor_kwargs``, ...): given as template variables, they would change the encoding, not the template."""
    try:
        from transformers import ProcessorMixin
    except ImportError:  # (transformers is a dependency; another version may not export it)
        return frozenset()
    parameters = inspect.signature(ProcessorMixin.apply_chat_template).parameters.values()
    return frozenset(p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self")


@functools.lru_cache(maxsize=16)
def template_variables(template: str) -> frozenset[str]:
    """The variables ``template`` reads from its caller (jinja's undeclared variables), parsed as transformers
    compiles chat templates (its extensions and globals)."""
    import jinja2.meta

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
        environment = _compile_jinja_template(template).environment
    except ImportError:  # another transformers: a plain environment (loop controls, as transformers enables them)
        environment = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(environment.parse(template)))
    except jinja2.TemplateError as exc:  # (load_processor compiled it already: only another transformers gets here)
        raise Gemma3VLError(f"the chat template cannot be read for its variables: {exc}") from None


def template_inputs(processor: Any, templates: list[str], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Of ``kwargs`` (checked by :func:`checked_template_kwargs`), the variables one of ``templates`` (the
    checkpoint's chat templates) reads; a special token's name (``bos_token``, ``image_token``, ...) is refused:
    the template gets it from the tokenizer."""
    if not kwargs:
        return {}
    tokenizer = getattr(processor, "tokenizer", processor)
    special = set(getattr(tokenizer, "special_tokens_map", None) or {})
    for key in kwargs:
        if key in special:
            raise PromptOptionError(f"chat_template_kwargs.{key}: the template gets the special token {key} from the "
                                    "tokenizer; it is not a variable to set", "chat_template_kwargs")
    read = frozenset().union(*(template_variables(template) for template in templates))
    return {key: value for key, value in kwargs.items() if key in read}


def checked_processor_kwargs(value: Any, where: str = "mm_processor_kwargs") -> dict[str, Any]:
    """vLLM's ``mm_processor_kwargs`` for Gemma 3: the image processor's pan & scan settings (``do_pan_and_scan``,
    ``pan_and_scan_min_crop_size``, ``pan_and_scan_max_num_crops``, ``pan_and_scan_min_ratio_to_activate``), each
    checked; any other key is refused by name (it would change the image's pixels or tokens in ways this server
    does not check)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PromptOptionError(f"{where} must be an object, got {type(value).__name__}", where)
    for key, given in value.items():
        if key not in PAN_AND_SCAN_OPTIONS:
            raise PromptOptionError(f"{where}.{key}: not a setting gemma3vl takes (Gemma 3's image processor "
                                    f"settings taken: {', '.join(PAN_AND_SCAN_OPTIONS)})", where)
        check, requirement = PAN_AND_SCAN_OPTIONS[key]
        if not check(given):
            raise PromptOptionError(f"{where}.{key} must be {requirement}, got {given!r}", where)
    return dict(value)
