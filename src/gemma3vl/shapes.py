"""A small synthetic image-question-answer set, drawn on the spot: shapes, colours, counts and a word.

Used by the tiny recipes and ``gemma3vl demo`` so fine-tuning can be shown end to end with no network:
a model at chance answers ~1 in 4 of these; after a short fine-tune it should answer most.
Records are written in the documented conversation schema (``{"messages": [...]}``, images as files
relative to the JSONL).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from gemma3vl.pictures import draw_picture, write_word

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "cross")
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "count": "How many shapes are there?",
    "word": "What word is written under the shape?",
}
WORDS = ("sun", "box", "cat", "dog")  # four answers, like the other questions: chance is one in four
COUNT_WORDS = {1: "one", 2: "two"}


def make_record(rng: random.Random, image_name: str, directory: Path, size: tuple[int, int]) -> dict:
    kind = rng.choice(tuple(QUESTIONS))
    colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
    count = rng.choice((1, 2)) if kind == "count" else 1
    word = rng.choice(WORDS)
    objects = " and ".join([f"{colour} {shape}"] * count)
    seed = rng.randrange(1 << 30)
    if kind == "word":  # the shape above, the word in a band of its own below
        band = 14
        shape_part = draw_picture(objects, size=(size[0], size[1] - band), seed=seed)
        picture = Image.new("RGB", size, shape_part.getpixel((0, 0)))
        picture.paste(shape_part, (0, 0))
        write_word(picture, word)
    else:
        picture = draw_picture(objects, size=size, seed=seed)
    picture.save(directory / image_name)
    answer = {"colour": colour, "shape": shape, "count": COUNT_WORDS[count], "word": word}[kind]
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
