"""A small synthetic image-question-answer set, drawn on the spot: shapes, colours and counts.

Used by the tiny recipes and ``gemma3vl demo`` so fine-tuning can be shown end to end with no network:
a model at chance answers ~1 in 4 of these; after a short fine-tune it should answer most.
Records are written in the documented conversation schema (``{"messages": [...]}``, images as files
relative to the JSONL).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from gemma3vl.pictures import draw_picture

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "cross")
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "count": "How many shapes are there?",
}
COUNT_WORDS = {1: "one", 2: "two"}


def make_record(rng: random.Random, image_name: str, directory: Path, size: tuple[int, int]) -> dict:
    kind = rng.choice(tuple(QUESTIONS))
    colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
    count = rng.choice((1, 2)) if kind == "count" else 1
    objects = " and ".join([f"{colour} {shape}"] * count)
    draw_picture(objects, size=size, seed=rng.randrange(1 << 30)).save(directory / image_name)
    answer = {"colour": colour, "shape": shape, "count": COUNT_WORDS[count]}[kind]
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": image_name},
                                         {"type": "text", "text": QUESTIONS[kind]}]},
            {"role": "assistant", "content": answer},
        ]
    }


def write_shapes_dataset(
    directory: str | Path, count: int, *, seed: int = 0, name: str = "train", size: tuple[int, int] = (56, 56)
) -> Path:
    """Draw ``count`` pictures into ``directory/images-NAME/`` and write ``directory/NAME.jsonl``."""
    directory = Path(directory)
    images = directory / f"images-{name}"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{name}-{seed}")
    path = directory / f"{name}.jsonl"
    with open(path, "w") as handle:
        for index in range(count):
            record = make_record(rng, f"{images.name}/{index:05d}.png", directory, size)
            handle.write(json.dumps(record) + "\n")
    return path
