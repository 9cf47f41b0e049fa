"""Image sources: paths kept inside the dataset, data: URLs, remote URLs only when allowed and size-limited."""

from __future__ import annotations

import base64
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch

from gemma3vl.data import BadRecord, ConversationEncoder, ImageLoader, ImageRef, parse_record
from gemma3vl.pictures import draw_picture
from test_data_common import processor, write_pictures  # noqa: F401  (fixture)


@pytest.fixture
def layout(tmp_path):
    """tmp/data/{a,b,c}.png (the dataset), tmp/secret.png outside it, and symlinks in the dataset."""
    data = tmp_path / "data"
    write_pictures(data)
    draw_picture("black cross").save(tmp_path / "secret.png")
    (data / "sub").mkdir()
    os.symlink(tmp_path / "secret.png", data / "escape.png")
    os.symlink(data / "a.png", data / "sub" / "inside.png")
    return data


def load(ref, base, **settings):
    return ImageLoader(**settings).load(ImageRef(ref), base, "d.jsonl:4")


@pytest.mark.parametrize("ref", ["../secret.png", "sub/../../secret.png", "escape.png", "ABS"])
def test_paths_escaping_the_dataset_are_refused(layout, ref):
    ref = str(layout.parent / "secret.png") if ref == "ABS" else ref
    with pytest.raises(BadRecord, match=r"^d\.jsonl:4: .*outside the dataset directory") as caught:
        load(ref, layout)
    assert caught.value.reason == "image_outside_dataset"
    assert load(ref, layout, allow_outside_paths=True).size == (96, 64)  # allowed when asked


def test_paths_inside_the_dataset_load(layout):
    assert load("a.png", layout).size == (96, 64)
    assert load("sub/inside.png", layout).size == (96, 64)  # a symlink that stays inside
    assert load("sub/../b.png", layout).size == (96, 64)


def test_unreadable_images_are_named(layout):
    (layout / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for ref, words in (("missing.png", "no such image file"), ("broken.png", "not a readable image"),
                       ("ftp://host/a.png", "unsupported URL scheme")):
        with pytest.raises(BadRecord, match=words) as caught:
            load(ref, layout)
        assert caught.value.reason == "unreadable_image" and str(caught.value).startswith("d.jsonl:4: ")
    with pytest.raises(BadRecord, match="over the limit of 100") as caught:
        load("a.png", layout, max_image_pixels=100)
    assert caught.value.reason == "unreadable_image"


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_data_url_images_give_the_same_sample_as_files(processor, layout):
    url = "data:image/png;base64," + base64.b64encode(png_bytes(layout / "a.png")).decode()
    encoder = ConversationEncoder(processor)

    def record(image):
        return {"messages": [{"role": "user", "content": [{"type": "image", "image": image}]},
                             {"role": "assistant", "content": "A red circle."}]}

    from_url = encoder.encode(parse_record(record(url), "r:1", layout))
    from_file = encoder.encode(parse_record(record("a.png"), "r:1", layout))
    assert from_url.input_ids.tolist() == from_file.input_ids.tolist()
    assert torch.equal(from_url.pixel_values, from_file.pixel_values)
    for bad in ("data:image/png,abc", "data:image/png;base64,***", "data:image/png;base64,AAAA"):
        with pytest.raises(BadRecord) as caught:
            load(bad, layout)
        assert caught.value.reason == "unreadable_image"


@pytest.fixture
def http_server(layout):
    """A local HTTP server over the dataset directory (loopback only; no outside network is used)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(layout), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_remote_images_need_the_setting_and_respect_the_size_limit(layout, http_server, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # the server is on loopback
    url = f"{http_server}/a.png"
    with pytest.raises(BadRecord, match="allow_remote_images") as caught:
        load(url, layout)
    assert caught.value.reason == "remote_image_refused"
    with pytest.raises(BadRecord, match="allow_remote_images"):
        load("https://example.com/a.png", layout)  # refused before any connection is tried
    image = load(url, layout, allow_remote_images=True)
    assert image.tobytes() == load("a.png", layout).tobytes()
    with pytest.raises(BadRecord, match="larger than the limit of 50 bytes") as caught:
        load(url, layout, allow_remote_images=True, max_remote_bytes=50)
    assert caught.value.reason == "unreadable_image"
    with pytest.raises(BadRecord, match="cannot fetch"):
        load(f"{http_server}/missing.png", layout, allow_remote_images=True)


def test_hf_style_image_values(layout):
    raw = png_bytes(layout / "b.png")
    assert load(raw, layout).size == (96, 64)
    assert load({"bytes": raw, "path": "b.png"}, layout).size == (96, 64)
    assert load({"bytes": None, "path": "b.png"}, layout).size == (96, 64)
    picture = draw_picture("pink circle")
    assert load(picture, layout) is picture
    with pytest.raises(BadRecord, match="not a readable image"):
        load(b"nope", layout)


@pytest.mark.parametrize("ref", ["a\x00.png", "x" * 5000 + ".png", "d/" * 3000 + "a.png"])
def test_paths_the_system_cannot_use_are_bad_records(layout, ref):
    """A NUL byte or a name longer than the file system allows used to escape as ValueError / OSError from
    Path.resolve(), a traceback that ended the run instead of a skipped record naming its line."""
    with pytest.raises(BadRecord, match=r"^d\.jsonl:4: image ") as caught:
        load(ref, layout)
    assert caught.value.reason == "unreadable_image"
    with pytest.raises(BadRecord):
        load({"bytes": None, "path": ref}, layout, allow_outside_paths=True)
