"""Opening a record's images safely: paths stay inside the dataset, URLs only when allowed, sizes bounded.

A training set is data from elsewhere; a record must not be able to make the trainer read
``../../etc/passwd``, follow a symlink out of the dataset directory, or fetch from the network, unless the
user said so. Files and in-memory images (``data:`` URLs, downloads, HF dataset bytes) are decoded by
:func:`gemma3vl.infer.prompt.decode_image`, as in inference and the server (same pixel limit and messages).

Hostile or broken files (tests/test_reliability_images.py tries each): zero-byte, truncated and corrupt files
are refused with the record's ``file:line``, as is any image over ``max_image_pixels``, checked from the
header before a pixel is decoded (PIL itself refuses claims over twice its ``MAX_IMAGE_PIXELS``, 179 M pixels,
at open: that refusal is named the same way). Every PIL mode is handed to the processor as it is, so it is
converted exactly as transformers' Gemma 3 image processor converts it (``convert_to_rgb``: alpha and
palette transparency composited onto white; 16-bit, 32-bit and float modes through PIL's ``convert("RGB")``).

Orientation: an image decoded here from bytes (a file, ``data:`` URL, download or dataset bytes) is turned
upright by its EXIF orientation tag, as transformers' ``load_image`` does for a path or URL and as the
``datasets`` library does when it decodes an ``Image`` feature; a ``PIL.Image`` already in a record is used as
it is (whoever decoded it chose). So a rotated phone JPEG trains as the picture its owner saw.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from gemma3vl.data.records import (
    IMAGE_OUTSIDE_DATASET,
    REMOTE_IMAGE_REFUSED,
    UNREADABLE_IMAGE,
    BadRecord,
    ImageRef,
)
from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.prompt import (
    DEFAULT_MAX_IMAGE_PIXELS, ImageTooLarge, check_pixels, data_url_bytes, decode_image, load_image,
)

DEFAULT_MAX_REMOTE_BYTES = 32 * 1024 * 1024
REMOTE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ImageLoader:
    """Turns :class:`ImageRef` s into PIL images under the dataset's rules; failures are :class:`BadRecord` s."""

    allow_remote_images: bool = False
    allow_outside_paths: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_remote_bytes: int = DEFAULT_MAX_REMOTE_BYTES

    def load(self, ref: ImageRef, base_dir: Path | None, source: str) -> Image.Image:
        value = ref.source
        if isinstance(value, Image.Image):
            self._check_size(value.size, "image", source)
            return value
        if isinstance(value, bytes):
            return self._decode(value, "image bytes", source)
        if isinstance(value, dict):  # an undecoded HF ``Image`` feature: {"bytes": ..., "path": ...}
            if isinstance(value.get("bytes"), bytes):
                return self._decode(value["bytes"], f"image bytes of {value.get('path') or 'a dataset row'}", source)
            value = value.get("path")
        if not isinstance(value, str):
            raise BadRecord(source, UNREADABLE_IMAGE, f"cannot open an image from {type(value).__name__}")
        if value.startswith("data:"):
            return self._decode(_data_url_bytes(value, source), "data: URL image", source)
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme in ("http", "https"):
            return self._fetch(value, source)
        if scheme:
            raise BadRecord(source, UNREADABLE_IMAGE, f"image {value!r}: unsupported URL scheme {scheme!r}")
        return self._open_file(value, base_dir, source)

    def _open_file(self, value: str, base_dir: Path | None, source: str) -> Image.Image:
        root = (base_dir or Path.cwd()).resolve()
        try:
            # resolve() follows symlinks, so a link pointing out of the dataset is caught like "../".
            path = (root / value).resolve()
        except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a name too long, a symlink loop
            raise BadRecord(source, UNREADABLE_IMAGE, f"image {value!r}: not a usable path ({exc})") from None
        if not self.allow_outside_paths and not path.is_relative_to(root):
            raise BadRecord(
                source,
                IMAGE_OUTSIDE_DATASET,
                f"image {value!r} resolves to {path}, outside the dataset directory {root} "
                "(in training, data.allow_outside_paths=true permits it)",
            )
        try:
            return load_image(path, self.max_image_pixels)  # decoded, size-checked, turned upright
        except Gemma3VLError as exc:
            raise BadRecord(source, UNREADABLE_IMAGE, f"image {value!r}: {exc}") from None
        except (OSError, ValueError) as exc:  # e.g. is_file() on a name longer than the file system allows
            raise BadRecord(source, UNREADABLE_IMAGE, f"image {value!r}: cannot open it ({exc})") from None

    def _fetch(self, url: str, source: str) -> Image.Image:
        if not self.allow_remote_images:
            raise BadRecord(
                source, REMOTE_IMAGE_REFUSED, f"image {url!r} is remote (in training, data.allow_remote_images=true fetches it)"
            )
        try:
            with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as response:  # noqa: S310 (scheme checked)
                data = response.read(self.max_remote_bytes + 1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise BadRecord(source, UNREADABLE_IMAGE, f"image {url!r}: cannot fetch ({exc})") from None
        if len(data) > self.max_remote_bytes:
            raise BadRecord(
                source, UNREADABLE_IMAGE, f"image {url!r} is larger than the limit of {self.max_remote_bytes} bytes"
            )
        return self._decode(data, f"image {url!r}", source)

    def _check_size(self, size: tuple[int, int], label: str, source: str) -> None:
        try:
            check_pixels(size, label, self.max_image_pixels)
        except ImageTooLarge as exc:
            raise BadRecord(source, UNREADABLE_IMAGE, str(exc)) from None

    def _decode(self, data: bytes, label: str, source: str) -> Image.Image:
        try:
            return decode_image(data, label, self.max_image_pixels)  # decoded now: a truncated image fails here
        except Gemma3VLError as exc:
            raise BadRecord(source, UNREADABLE_IMAGE, str(exc)) from None


def _data_url_bytes(url: str, source: str) -> bytes:
    """The payload of ``data:[<type>];base64,<data>``; only base64 payloads carry binary images."""
    try:
        return data_url_bytes(url, "data: URL image")
    except Gemma3VLError as exc:
        raise BadRecord(source, UNREADABLE_IMAGE, str(exc)) from None
