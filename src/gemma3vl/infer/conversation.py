"""A multi-turn conversation (system / user / assistant turns, images inside user turns) as model inputs.

``prompt.build_inputs`` covers one user turn; chat and the server need whole histories. Both go through the
checkpoint's own chat template via the processor (VL) or tokenizer (text-only), exactly as transformers'
``apply_chat_template`` does, so a history gives the token ids transformers gives for it. Images are PIL
images placed where they appear in the turn; the template marks each with ``<start_of_image>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.prompt import apply_chat_template, pan_and_scan_settings, tokenizer_of

ROLES = ("system", "user", "assistant")


@dataclass
class Turn:
    """One message: ``parts`` are strings (text) and PIL images, in order."""

    role: str
    parts: list[str | Image.Image] = field(default_factory=list)

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


def _template_message(turn: Turn, vision: bool) -> dict[str, Any]:
    if not vision:
        return {"role": turn.role, "content": turn.text}
    content: list[dict[str, Any]] = []
    for part in turn.parts:
        if isinstance(part, Image.Image):
            content.append({"type": "image", "image": part})
        else:
            content.append({"type": "text", "text": part})
    return {"role": turn.role, "content": content}


def check_turns(turns: list[Turn], config: Gemma3Config, boi_token: str = "<start_of_image>") -> None:
    """Refuse what the template would turn into a wrong prompt, with a message saying which turn."""
    if not turns:
        raise Gemma3VLError("the conversation is empty")
    for index, turn in enumerate(turns):
        if turn.role not in ROLES:
            raise Gemma3VLError(f"message {index}: role {turn.role!r} is not one of {', '.join(ROLES)}")
        if turn.images and not config.is_vision_language:
            raise Gemma3VLError("this is a text-only Gemma 3 checkpoint: it cannot take images")
        if turn.images and turn.role != "user":
            raise Gemma3VLError(f"message {index}: images can only be in user messages, not {turn.role!r} ones")
        if boi_token in turn.text:
            raise Gemma3VLError(
                f"message {index}: the text contains {boi_token}; images are attached as images, not placeholders"
            )
        if turn.role == "system" and index != 0:
            raise Gemma3VLError(f"message {index}: a system message can only come first")
    if turns[-1].role != "user":
        raise Gemma3VLError("the last message must be a user message (the model answers it)")


def encode_conversation(
    processor: Any, config: Gemma3Config, turns: list[Turn], *, pan_and_scan: bool | None = None
) -> EncodedPrompt:
    """Token ids (and pixel values) of ``turns`` through the chat template, ending with the model's turn."""
    tokenizer = tokenizer_of(processor)
    check_turns(turns, config, getattr(tokenizer, "boi_token", None) or "<start_of_image>")
    has_images = any(turn.images for turn in turns)
    image_kwargs = pan_and_scan_settings(processor, pan_and_scan) if has_images else {}
    messages = [_template_message(turn, config.is_vision_language) for turn in turns]
    try:
        encoded = apply_chat_template(processor, messages, image_kwargs,
                                      no_template="the checkpoint has no chat template, so it cannot hold a "
                                                  "conversation")
    except Gemma3VLError:
        raise
    except Exception as exc:  # jinja's TemplateError (roles must alternate), processor errors
        raise Gemma3VLError(f"the chat template refused the conversation: {exc}") from None
    pixel_values = encoded.get("pixel_values") if has_images else None
    return EncodedPrompt(input_ids=encoded["input_ids"][0], pixel_values=pixel_values)
