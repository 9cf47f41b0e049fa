"""Turning a prompt and image files into model inputs, exactly as transformers' processor does.

The tokenizer, chat template and image processor are the checkpoint's own, loaded with transformers
(``AutoProcessor`` for VL checkpoints, ``AutoTokenizer`` for text-only ones), so the token ids are the ones
transformers produces for the same directory.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # refuses decompression bombs long before memory runs out


def unreadable(exc: Exception) -> str:
    """Why Pillow could not read an image, for an error message: its own words without the address of the
    in-memory file it was given (``cannot identify image file <_io.BytesIO object at 0x7f...>``)."""
    return re.sub(r" <_io\.\w+ object at 0x[0-9a-fA-F]+>", "", str(exc)).strip() or type(exc).__name__


def processor_dir(model_dir: str | Path) -> Path:
    """Where the tokenizer/processor files are: the HF directory itself, or ``hf/`` inside a native one."""
    model_dir = Path(model_dir)
    side = model_dir / "hf"
    return side if (model_dir / "gemma3vl.json").is_file() and side.is_dir() else model_dir


def load_processor(model_dir: str | Path, config: Gemma3Config) -> Any:
    """The checkpoint's own processor (VL) or tokenizer (text-only), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoProcessor, AutoTokenizer

    where = processor_dir(model_dir)
    if not any(where.glob("tokenizer*")):
        raise Gemma3VLError(f"{where}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if config.is_vision_language:
                return AutoProcessor.from_pretrained(str(where))
            return AutoTokenizer.from_pretrained(str(where))
    except Exception as exc:  # transformers raises many types; the user needs the file and the reason
        raise Gemma3VLError(f"{where}: cannot load the tokenizer/processor: {exc}") from None


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image file fully (so a truncated file fails here, with its name), refusing huge ones."""
    path = Path(path)
    if not path.is_file():
        raise Gemma3VLError(f"{path}: no such image file")
    try:
        with Image.open(path) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise Gemma3VLError(
                    f"{path}: {width}x{height} = {width * height} pixels is over the limit of {max_pixels}"
                )
            probe.load()
            image = probe.copy()
    except Gemma3VLError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise Gemma3VLError(f"{path}: not a readable image ({unreadable(exc)})") from None
    return upright(image, str(path))


def template_text(parts: list[Any]) -> str:
    """A turn's list content as Gemma's chat template writes it: each text part trimmed, parts concatenated, any
    other part (an image: ``<start_of_image>``, which splits the tokenizer's input) as a NUL that no token spans.
    A control token's string split over two parts (``"<start_of_"``, ``"image>"``) appears here whole, as the
    tokenizer will see it."""
    return "".join(part.strip() if isinstance(part, str) else "\0" for part in parts)


def apply_chat_template(processor: Any, messages: list[dict[str, Any]], image_kwargs: dict[str, Any], *,
                        no_template: str) -> Any:
    """``messages`` through the checkpoint's chat template, ending with the model's turn (ids, mask and pixel
    values as tensors); ``no_template`` is the error when the checkpoint has none."""
    tokenizer = tokenizer_of(processor)
    if getattr(processor, "chat_template", None) is None and getattr(tokenizer, "chat_template", None) is None:
        raise Gemma3VLError(no_template)
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        **({"processor_kwargs": image_kwargs} if image_kwargs else {}),
    )


def upright(image: Image.Image, label: str) -> Image.Image:
    """``image`` turned by its EXIF orientation tag, in place (it is a decoded copy), as transformers'
    ``load_image`` does for every source; a corrupt EXIF block is an error naming ``label``."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # noqa: BLE001 - PIL's EXIF reader and writer raise many types on a corrupt block
        # (a fuzz test found struct.error from rewriting a tag whose type byte was changed)
        raise Gemma3VLError(f"{label}: corrupt EXIF block ({type(exc).__name__}: {exc})") from None
    return image


PAN_AND_SCAN_KEYS = (
    "pan_and_scan_min_crop_size",
    "pan_and_scan_max_num_crops",
    "pan_and_scan_min_ratio_to_activate",
)


def pan_and_scan_settings(processor: Any, requested: bool | None) -> dict[str, Any]:
    """Pan & scan keyword arguments for the processor call.

    ``Gemma3Processor`` passes its own defaults on every call, so settings written in
    ``preprocessor_config.json`` would be ignored; we read them from the image processor and pass them
    explicitly. Pan & scan is on when requested, or when the config enables it and it was not refused.
    """
    image_processor = getattr(processor, "image_processor", None)
    enabled = bool(getattr(image_processor, "do_pan_and_scan", False)) if requested is None else requested
    if not enabled:
        return {}
    settings: dict[str, Any] = {"do_pan_and_scan": True}
    for key in PAN_AND_SCAN_KEYS:
        value = getattr(image_processor, key, None)
        if value is not None:
            settings[key] = value
    return settings


def tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def build_inputs(
    processor: Any,
    config: Gemma3Config,
    prompt: str,
    images: list[Image.Image],
    *,
    raw: bool = False,
    pan_and_scan: bool | None = None,
) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask (and pixel_values) for one prompt.

    Chat mode wraps the prompt in one user turn with the images first, then asks for the model's turn.
    Raw mode tokenises the prompt as it is (base models); images then need one ``<start_of_image>``
    placeholder each in the text.
    """
    tokenizer = tokenizer_of(processor)
    if images and not config.is_vision_language:
        raise Gemma3VLError("this is a text-only Gemma 3 checkpoint: it cannot take --image")
    image_kwargs = pan_and_scan_settings(processor, pan_and_scan) if images else {}
    boi = getattr(tokenizer, "boi_token", None) or "<start_of_image>"
    placeholders = prompt.count(boi)
    soft = getattr(tokenizer, "image_token", None) or "<image_soft_token>"
    if config.is_vision_language and soft in prompt:
        # It would become an image slot with no image behind it; the forward pass then fails on a soft-token
        # count mismatch (transformers' too), far from the prompt that caused it.
        raise Gemma3VLError(
            f"the prompt contains {soft} as text; it is the slot of one image patch token, written by the "
            f"processor, not by hand (place images with --image{' and ' + boi if raw else ''})"
        )
    if raw:
        if placeholders != len(images):
            raise Gemma3VLError(
                f"the prompt has {placeholders} {boi} placeholder(s) but {len(images)} image(s) were given "
                "(with --raw, put one placeholder in the prompt per image)"
            )
        # A raw prompt that already starts with <bos> (a chat-formatted prompt pasted as it is) gets no second
        # one: transformers' own apply_chat_template does the same when its rendered prompt starts with <bos>;
        # the model never saw a doubled <bos> in training.
        bos = getattr(tokenizer, "bos_token", None)
        special = {"add_special_tokens": False} if bos and prompt.startswith(bos) else {}
        if not config.is_vision_language:
            encoded = tokenizer(prompt, return_tensors="pt", **special)
        else:
            encoded = processor(text=[prompt], images=[images] if images else None, return_tensors="pt",
                                **image_kwargs, **special)
    else:
        if placeholders:
            raise Gemma3VLError(
                f"the prompt contains {placeholders} {boi} placeholder(s); in chat mode images are placed by "
                "--image and the prompt must not contain placeholders (or use --raw)"
            )
        content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content if config.is_vision_language else prompt}]
        encoded = apply_chat_template(processor, messages, image_kwargs,
                                      no_template="the checkpoint has no chat template; use --raw to feed the "
                                                  "prompt as it is")
    out = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if images:
        out["pixel_values"] = encoded["pixel_values"]
    return out
