"""Training images, the whole matrix: every PIL mode, EXIF rotation, broken files, a decompression bomb,
extreme sizes; and a fuzz test of the encoder over random conversations with random images.

The oracle is transformers' own ``Gemma3Processor`` (``AutoProcessor`` of the tiny checkpoint), given the
image the way the Hugging Face stack hands one over: decoded by the ``datasets`` library's ``Image`` feature
(EXIF orientation applied, PIL mode kept) and, for every mode without transparency, also by path, which
transformers opens itself with ``load_image`` (EXIF orientation applied, then ``convert("RGB")``). For the
modes with transparency (LA, RGBA, P with a transparent index) those two differ: ``load_image`` drops alpha,
the image processor composites it onto white. We hand PIL images to the processor as ``datasets`` does, so
transparency is composited onto white, as inference (which also hands PIL images over) does.
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gemma3vl.data import BadRecord, ConversationEncoder, parse_record
from gemma3vl.data.dataset import ConversationDataset
from gemma3vl.data.settings import DataConfig
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.prompt import pan_and_scan_settings
from test_data_common import load_tiny_processor, processor  # noqa: F401  (fixture)

RNG = np.random.default_rng(0)
NOISE = RNG.integers(0, 256, (48, 72, 3), dtype=np.uint8)  # 72 x 48, not square: a rotation shows
ALPHA = RNG.integers(0, 256, (48, 72), dtype=np.uint8)


def _rgb() -> Image.Image:
    return Image.fromarray(NOISE)


def _rgba() -> Image.Image:
    return Image.fromarray(np.dstack([NOISE, ALPHA]))


def _palette_with_transparency() -> Image.Image:
    image = _rgb().convert("P")
    image.info["transparency"] = 7
    return image


# file name -> the image saved to it (the file's own decoder gives the mode back)
MODES = {
    "1.png": lambda: _rgb().convert("1"),
    "L.png": lambda: _rgb().convert("L"),
    "P.png": lambda: _rgb().convert("P"),
    "P-transparent.png": _palette_with_transparency,
    "LA.png": lambda: _rgba().convert("LA"),
    "RGBA.png": _rgba,
    "RGB.jpg": _rgb,
    "CMYK.jpg": lambda: _rgb().convert("CMYK"),
    "CMYK.tif": lambda: _rgb().convert("CMYK"),
    "I;16.png": lambda: Image.fromarray(RNG.integers(0, 65536, (48, 72), dtype=np.uint16)),
    "I.tif": lambda: Image.fromarray(RNG.integers(-1000, 70000, (48, 72)).astype(np.int32)),
    "F.tif": lambda: Image.fromarray(RNG.normal(100, 80, (48, 72)).astype(np.float32)),
    "1x1.png": lambda: Image.new("RGB", (1, 1), (200, 10, 30)),
    "wide-4000x1.png": lambda: Image.fromarray(RNG.integers(0, 256, (1, 4000, 3), dtype=np.uint8)),
    "tall-1x3000.png": lambda: Image.fromarray(RNG.integers(0, 256, (3000, 1, 3), dtype=np.uint8)),
    "wide-900x100.png": lambda: Image.fromarray(RNG.integers(0, 256, (100, 900, 3), dtype=np.uint8)),
}
TRANSPARENT = {"P-transparent.png", "LA.png", "RGBA.png"}


def record(image: str, text: str = "What is this?") -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": text}]},
                         {"role": "assistant", "content": "A picture."}]}


def oracle_pixels(processor, image, encoder: ConversationEncoder) -> torch.Tensor:
    """transformers' pixel_values for the one-image conversation of :func:`record`, image given as is."""
    messages = [{"role": "user", "content": [{"type": "image", **image}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A picture."}]}]
    kwargs = {"processor_kwargs": encoder.processor_kwargs} if encoder.processor_kwargs else {}
    encoded = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt", **kwargs)
    return encoded["pixel_values"].float()


def datasets_decoded(path: Path) -> Image.Image:
    from datasets import Image as ImageFeature

    return ImageFeature().decode_example({"path": str(path), "bytes": None})


@pytest.fixture(scope="module")
def pan_and_scan_processor(tmp_path_factory):
    return load_tiny_processor(tmp_path_factory.mktemp("pas-processor"), pan_and_scan=True)


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_is_converted_as_transformers_converts_it(processor, pan_and_scan_processor, tmp_path, name):
    chosen = pan_and_scan_processor if name.startswith(("wide", "tall")) else processor  # crops, too
    MODES[name]().save(tmp_path / name)
    encoder = ConversationEncoder(chosen)
    sample = encoder.encode(parse_record(record(name), "d.jsonl:3", tmp_path))
    expected = oracle_pixels(chosen, {"image": datasets_decoded(tmp_path / name)}, encoder)
    assert sample.pixel_values.shape == expected.shape and torch.equal(sample.pixel_values, expected)
    if name not in TRANSPARENT:  # transformers opening the path itself gives the same pixels
        assert torch.equal(oracle_pixels(chosen, {"path": str(tmp_path / name)}, encoder), expected)
    tokens_per_image = chosen.image_seq_length
    image_tokens = int((sample.input_ids == encoder.image_token_id).sum())
    assert image_tokens == tokens_per_image * sample.pixel_values.shape[0]


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_rotated_images_are_turned_upright_as_transformers_does(processor, tmp_path, suffix):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    name = f"rotated{suffix}"
    _rgb().save(tmp_path / name, exif=exif.tobytes())
    encoder = ConversationEncoder(processor)
    sample = encoder.encode(parse_record(record(name), "d.jsonl:1", tmp_path))
    by_path = oracle_pixels(processor, {"path": str(tmp_path / name)}, encoder)  # load_image: exif_transpose
    assert torch.equal(sample.pixel_values, by_path)
    assert torch.equal(sample.pixel_values, oracle_pixels(processor, {"image": datasets_decoded(tmp_path / name)},
                                                          encoder))
    unrotated = Image.open(tmp_path / name)
    assert not torch.equal(sample.pixel_values, oracle_pixels(processor, {"image": unrotated}, encoder))
    # bytes (a data: URL, a download, a dataset's bytes) are turned the same way as files
    data_url = "data:image/jpeg;base64," + base64.b64encode((tmp_path / name).read_bytes()).decode()
    assert torch.equal(encoder.encode(parse_record(record(data_url), "d.jsonl:2", tmp_path)).pixel_values, by_path)


def jpeg_with_exif() -> tuple[bytes, int]:
    """A JPEG with an EXIF block (orientation 6, a maker, a date), and where the block starts."""
    exif = Image.Exif()
    exif[0x0112], exif[0x010F], exif[0x8769] = 6, "maker", {0x9003: "2020:01:01 00:00:00"}
    buffer = io.BytesIO()
    _rgb().save(buffer, format="JPEG", exif=exif.tobytes())
    data = buffer.getvalue()
    return data, data.index(b"Exif")


def load_bytes(data: bytes) -> Image.Image:
    from gemma3vl.data import ImageLoader, ImageRef

    return ImageLoader().load(ImageRef(data), None, "d.jsonl:9")


def test_a_corrupt_exif_block_is_a_bad_record():
    data, start = jpeg_with_exif()
    assert load_bytes(data).size == (48, 72)  # upright
    broken = bytearray(data)
    broken[start + 17] = 0x2D  # the Make tag becomes TransferFunction (shorts), still holding "maker"
    with pytest.raises(BadRecord, match=r"^d\.jsonl:9: image bytes: corrupt EXIF block \(error: ") as caught:
        load_bytes(bytes(broken))  # PIL's exif_transpose raised struct.error here
    assert caught.value.reason == "unreadable_image"


@pytest.mark.filterwarnings("ignore:.*(EXIF|Tag data|Truncated File):UserWarning")  # PIL's own, on damage
@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 90), st.integers(0, 255)), min_size=1, max_size=6))
def test_random_damage_to_the_exif_block_gives_an_image_or_a_bad_record(changes):
    data, start = jpeg_with_exif()
    damaged = bytearray(data)
    for offset, value in changes:
        damaged[start + offset] = value
    try:
        image = load_bytes(bytes(damaged))
    except BadRecord:
        return
    assert image.size in ((48, 72), (72, 48))  # rotated by whatever orientation survived, or not


