"""A multi-turn conversation (system / user / assistant turns, images inside user turns) as model inputs.

``prompt.build_inputs`` covers one user turn; chat and the server need whole histories. Both go through the
checkpoint's own chat template via the processor (VL) or tokenizer (text-only), exactly as transformers'
``apply_chat_template`` does, so a history gives the token ids transformers gives for it. Images are PIL
images placed where they appear in the turn; the template marks each with ``<start_of_image>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from PIL import Image

from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.prompt import apply_chat_template, pan_and_scan_settings, template_text, tokenizer_of

ROLES = ("system", "user", "assistant")


@dataclass
class Turn:
    """One message: ``parts`` are strings (text) and PIL images, in order."""

    role: str
    parts: list[str | Image.Image] = field(default_factory=list)
    # what errors call it (None: "message <index>"); a conversation with tools names the request's message a turn
    # was written from (``tool_calls.converse`` adds and merges turns, so positions no longer match)
    label: str | None = None

    @property
    def images(self) -> list[Image.Image]:
        return [part for part in self.parts if isinstance(part, Image.Image)]

    @property
    def text(self) -> str:
        return "".join(part for part in self.parts if isinstance(part, str))


@dataclass
class EncodedPrompt:
    """One prompt ready for ``generate``: ids [L] and the pixel values of its images ([N, 3, H, W] or None)."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def _template_message(turn: Turn) -> dict[str, Any]:
    """The turn in transformers' list form, for VL and text-only checkpoints alike (the template trims each text
    part and concatenates them, so a text-only turn must not be pre-joined into one string: " a", "b " -> "ab")."""
    if turn.role == "system" and len(turn.parts) != 1:
        # Gemma's template renders only ``content[0]['text']`` of a list-form system message, silently dropping
        # the rest (an OpenAI client may send several text parts); the joined text is rendered whole. It goes
        # as one text part, which the template renders exactly as the string: transformers' processor (5.24)
        # swaps an empty string content for [], on which the template fails (content[0]), as it does on no parts.
        return {"role": turn.role, "content": [{"type": "text", "text": turn.text}]}
    content: list[dict[str, Any]] = []
    for part in turn.parts:
        if isinstance(part, Image.Image):
            content.append({"type": "image", "image": part})
        else:
            content.append({"type": "text", "text": part})
    return {"role": turn.role, "content": content}


def rendered_text(turn: Turn) -> str:
    """The turn's text as the chat template writes it (:func:`template_text`); a system message as it is, its parts
    joined (see _template_message)."""
    return turn.text if turn.role == "system" else template_text(turn.parts)


def check_turns(turns: list[Turn], config: Gemma3Config, boi_token: str = "<start_of_image>",
                image_token: str | None = "<image_soft_token>", continue_final: bool = False) -> None:
    """Refuse what the template would turn into a wrong prompt, with a message saying which turn. The last turn is
    the user's (the model answers it), or with ``continue_final`` an assistant one with text (the model goes on
    with it)."""
    if not turns:
        raise Gemma3VLError("the conversation is empty")
    # Typed as text, <image_soft_token> becomes an image slot with no image behind it: the model's forward
    # then fails on a soft-token count mismatch (transformers' too), far from the message that caused it.
    reserved = [boi_token] + ([image_token] if image_token and config.is_vision_language else [])
    def name(index: int) -> str:
        return turns[index].label or f"message {index}"

    for index, turn in enumerate(turns):
        if turn.role not in ROLES:
            raise Gemma3VLError(f"{name(index)}: role {turn.role!r} is not one of {', '.join(ROLES)}")
        if turn.images and not config.is_vision_language:
            raise Gemma3VLError("this is a text-only Gemma 3 checkpoint: it cannot take images")
        if turn.images and turn.role != "user":
            raise Gemma3VLError(f"{name(index)}: images can only be in user messages, not {turn.role!r} ones")
        text = rendered_text(turn)
        found = [token for token in reserved if token in turn.text or token in text]
        if found:
            raise Gemma3VLError(
                f"{name(index)}: the text contains {', '.join(found)}; images are attached as images, not "
                "placeholders"
            )
        if turn.role == "system" and index != 0:
            raise Gemma3VLError(f"{name(index)}: a system message can only come first")
    # The template's own rule, checked here to name the message: after an optional system message, user and
    # assistant messages alternate, starting with a user one.
    first = 1 if turns[0].role == "system" else 0
    for index in range(first, len(turns)):
        expected = "user" if (index - first) % 2 == 0 else "assistant"
        if turns[index].role != expected:
            raise Gemma3VLError(
                f"{name(index)}: expected {'an' if expected == 'assistant' else 'a'} {expected} message, got a "
                f"{turns[index].role!r} one (after an optional system message, user and assistant messages must "
                "alternate, starting with user)"
            )
    if continue_final:
        if turns[-1].role != "assistant" or not turns[-1].text.strip():
            raise Gemma3VLError("to continue the final message, the last message must be an assistant message with "
                                "text (the model goes on with it)")
    elif turns[-1].role != "user":
        raise Gemma3VLError("the last message must be a user message (the model answers it)")


def encode_conversation(
    processor: Any, config: Gemma3Config, turns: list[Turn], *, pan_and_scan: bool | None = None,
    continue_final: bool = False, template_kwargs: Mapping[str, Any] | None = None,
    processor_kwargs: Mapping[str, Any] | None = None,
) -> EncodedPrompt:
    """Token ids (and pixel values) of ``turns`` through the chat template, ending with the model's turn; with
    ``continue_final`` (transformers' ``continue_final_message``), inside the last, assistant, turn: its text left
    open for the model to continue. ``template_kwargs``: the template's own variables (vLLM's
    ``chat_template_kwargs``); ``processor_kwargs``: this prompt's pan & scan settings (vLLM's
    ``mm_processor_kwargs``, :func:`prompt.pan_and_scan_settings`), checked even without images."""
    tokenizer = tokenizer_of(processor)
    check_turns(turns, config, getattr(tokenizer, "boi_token", None) or "<start_of_image>",
                getattr(tokenizer, "image_token", None) or "<image_soft_token>", continue_final)
    has_images = any(turn.images for turn in turns)
    image_kwargs = pan_and_scan_settings(processor, pan_and_scan, processor_kwargs)
    image_kwargs = image_kwargs if has_images else {}
    messages = [_template_message(turn) for turn in turns]  # text-only: check_turns refused images
    try:
        encoded = apply_chat_template(processor, messages, image_kwargs,
                                      no_template="the checkpoint has no chat template, so it cannot hold a "
                                                  "conversation", continue_final=continue_final,
                                      template_kwargs=template_kwargs)
    except Gemma3VLError:
        raise
    except Exception as exc:  # jinja's TemplateError (roles must alternate), processor errors
        raise Gemma3VLError(f"the chat template refused the conversation: {exc}") from None
    pixel_values = encoded.get("pixel_values") if has_images else None
    return EncodedPrompt(input_ids=encoded["input_ids"][0], pixel_values=pixel_values)
