"""Small deterministic test pictures: coloured shapes on a plain background, drawn with PIL only.

The demo and the tests need images without downloading any: ``draw_picture("red circle")`` gives the same
pixels on every machine (no fonts, no antialiasing, no randomness beyond a seeded ``random.Random``), so
processor outputs and model logits computed from it are reproducible. Words are written with a built-in
5-row pixel font (``GLYPHS``), not a system font, for the same reason.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 210),
    "yellow": (240, 210, 30),
    "orange": (245, 140, 20),
    "purple": (130, 50, 170),
    "pink": (240, 130, 180),
    "brown": (120, 75, 35),
    "black": (10, 10, 10),
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
    "grey": (128, 128, 128),
    "cyan": (30, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
# A 3x5 pixel font for the letters the demo's words use: each glyph is 5 rows of 3 pixels ("#" = ink).
GLYPHS: dict[str, tuple[str, ...]] = {
    "a": (".#.", "#.#", "###", "#.#", "#.#"), "b": ("##.", "#.#", "##.", "#.#", "##."),
    "c": (".##", "#..", "#..", "#..", ".##"), "d": ("##.", "#.#", "#.#", "#.#", "##."),
    "e": ("###", "#..", "##.", "#..", "###"), "g": (".##", "#..", "#.#", "#.#", ".##"),
    "i": ("###", ".#.", ".#.", ".#.", "###"), "k": ("#.#", "#.#", "##.", "#.#", "#.#"),
    "l": ("#..", "#..", "#..", "#..", "###"), "n": ("#.#", "###", "###", "#.#", "#.#"),
    "o": (".#.", "#.#", "#.#", "#.#", ".#."), "p": ("##.", "#.#", "##.", "#..", "#.."),
    "s": (".##", "#..", ".#.", "..#", "##."), "t": ("###", ".#.", ".#.", ".#.", ".#."),
    "u": ("#.#", "#.#", "#.#", "#.#", "###"), "x": ("#.#", "#.#", ".#.", "#.#", "#.#"),
    "y": ("#.#", "#.#", ".#.", ".#.", ".#."),
}


def _parse(kind: str) -> list[tuple[str, str]]:
    """``"red circle and blue square"`` -> ``[("red", "circle"), ("blue", "square")]`` (ValueError if unknown)."""
    objects = []
    for part in kind.lower().split(" and "):
        words = part.split()
        if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
            raise ValueError(
                f"picture kind {kind!r}: each object must be '<colour> <shape>' joined by ' and ', "
                f"colours {sorted(COLOURS)}, shapes {list(SHAPES)}"
            )
        objects.append((words[0], words[1]))
    return objects


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]
) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "star":  # five points, inner radius 0.4 r
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else 0.4 * r
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    elif shape == "cross":
        t = max(1, round(r / 3))
        draw.rectangle((x0, cy - t, x1, cy + t), fill=fill)
        draw.rectangle((cx - t, y0, cx + t, y1), fill=fill)
    else:  # _parse guarantees a known shape
        raise AssertionError(shape)


def draw_picture(kind: str = "red circle", size: tuple[int, int] = (96, 64), seed: int = 0) -> Image.Image:
    """An RGB picture of ``kind`` (e.g. ``"red circle"``, ``"blue square and green triangle"``).

    ``size`` is PIL's ``(width, height)``; the default is wider than tall so that pan & scan has something to
    crop. Objects sit side by side, each in its own equal-width cell; ``seed`` jitters their size and
    position a little and tints the background, so different seeds give different but equally simple
    pictures. The background is light, or dark for a white object, so every shape stays visible.
    """
    width, height = size
    if width < 8 or height < 8:
        raise ValueError(f"picture size {size} is too small: need at least 8x8 pixels")
    objects = _parse(kind)
    rng = random.Random(seed)
    dark = any(colour == "white" for colour, _ in objects)
    base = 40 if dark else 225
    background = tuple(base + rng.randint(0, 20) for _ in range(3))
    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)

    cell = width / len(objects)
    for i, (colour, shape) in enumerate(objects):
        side = min(cell, height) * rng.uniform(0.55, 0.8)  # the shape's bounding square
        cx = cell * (i + 0.5) + rng.uniform(-0.1, 0.1) * (cell - side)
        cy = height / 2 + rng.uniform(-0.1, 0.1) * (height - side)
        box = (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))
        _draw_shape(draw, shape, box, COLOURS[colour])
    return img


def write_word(img: Image.Image, word: str, *, scale: int = 2, colour: tuple[int, int, int] = (10, 10, 10)) -> Image.Image:
    """Write ``word`` (letters of ``GLYPHS``) in ``img``'s bottom band, centred, ``scale`` pixels per font pixel."""
    unknown = sorted(set(word) - set(GLYPHS))
    if unknown:
        raise ValueError(f"word {word!r}: no glyph for {''.join(unknown)!r} (letters: {''.join(sorted(GLYPHS))})")
    draw = ImageDraw.Draw(img)
    width = (4 * len(word) - 1) * scale
    x0 = (img.width - width) // 2
    y0 = img.height - 6 * scale
    for index, letter in enumerate(word):
        for row, line in enumerate(GLYPHS[letter]):
            for col, pixel in enumerate(line):
                if pixel == "#":
                    x, y = x0 + (4 * index + col) * scale, y0 + row * scale
                    draw.rectangle((x, y, x + scale - 1, y + scale - 1), fill=colour)
    return img


def save_picture(path: str | Path, kind: str = "red circle", size: tuple[int, int] = (96, 64), seed: int = 0) -> Path:
    """Draw a picture (see :func:`draw_picture`) and save it; the format follows the suffix (PNG is lossless)."""
    path = Path(path)
    draw_picture(kind, size=size, seed=seed).save(path)
    return path
