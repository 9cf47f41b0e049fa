"""Chat messages in OpenAI's and transformers' form -> conversation turns with their images loaded.

What ``gemma3vl.Model.chat`` / ``stream`` and ``generate --batch``'s ``messages`` lines take: ``{"role": ...,
"content": "text" | [parts]}``, the parts ``{"type": "text", "text": ...}``, ``{"type": "image", "image": ...}``
(or ``"url"`` / ``"path"``, transformers' spellings) and OpenAI's ``{"type": "image_url", "image_url": {"url":
...}}``. An image is a PIL image, a file path or a ``data:image/...;base64,`` URL; web addresses are refused
(nothing is fetched from the network). Errors name the message and part (``messages[1].content[0].image``).
With tools (``Model.chat(..., tools=...)``), ``tool`` messages and an assistant message's ``tool_calls`` too, written
as plain turns by :func:`gemma3vl.infer.tool_calls.converse` (as the server and training data write them).
The server parses its requests itself (``openai_protocol``), answering with OpenAI's error objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.conversation import Turn
from gemma3vl.infer.prompt import check_image_file, data_url_bytes, decode_image, load_image
from gemma3vl.infer.tool_calls import Message, ToolUse, converse, involves_tools, parse_history_calls

# Message roles and the turn each is ("developer" is OpenAI's newer name for system, "model" Gemma's for assistant).
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "model": "assistant"}


def _placeholder() -> Image.Image:
    """What an image stands for when a conversation is only checked (``decode=False``)."""
    return Image.new("RGB", (1, 1))


def images_of(images: Any, name: str, base_dir: Path | None = None) -> list[Image.Image]:
    """A list of images (or one) as PIL images; ``name`` names them in errors (``images[1]``)."""
    if images is None:
        return []
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    if not isinstance(images, (list, tuple)):
        raise Gemma3VLError(f"{name} must be a list of images (paths, data: URLs or PIL images), got "
                            f"{type(images).__name__}")
    return [image_of(image, f"{name}[{index}]", base_dir) for index, image in enumerate(images)]


def image_of(image: Any, where: str, base_dir: Path | None = None, *, decode: bool = True) -> Image.Image:
    """A PIL image from a PIL image, a file path (relative to ``base_dir`` when given), or a
    ``data:image/...;base64,`` URL; ``where`` names it in errors. ``decode=False``: check only what can be checked
    without reading the picture (the file exists, the URL is valid base64) and give a 1x1 placeholder."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, Path) or (isinstance(image, str) and not image.lower().startswith(("data:", "http:",
                                                                                             "https:"))):
        if not str(image):
            raise Gemma3VLError(f"{where} is an empty path")
        path = Path(image) if base_dir is None else base_dir / image
        try:
            if decode:
                return load_image(path)
            check_image_file(path, str(image))
        except Gemma3VLError as exc:
            raise Gemma3VLError(f"{where}: {exc}") from None
        return _placeholder()
    if not isinstance(image, str):
        raise Gemma3VLError(f"{where} must be a path, a data: URL or a PIL image, got {type(image).__name__}")
    if not image.lower().startswith("data:"):
        raise Gemma3VLError(f"{where}: {image[:60]} is a web address; download the image and give its path "
                            "(gemma3vl fetches nothing from the network)")
    data = data_url_bytes(image, where)  # with decode=False too: bad base64 is found when the file is read
    return decode_image(data, where) if decode else _placeholder()


def turns_of_messages(messages: Any, base_dir: Path | None = None, *, decode: bool = True,
                      tools: ToolUse | None = None) -> list[Turn]:
    """OpenAI / transformers chat messages -> turns, images loaded in place (paths relative to ``base_dir``).
    ``decode=False`` checks the messages without decoding any image (each stands in as a 1x1 placeholder).
    ``tools`` (and any ``tool`` message or ``tool_calls``): written as plain turns (``tool_calls.converse``)."""
    if isinstance(messages, dict) or not isinstance(messages, (list, tuple)):
        raise Gemma3VLError("messages must be a list of {'role': ..., 'content': ...} objects")
    written = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise Gemma3VLError(f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES and role != "tool":
            raise Gemma3VLError(f"{where}.role must be one of {', '.join(ROLES)}, tool; got {role!r}")
        calls: tuple = ()
        if message.get("tool_calls") not in (None, []):
            if ROLES.get(role) != "assistant":
                raise Gemma3VLError(f"{where}.tool_calls: only assistant messages make calls")
            calls = parse_history_calls(message["tool_calls"], f"{where}.tool_calls", need_ids=False)
        content = message.get("content")
        if isinstance(content, str):
            parts: list[Any] = [content]
        elif content is None and calls:
            parts = []
        elif isinstance(content, (list, tuple)):
            parts = [_part(part, f"{where}.content[{i}]", base_dir, decode) for i, part in enumerate(content)]
        else:
            raise Gemma3VLError(f"{where}.content must be a string or a list of content parts")
        written.append(Message(ROLES.get(role, role), parts, calls, message.get("tool_call_id"), param=where))
    if not involves_tools(written, tools):
        return [Turn(m.role, m.parts) for m in written]
    # (positions change: each turn is named by the message it was written from)
    return [Turn(m.role, m.parts, label=m.param) for m in converse(written, tools)]


def _part(part: Any, where: str, base_dir: Path | None, decode: bool) -> str | Image.Image:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise Gemma3VLError(f"{where} must be an object with a 'type' (text, image or image_url)")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise Gemma3VLError(f"{where}.text must be a string")
        return part["text"]
    if kind == "image":
        given = [key for key in ("image", "url", "path") if part.get(key) is not None]
        if len(given) != 1:
            raise Gemma3VLError(f"{where}: an image part names its image with one of 'image', 'url' or 'path'")
        return image_of(part[given[0]], f"{where}.{given[0]}", base_dir, decode=decode)
    if kind == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url:
            raise Gemma3VLError(f"{where}.image_url.url must be a non-empty string")
        return image_of(url, f"{where}.image_url.url", base_dir, decode=decode)
    raise Gemma3VLError(f"{where}.type {kind!r} is not one of text, image, image_url")
