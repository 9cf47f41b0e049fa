"""Turning a prompt and image files into model inputs, exactly as transformers' processor does.

The tokenizer, chat template and image processor are the checkpoint's own, loaded with transformers
(``AutoProcessor`` for VL checkpoints, ``AutoTokenizer`` for text-only ones), so the token ids are the ones
transformers produces for the same directory.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.prompt_options import PromptOptionError, template_inputs

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # refuses decompression bombs long before memory runs out


def not_text_at(text: str) -> int | None:
    """Where ``text`` stops being UTF-8 text (a lone surrogate: an undecodable byte of the command line or of
    standard input, which Python keeps as U+DC80..U+DCFF, or a JSON ``\\ud800`` escape), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_at(value: Any) -> tuple[str, str] | None:
    """The first lone surrogate (JSON's ``"\\ud800"``, which Python's ``json`` reads as a string that is not
    Unicode text) in the strings of ``value`` (keys included), as (where, the surrogate): ``where`` the path of its
    string, ``messages[0].content[1].text`` ("" for ``value`` itself), or of the object whose key holds it.
    Iterative: JSON may nest as deeply as ``json.loads`` allows; a regular expression scans each string (a request
    may hold megabytes of base64)."""
    pending: list[tuple[Any, str]] = [(value, "")]
    while pending:
        item, where = pending.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found is not None:
                return where, found.group()
        elif isinstance(item, dict):
            for key, inner in reversed(item.items()):
                found = _SURROGATE.search(key) if isinstance(key, str) else None
                if found is not None:
                    return where, found.group()
                pending.append((inner, f"{where}.{key}" if where else str(key)))
        elif isinstance(item, list):
            pending += [(inner, f"{where}[{index}]") for index, inner in reversed(list(enumerate(item)))]
    return None


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (transformers' validation errors span several), for an ``error:`` line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def unreadable(exc: Exception) -> str:
    """Why Pillow could not read an image, for an error message: its own words without the address of the
    in-memory file it was given (``cannot identify image file <_io.BytesIO object at 0x7f...>``)."""
    return re.sub(r" <_io\.\w+ object at 0x[0-9a-fA-F]+>", "", str(exc)).strip() or type(exc).__name__


def processor_dir(model_dir: str | Path) -> Path:
    """Where the tokenizer/processor files are: the HF directory itself, or ``hf/`` inside a native one."""
    model_dir = Path(model_dir)
    side = model_dir / "hf"
    return side if (model_dir / "gemma3vl.json").is_file() and side.is_dir() else model_dir


def _load_processor(model_dir: str | Path, config: Gemma3Config) -> Any:
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
        raise Gemma3VLError(f"{where}: cannot load the tokenizer/processor: {one_line(exc)}") from None


def load_processor(model_dir: str | Path, config: Gemma3Config) -> Any:
    """The checkpoint's own processor (VL) or tokenizer (text-only), offline, checked: a chat template that is not
    valid Jinja, or an image processor that cannot make the pictures the vision tower takes (``size``, ``image_mean``
    ... of ``preprocessor_config.json``), is an error naming the file now, before any prompt, record or request
    (otherwise a traceback from inside transformers at the first one, or a shape error in the forward)."""
    processor = _load_processor(model_dir, config)
    where = processor_dir(model_dir)
    check_chat_template(processor, where)
    if config.is_vision_language:
        check_image_processor(processor, where, config)
    return processor


def chat_template_source(where: Path) -> Path:
    """The file the checkpoint's chat template comes from, for error messages (the directory if none is found)."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if (where / name).is_file():
            return where / name
    for name in ("processor_config.json", "tokenizer_config.json"):
        try:
            if "chat_template" in json.loads((where / name).read_text(encoding="utf-8")):
                return where / name
        except (OSError, ValueError, TypeError):
            continue
    return where


def _templates(processor: Any) -> list[str]:
    found = []
    for owner in (processor, tokenizer_of(processor)):
        template = getattr(owner, "chat_template", None)
        for text in (template.values() if isinstance(template, dict) else [template]):
            if isinstance(text, str) and text and text not in found:
                found.append(text)
    return found


def check_chat_template(processor: Any, where: Path) -> None:
    """A chat template that does not compile is an error naming its file and line (jinja would otherwise raise
    at the first prompt, deep inside transformers)."""
    try:
        import jinja2
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # another transformers: the first prompt reports it
        return
    for template in _templates(processor):
        try:
            _compile_jinja_template(template)
        except jinja2.TemplateSyntaxError as exc:
            raise Gemma3VLError(f"{chat_template_source(where)}: the chat template is not valid Jinja (line "
                                f"{exc.lineno} of the template: {exc.message})") from None
        except Exception:  # noqa: BLE001 - anything else: the first prompt says it, through apply_chat_template
            return


def check_image_processor(processor: Any, where: Path, config: Gemma3Config) -> None:
    """Run the image processor on a tiny picture: its settings must give finite pixels of the size the vision
    tower takes (``vision_config.image_size``)."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or config.vision is None:
        return
    source = where / "preprocessor_config.json"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = image_processor(images=[Image.new("RGB", (2, 2), (128, 128, 128))], return_tensors="pt",
                                     do_pan_and_scan=False)["pixel_values"]
    except Exception as exc:  # noqa: BLE001 - transformers and PIL raise many types for odd settings
        raise Gemma3VLError(f"{source}: the image processor cannot prepare an image with these settings "
                            f"({type(exc).__name__}: {one_line(exc)})") from None
    size = int(config.vision.image_size)
    if tuple(pixels.shape[-2:]) != (size, size):
        raise Gemma3VLError(f"{source}: the image processor makes {pixels.shape[-2]}x{pixels.shape[-1]} pixel images "
                            f"(its 'size'), but the vision tower takes {size}x{size} (vision_config.image_size in "
                            f"config.json)")
    if not torch.isfinite(pixels).all():
        raise Gemma3VLError(f"{source}: the image processor's settings give non-finite pixel values (an "
                            f"'image_std' of 0?)")


def check_image_file(path: Path, label: str | None = None) -> None:
    """``path`` names an existing image file: not a directory, not a path the filesystem refuses (too long, a NUL
    byte), not missing; each a one-line error (``label``: how the user wrote the path, for the unusable one)."""
    try:
        if path.is_dir():
            raise Gemma3VLError(f"{path}: a directory, not an image file")
        found = path.is_file()
    except (OSError, ValueError) as exc:  # a name too long for the filesystem, a NUL byte
        raise Gemma3VLError(f"image {(label or str(path))[:200]!r}: not a usable path "
                            f"({getattr(exc, 'strerror', None) or exc})") from None
    if not found:
        raise Gemma3VLError(f"{path}: no such image file")


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image file fully (so a truncated file fails here, with its name), refusing huge ones."""
    path = Path(path)
    check_image_file(path)
    return decode_image(path, str(path), max_pixels)


class ImageTooLarge(Gemma3VLError):
    """An image over a size limit, pixels or bytes (the server answers it with 413, a dataset with a bad record)."""


def data_url_bytes(url: str, label: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a ``data:[<type>];base64,<payload>`` URL (whitespace in the payload ignored); one error naming
    ``label`` for another form or bad base64, :class:`ImageTooLarge` over ``max_bytes`` (told from the payload's
    length before decoding it). The one parser for data: URLs in prompts, requests and datasets."""
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise Gemma3VLError(f"{label}: expected a base64 data URL (data:image/png;base64,...)")
    payload = "".join(payload.split())
    if max_bytes is not None and len(payload) // 4 * 3 - 2 > max_bytes:  # the decoded size, before decoding
        raise ImageTooLarge(f"{label}: the image is {len(payload) // 4 * 3} bytes, over the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise Gemma3VLError(f"{label}: the data URL is not valid base64") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLarge(f"{label}: the image is {len(data)} bytes, over the limit of {max_bytes} bytes")
    return data


def check_pixels(size: tuple[int, int], label: str, max_pixels: int) -> None:
    """:class:`ImageTooLarge` naming ``label`` for an image of ``size`` (width, height) over ``max_pixels``."""
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLarge(f"{label}: {width}x{height} = {width * height} pixels is over the limit of {max_pixels}")


def decode_image(source: Path | bytes, label: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An image file's or an encoded image's (``bytes``) pixels, upright (EXIF orientation applied, as transformers'
    ``load_image`` does); one error naming ``label`` for an image over ``max_pixels`` (:class:`ImageTooLarge`, told
    from the header, before the pixels are decompressed) or one that cannot be decoded. The one decoder for every
    image source: files, data: URLs and downloads in prompts, requests and datasets."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as probe:
            check_pixels(probe.size, label, max_pixels)
            probe.load()
            image = probe.copy()
    except Gemma3VLError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS), met at open
        # before our check could read the size: the same error as ours, with the count Pillow gives
        counted = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(counted.group(1))} pixels" if counted else "the image"
        raise ImageTooLarge(f"{label}: {size} is over the limit of {max_pixels}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise Gemma3VLError(f"{label}: not a readable image ({unreadable(exc)})") from None
    return upright(image, label)


def template_text(parts: list[Any]) -> str:
    """A turn's list content as Gemma's chat template writes it: each text part trimmed, parts concatenated, any
    other part (an image: ``<start_of_image>``, which splits the tokenizer's input) as a NUL that no token spans.
    A control token's string split over two parts (``"<start_of_"``, ``"image>"``) appears here whole, as the
    tokenizer will see it."""
    return "".join(part.strip() if isinstance(part, str) else "\0" for part in parts)


def apply_chat_template(processor: Any, messages: list[dict[str, Any]], image_kwargs: dict[str, Any], *,
                        no_template: str, continue_final: bool = False,
                        template_kwargs: Mapping[str, Any] | None = None) -> Any:
    """``messages`` through the checkpoint's chat template, ending with the model's turn (ids, mask and pixel
    values as tensors); ``no_template`` is the error when the checkpoint has none. ``continue_final``:
    transformers' ``continue_final_message``, the last (assistant) message left open for the model to continue,
    with no generation prompt after it. ``template_kwargs``: the template's own variables (vLLM's
    ``chat_template_kwargs``), those it reads (:func:`prompt_options.template_inputs`)."""
    templates = _templates(processor)
    if not templates:  # none, or an empty chat_template.jinja
        raise Gemma3VLError(no_template)
    variables = template_inputs(processor, templates, template_kwargs or {})
    try:
        return processor.apply_chat_template(
            messages, add_generation_prompt=not continue_final, continue_final_message=continue_final,
            tokenize=True, return_dict=True, return_tensors="pt",
            **({"processor_kwargs": image_kwargs} if image_kwargs else {}), **variables,
        )
    except Exception as exc:  # noqa: BLE001 - jinja's TemplateError (raise_exception, an undefined value), or
        # the processor's own errors: the file and the reason, not a traceback from inside transformers
        raise Gemma3VLError(_processor_failure(exc)) from None


def _processor_failure(exc: Exception) -> str:
    """Why the template or processor refused a prompt, on one line. No file path: the server sends this to its
    clients (a template that does not even compile is refused by name when the checkpoint loads)."""
    import jinja2

    if isinstance(exc, jinja2.TemplateError):
        return f"the chat template refused the conversation: {one_line(exc)}"
    return f"the processor cannot encode the prompt ({type(exc).__name__}: {one_line(exc)})"


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


def pan_and_scan_settings(processor: Any, requested: bool | None,
                          options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Pan & scan keyword arguments for the processor call.

    ``Gemma3Processor`` passes its own defaults on every call, so settings written in
    ``preprocessor_config.json`` would be ignored; we read them from the image processor and pass them
    explicitly. Pan & scan is on when requested, or when the config enables it and it was not refused.
    ``options``: one prompt's own settings (vLLM's ``mm_processor_kwargs``, checked by
    ``prompt_options.checked_processor_kwargs``): ``do_pan_and_scan`` overrides ``requested``, the
    ``pan_and_scan_*`` values the config's; given while pan & scan stays off, they are an error (they would do
    nothing).
    """
    options = dict(options or {})
    if "do_pan_and_scan" in options:
        requested = options.pop("do_pan_and_scan")
    image_processor = getattr(processor, "image_processor", None)
    enabled = bool(getattr(image_processor, "do_pan_and_scan", False)) if requested is None else requested
    if not enabled:
        if options:
            raise PromptOptionError(f"mm_processor_kwargs: {', '.join(options)}: pan and scan is off for this "
                                    f"prompt, so {'it does' if len(options) == 1 else 'they do'} nothing (add "
                                    "do_pan_and_scan: true)", "mm_processor_kwargs")
        return {}
    settings: dict[str, Any] = {"do_pan_and_scan": True}
    for key in PAN_AND_SCAN_KEYS:
        value = getattr(image_processor, key, None)
        if value is not None:
            settings[key] = value
    settings.update(options)
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
    bad = not_text_at(prompt)
    if bad is not None:  # (the tokenizer refuses such a string with a TypeError that names nothing)
        char = prompt[bad]
        what = f"byte 0x{ord(char) - 0xDC00:02x}" if "\udc80" <= char <= "\udcff" else f"lone surrogate U+{ord(char):04X}"
        raise Gemma3VLError(f"the prompt is not UTF-8 text ({what} at character {bad + 1}); give it in UTF-8")
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
        try:
            if not config.is_vision_language:
                encoded = tokenizer(prompt, return_tensors="pt", **special)
            else:
                encoded = processor(text=[prompt], images=[images] if images else None, return_tensors="pt",
                                    **image_kwargs, **special)
        except Exception as exc:  # noqa: BLE001 - the processor's errors, named (see apply_chat_template)
            raise Gemma3VLError(_processor_failure(exc)) from None
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
