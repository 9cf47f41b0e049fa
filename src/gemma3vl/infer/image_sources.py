"""Images named by URL in a request — ``data:`` URLs always, local files and http(s) only when allowed.

A server that opens any path or fetches any URL a client names is a file-disclosure and SSRF hole, so local
files need an explicit directory (and are confined to it after resolving ``..`` and symlinks) and remote
URLs an explicit flag. Sizes are checked before decoding: bytes before base64-decoding or reading past the
limit, pixels from the image header before the pixels are decompressed.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.openai_protocol import ApiError
from gemma3vl.infer.prompt import ImageTooLarge, data_url_bytes, decode_image


@dataclass
class ImageLimits:
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8


class ImageFetcher:
    def __init__(self, limits: ImageLimits, *, local_dir: str | Path | None = None, allow_remote: bool = False,
                 remote_timeout_s: float = 10.0):
        self.limits = limits
        self.local_dir = Path(os.path.realpath(local_dir)) if local_dir is not None else None
        self.allow_remote = allow_remote
        self.remote_timeout_s = remote_timeout_s

    def fetch(self, url: str, param: str) -> Image.Image:
        """The decoded image at ``url``; an :class:`ApiError` naming ``param`` when refused or unreadable."""
        try:
            scheme = urllib.parse.urlsplit(url).scheme.lower()
        except ValueError as exc:  # "http://[::1/x.png": Invalid IPv6 URL
            raise ApiError(400, f"'{param}': not a valid URL ({exc})", param=param, code="invalid_image_url") from None
        if scheme == "data":  # schemes are case-insensitive (RFC 3986): DATA:image/png;base64,... too
            data = self._data_url_bytes(url, param)
        elif scheme in ("http", "https"):
            data = self._remote_bytes(url, param)
        elif scheme == "file" or "://" not in url:
            data = self._local_bytes(url, param)
        else:
            raise ApiError(400, f"'{param}': unsupported URL scheme {scheme!r} (use a data: URL)", param=param,
                           code="invalid_image_url")
        return self._decode(data, param)

    def _too_big(self, size: int, param: str) -> ApiError:
        return ApiError(413, f"'{param}': the image is {size} bytes, over the limit of "
                             f"{self.limits.max_image_bytes} bytes", param=param, code="image_too_large")

    def _data_url_bytes(self, url: str, param: str) -> bytes:
        media_type = url.partition(",")[0][len("data:"):].split(";")[0].strip().lower()
        if media_type and not media_type.startswith("image/"):
            raise ApiError(400, f"'{param}': data URL media type {media_type!r} is not an image", param=param,
                           code="invalid_image_url")
        with image_errors(param, "invalid_image_url"):
            return data_url_bytes(url, f"'{param}'", self.limits.max_image_bytes)

    def _local_bytes(self, url: str, param: str) -> bytes:
        if self.local_dir is None:
            raise ApiError(403, f"'{param}': local image files are not allowed by this server (start it with "
                                "--allow-local-images DIR)", param=param, code="local_images_not_allowed")
        path_text = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url[:5].lower() == "file:" else url
        try:
            path = Path(os.path.realpath(self.local_dir / path_text))  # absolute paths replace local_dir here
            if not path.is_relative_to(self.local_dir):
                raise ApiError(403, f"'{param}': {url!r} is outside the allowed image directory", param=param,
                               code="path_not_allowed")
            if not path.is_file():
                raise ApiError(400, f"'{param}': no such image file {url!r} in the allowed directory", param=param,
                               code="image_not_found")
            size = path.stat().st_size
            if size > self.limits.max_image_bytes:
                raise self._too_big(size, param)
            return path.read_bytes()
        except (OSError, ValueError) as exc:  # a NUL byte, a name too long, unreadable
            raise ApiError(400, f"'{param}': cannot read the image file {url!r} ({exc})", param=param,
                           code="image_not_found") from None

    def _remote_bytes(self, url: str, param: str) -> bytes:
        if not self.allow_remote:
            raise ApiError(403, f"'{param}': remote image URLs are not allowed by this server (start it with "
                                "--allow-remote-images), send the image as a data: URL", param=param,
                           code="remote_images_not_allowed")
        try:
            with urllib.request.urlopen(url, timeout=self.remote_timeout_s) as response:
                data = response.read(self.limits.max_image_bytes + 1)
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:  # InvalidURL,
            # IncompleteRead and BadStatusLine are HTTPExceptions
            raise ApiError(400, f"'{param}': could not download {url!r} ({exc})", param=param,
                           code="image_download_failed") from None
        if len(data) > self.limits.max_image_bytes:
            raise self._too_big(len(data), param)
        return data

    def _decode(self, data: bytes, param: str) -> Image.Image:
        with image_errors(param, "invalid_image"):
            return decode_image(data, f"'{param}'", self.limits.max_image_pixels)


@contextmanager
def image_errors(param: str, code: str) -> Iterator[None]:
    """An image over a limit as OpenAI's 413 ``image_too_large``, any other unreadable image as a 400 ``code``,
    each naming ``param``."""
    try:
        yield
    except ImageTooLarge as exc:
        raise ApiError(413, str(exc), param=param, code="image_too_large") from None
    except Gemma3VLError as exc:
        raise ApiError(400, str(exc), param=param, code=code) from None
