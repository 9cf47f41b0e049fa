"""``gemma3vl serve`` as a user runs it: a subprocess on loopback that logs each request and stops cleanly on
SIGINT and SIGTERM."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from gemma3vl.cli import main
from gemma3vl.tiny import write_tiny_checkpoint

STARTUP_TIMEOUT_S = 60


def _lines(stream, sink: queue.Queue) -> None:
    for line in stream:
        sink.put(line)
    sink.put(None)


def _wait_for(lines: queue.Queue, pattern: str, seen: list[str], timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.05, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(seen)}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_binds_loopback_logs_requests_and_stops_on_signal(model_dir, stop_signal):
    keyed = stop_signal == signal.SIGTERM
    process = subprocess.Popen(
        [sys.executable, "-m", "gemma3vl", "serve", str(model_dir), "--port", "0", "--device", "cpu",
         "--max-tokens", "4"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        # SIGTERM's run also requires the key the client sends ("unused"), given by the environment
        env={**os.environ, "PYTHONUNBUFFERED": "1", **({"GEMMA3VL_API_KEY": "unused"} if keyed else {})},
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(process.stderr, lines), daemon=True).start()
    seen: list[str] = []
    try:
        url = _wait_for(lines, r"at (http://[\d.]+:\d+)/v1", seen, STARTUP_TIMEOUT_S).group(1)
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "/health", timeout=30) as response:
            assert json.loads(response.read())["model"] == "tiny"
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0) as client:
            reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                   temperature=0)
        assert reply.usage.completion_tokens <= 4
        _wait_for(lines, r'"GET /health" 200', seen, 10)
        if keyed:
            assert any("requests need the API key" in line for line in seen)
            with pytest.raises(urllib.error.HTTPError, match="401"):
                urllib.request.urlopen(url + "/v1/models", timeout=30)
        _wait_for(lines, r'"POST /v1/chat/completions" 200 .* prompt=\d+ completion=\d+', seen, 10)
        process.send_signal(stop_signal)
        assert process.wait(timeout=30) == 0
        _wait_for(lines, r"^stopped$", seen, 10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_serve_refuses_bad_settings_before_loading(model_dir, tmp_path, capsys):
    assert main(["serve", str(model_dir), "--allow-local-images", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["serve", str(model_dir), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size 0 must be >= 1" in capsys.readouterr().err


def test_serve_refuses_an_address_it_cannot_listen_on_before_loading(model_dir, capsys, monkeypatch):
    """A port another process listens on, or a host that is not this machine's, is said before the model loads."""
    import socket

    from gemma3vl.infer.runtime import InferenceRuntime

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the address was checked")

    monkeypatch.setattr(InferenceRuntime, "load", never)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(model_dir), "--port", str(port), "--device", "cpu"]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", str(model_dir), "--host", "192.0.2.1", "--device", "cpu"]) == 2  # TEST-NET-1: not ours
    assert "cannot listen on 192.0.2.1:8000" in capsys.readouterr().err
