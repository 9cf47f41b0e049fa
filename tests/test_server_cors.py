"""``gemma3vl serve --allowed-origins``: web pages of the allowed origins may call the server from a browser (CORS):
preflights answered without the API key, every answer (errors and streams included) readable by the page; other
origins, and servers without the setting, get no CORS header. Raw HTTP as a browser sends it, against a tiny
random model."""

from __future__ import annotations

import http.client
import io
import json

import pytest

from gemma3vl.cli import main
from gemma3vl.infer.server import ChatCompletionServer, ServerSettings

KEY = "sk-cors-1"
PAGE = "https://chat.example.com"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(runtime):
    settings = ServerSettings(port=0, max_batch_size=2, max_tokens=4, api_key=KEY, allowed_origins=(PAGE,))
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        yield live


def request(server, method: str, path: str, headers: dict[str, str], body: bytes | None = None):
    """(status, headers as a dict with lower-case names, body) of one request."""
    connection = http.client.HTTPConnection(*server.address, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def preflight(origin: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"}


def chat_body(stream: bool = False) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": stream}).encode()


def test_a_preflight_from_an_allowed_origin_needs_no_key(server):
    status, headers, body = request(server, "OPTIONS", CHAT, preflight(PAGE))
    assert status == 204 and body == b""
    assert headers["access-control-allow-origin"] == PAGE and headers["vary"] == "Origin"
    assert "POST" in headers["access-control-allow-methods"]
    assert headers["access-control-allow-headers"] == "authorization, content-type"


def test_answers_to_an_allowed_origin_carry_the_header_errors_and_streams_too(server):
    keyed = {"Origin": PAGE, "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body, stream in ((chat_body(), False), (chat_body(stream=True), True)):
        status, headers, raw = request(server, "POST", CHAT, keyed, body)
        assert status == 200 and headers["access-control-allow-origin"] == PAGE, raw
        assert headers["content-type"].startswith("text/event-stream" if stream else "application/json")
    status, headers, raw = request(server, "POST", CHAT, {"Origin": PAGE, "Content-Type": "application/json"},
                                   chat_body())
    assert status == 401 and headers["access-control-allow-origin"] == PAGE  # the page can read why
    assert json.loads(raw)["error"]["code"] == "invalid_api_key"


def test_other_origins_and_requests_without_one_get_no_cors_header(server):
    status, headers, raw = request(server, "OPTIONS", CHAT, preflight("https://evil.example.net"))
    assert status in (401, 405) and "access-control-allow-origin" not in headers
    keyed = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for extra in ({"Origin": "https://evil.example.net"}, {}):
        status, headers, _ = request(server, "POST", CHAT, {**keyed, **extra}, chat_body())
        assert status == 200 and "access-control-allow-origin" not in headers


def test_any_origin_and_no_setting(runtime):
    for origins, expected in ((("*",), "*"), ((), None)):
        settings = ServerSettings(port=0, max_batch_size=1, max_tokens=2, allowed_origins=origins)
        with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
            status, headers, _ = request(live, "OPTIONS", CHAT, preflight("http://localhost:3000"))
            assert status == (204 if expected else 405)
            assert headers.get("access-control-allow-origin") == expected and "vary" not in headers
            status, headers, _ = request(live, "GET", "/v1/models", {"Origin": "http://localhost:3000"})
            assert status == 200 and headers.get("access-control-allow-origin") == expected


@pytest.mark.parametrize("value", ["https://chat.example.com/", "chat.example.com", "ftp://x.example", " , ",
                                   "https://a.example?x=1"])
def test_a_value_that_is_not_an_origin_is_refused_before_loading(value, tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--allowed-origins", value]) == 2
    assert "--allowed-origins" in capsys.readouterr().err
