"""Shared helpers for the data tests (no tests here): the tiny processor, pictures and record files.

The oracle throughout is transformers' own ``Gemma3Processor`` (``AutoProcessor``) loaded from the tiny
tokenizer/processor files, called on hand-written messages whose images are opened with plain PIL.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gemma3vl.pictures import draw_picture
from gemma3vl.tiny import tiny_hf_config
from gemma3vl.tiny_tokenizer import write_tokenizer_and_processor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PICTURES = {"a.png": "red circle", "b.png": "blue square", "c.png": "green triangle"}


def load_tiny_processor(directory: Path, *, text_only: bool = False, pan_and_scan: bool = False) -> Any:
    from transformers import AutoProcessor, AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    write_tokenizer_and_processor(directory, tiny_hf_config(text_only=text_only), pan_and_scan=pan_and_scan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if text_only:
            return AutoTokenizer.from_pretrained(str(directory))
        return AutoProcessor.from_pretrained(str(directory))


@pytest.fixture(scope="session")
def processor(tmp_path_factory) -> Any:
    return load_tiny_processor(tmp_path_factory.mktemp("tiny-processor"))


@pytest.fixture(scope="session")
def text_tokenizer(tmp_path_factory) -> Any:
    return load_tiny_processor(tmp_path_factory.mktemp("tiny-tokenizer"), text_only=True)


def write_pictures(directory: Path) -> None:
    """a.png, b.png (96x64) and c.png (wide, 150x40: pan & scan crops it)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, kind in PICTURES.items():
        size = (150, 40) if name == "c.png" else (96, 64)
        draw_picture(kind, size=size).save(directory / name)


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """One record per line; strings are written as they are (to plant malformed lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def opened(messages: list[dict], directory: Path) -> list[dict]:
    """The messages with every image path replaced by the PIL image (what the oracle is given)."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": "image", "image": Image.open(directory / part["image"]).copy()} if part["type"] == "image"
                else part
                for part in content
            ]
        out.append({"role": message["role"], "content": content})
    return out


def user(text: str, *images: str) -> dict:
    parts = [{"type": "image", "image": image} for image in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# Conversations the tests share: multi-turn, a system prompt, 0/1/2 images per turn, string and list content.
CONVERSATIONS = {
    "text": [{"role": "user", "content": "Hello, world!"}, assistant("How are you today?")],
    "system_one_image": [
        {"role": "system", "content": "Be brief."},
        user("What is in this picture?", "a.png"),
        assistant("A red circle."),
    ],
    "multi_turn_0_1_2": [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        user("Describe the image.", "a.png", "b.png"),
        {"role": "assistant", "content": [{"type": "text", "text": "The first image shows a circle."}]},
        {"role": "user", "content": "What colour is the circle?"},
        assistant("The circle is red."),
        user("Compare the two images.", "b.png"),
        assistant("The first one is red and the second one is blue."),
    ],
    "images_after_text": [
        {"role": "user", "content": [
            {"type": "text", "text": "Look at the picture."},
            {"type": "image", "image": "c.png"},
            {"type": "text", "text": " Describe the image. "},
        ]},
        assistant("  A green triangle.  "),
    ],
}