def png_claiming(width: int, height: int) -> bytes:
    """A small valid-looking PNG whose header claims ``width`` x ``height`` (the CRC fixed to match): costs
    nothing to make, and would need ``width * height`` bytes and more to decode."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    raw[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    raw[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr - 4:ihdr + 13])))
    return bytes(raw)


def truncated(name: str, fraction: float) -> bytes:
    buffer = io.BytesIO()
    _rgb().save(buffer, format="JPEG" if name.endswith(".jpg") else "PNG")
    data = buffer.getvalue()
    return data[: int(len(data) * fraction)]


def corrupt_png_data() -> bytes:
    buffer = io.BytesIO()
    _rgb().save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT") + 4
    data[start + 20:start + 60] = bytes(range(40))  # garbage inside the compressed pixels
    return bytes(data)


# file -> (bytes, what the message must say); each is one bad record in the same file
BROKEN = {
    "empty.png": (b"", "cannot identify image file"),
    "truncated.jpg": (truncated("x.jpg", 0.5), "truncated"),
    "truncated.png": (truncated("x.png", 0.5), r"truncated|not a readable image"),
    "corrupt-data.png": (corrupt_png_data(), "not a readable image"),
    "text.jpg": (b"this is not a picture at all\n" * 4, "cannot identify image file"),
    # past Pillow's own limit, met when it opens the file: said as our own limit says it (prompt.decode_image)
    "bomb-50000x50000.png": (png_claiming(50_000, 50_000), r"2500000000 pixels is over the limit of 64000000"),
    "huge-9000x9000.png": (png_claiming(9_000, 9_000), r"9000x9000 = 81000000 pixels is over the limit of 64000000"),
}


def write_dataset(directory: Path) -> Path:
    """Line 1 is a good record, then one line per broken image, then another good one."""
    _rgb().save(directory / "good.png")
    lines = [record("good.png")] + [record(name) for name in BROKEN] + [record("good.png", "Again?")]
    for name, (data, _) in BROKEN.items():
        (directory / name).write_bytes(data)
    path = directory / "train.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_broken_images_are_skipped_named_and_counted(processor, tmp_path):
    path = write_dataset(tmp_path)
    dataset = ConversationDataset(DataConfig(path=path, seq_length=512, shuffle=False), processor)
    tracemalloc.start()
    try:
        samples = list(dataset)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(samples) == 2
    summary = dataset.summary()
    assert summary.skipped == {"unreadable_image": len(BROKEN)} and summary.records == len(BROKEN) + 2
    assert f"{len(BROKEN)} skipped (unreadable_image: {len(BROKEN)})" in str(summary)
    assert peak < 64 * 2**20, f"{peak} bytes: the bomb was decoded"  # 50,000^2 pixels would be 2.5 GB
    # with on_bad_record=error the first broken image stops the run, named by file and line
    strict = ConversationDataset(DataConfig(path=path, seq_length=512, shuffle=False, on_bad_record="error"),
                                 processor)
    for line, (name, (_, words)) in enumerate(BROKEN.items(), start=2):
        strict.position = line - 1
        with pytest.raises(Gemma3VLError) as caught:
            next(iter(strict))
        message = str(caught.value)
        assert message.startswith(f"{path}:{line}: image '{name}'"), message
        assert re.search(words, message), (words, message)
        assert " object at 0x" not in message, message  # no repr of the in-memory file Pillow was given


def test_the_pixel_limit_is_a_setting(processor, tmp_path):
    path = write_dataset(tmp_path)
    dataset = ConversationDataset(DataConfig(path=path, seq_length=512, shuffle=False, max_image_pixels=72 * 48 - 1),
                                  processor)
    with pytest.raises(Gemma3VLError, match="no usable record"):
        list(dataset)  # even the good 72 x 48 image is over a limit of 3455 pixels
    assert dataset.summary().skipped == {"unreadable_image": len(BROKEN) + 2}
    assert dataset.summary().examples["unreadable_image"] == (
        f"{path}:1: image 'good.png': {tmp_path / 'good.png'}: 72x48 = 3456 pixels is over the limit of 3455")


# ------------------------------------------------------------------------------------------------ fuzz
IMAGE_MODES = ["1", "L", "P", "LA", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
FORMATS = {"png": "PNG", "jpg": "JPEG", "tif": "TIFF", "webp": "WEBP", "gif": "GIF", "bmp": "BMP"}


@st.composite
def images(draw) -> tuple[str, Image.Image, str]:
    width, height = draw(st.integers(1, 120)), draw(st.integers(1, 120))
    mode = draw(st.sampled_from(IMAGE_MODES))
    suffix = draw(st.sampled_from(sorted(FORMATS)))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return mode, Image.fromarray(pixels).convert(mode) if mode not in ("I;16", "I", "F") else \
        Image.fromarray(pixels[..., 0]).convert(mode), suffix


# Mostly plain text; now and then a control-token string (refused) or a near miss of one (kept as text).
TEXTS = st.lists(st.sampled_from(list("ab c.\n") * 8 + ["é", "图", "<b", "<start_of", "<image>", "<start_of_image>"]),
                 max_size=12).map("".join)


@st.composite
def conversations(draw) -> tuple[dict, list[tuple[str, Image.Image, str]]]:
    turns, pictures = [], []
    if draw(st.booleans()):
        turns.append({"role": "system", "content": draw(TEXTS)})
    for _ in range(draw(st.integers(1, 3))):
        parts = []
        for _ in range(draw(st.integers(0, 2))):
            pictures.append(draw(images()))
            parts.append({"type": "image", "image": f"{len(pictures) - 1}.img"})
        parts.insert(draw(st.integers(0, len(parts))), {"type": "text", "text": draw(TEXTS)})
        turns.append({"role": "user", "content": parts})
        turns.append({"role": "assistant", "content": draw(TEXTS)})
    return {"messages": turns}, pictures


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversations(), st.integers(24, 600), st.sampled_from(["turns", "skip"]))
def test_random_conversations_with_random_images_encode_or_raise_bad_record(processor, tmp_path, drawn, seq_length,
                                                                            truncation):
    """Only BadRecord / Gemma3VLError may escape; a sample that comes out has one pixel row per image block,
    the processor's number of image tokens in each block, labels aligned with the ids, and fits seq_length."""
    raw, pictures = drawn
    directory = tmp_path / f"case-{abs(hash(json.dumps(raw))) % 10**8}"
    directory.mkdir(exist_ok=True)
    for index, (mode, image, suffix) in enumerate(pictures):
        for form in (FORMATS[suffix], "TIFF"):  # not every format stores every mode: TIFF stores these
            buffer = io.BytesIO()
            try:
                image.save(buffer, format=form)
                break
            except (OSError, ValueError, KeyError):
                continue
        (directory / f"{index}.img").write_bytes(buffer.getvalue())
    encoder = ConversationEncoder(processor, seq_length=seq_length, truncation=truncation)
    try:
        sample = encoder.encode(parse_record(raw, "fuzz.jsonl:1", directory))
    except Gemma3VLError as exc:  # BadRecord is one
        assert str(exc).startswith("fuzz.jsonl:1: ") or not isinstance(exc, BadRecord), str(exc)
        return
    ids = sample.input_ids
    assert len(ids) <= seq_length and sample.labels.shape == ids.shape
    image_tokens = int((ids == encoder.image_token_id).sum())
    rows = 0 if sample.pixel_values is None else sample.pixel_values.shape[0]
    assert image_tokens == rows * processor.image_seq_length
    assert rows <= len(pictures)
    if rows:
        assert sample.pixel_values.shape[1:] == (3, processor.image_processor.size["height"],
                                                 processor.image_processor.size["width"])
        assert torch.isfinite(sample.pixel_values).all()


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_inference_turns_exif_rotated_images_upright_too(tmp_path, suffix):
    """`generate`/`chat` (files) and `serve` (data: URLs) see the same upright picture as training and as
    transformers' `load_image` (which applies `exif_transpose` to every source)."""
    from PIL import ImageOps

    from gemma3vl.infer.image_sources import ImageFetcher, ImageLimits
    from gemma3vl.infer.prompt import load_image

    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"rotated{suffix}"
    _rgb().save(path, exif=exif.tobytes())
    expected = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert expected.size != Image.open(path).size  # the tag does turn it
    from_file = load_image(path).convert("RGB")
    data_url = f"data:image/{suffix[1:]};base64," + base64.b64encode(path.read_bytes()).decode()
    from_url = ImageFetcher(ImageLimits()).fetch(data_url, "messages[0].content[0]").convert("RGB")
    for got in (from_file, from_url):
        assert got.size == expected.size and got.tobytes() == expected.tobytes()
