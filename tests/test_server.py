"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official ``openai`` client and raw HTTP.

Answers are checked against ``generate`` (greedy, or seeded sampling) on the prompt transformers' own
``apply_chat_template`` builds for the same messages; limits and malformed requests must give the right 4xx
JSON error and leave the server serving.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import http.client
import http.server
import io
import json
import os
import random
import re
import socket
import struct
import threading
import time
import zlib

import openai
import pytest
from PIL import Image

from gemma3vl.infer.completion import Row
from gemma3vl.infer.generate import Sampling, generate
from gemma3vl.infer.image_sources import ImageFetcher, ImageLimits
from gemma3vl.infer.openai_protocol import ApiError
from gemma3vl.infer.runtime import InferenceRuntime
from gemma3vl.infer.scheduler import BatchScheduler, Job
from gemma3vl.infer.server import ChatCompletionServer, ServerSettings
from gemma3vl.pictures import draw_picture
from gemma3vl.tiny import write_tiny_checkpoint

MAX_TOKENS = 12
LIMITS = ImageLimits(max_image_bytes=60_000, max_image_pixels=300 * 300, max_images=2)
MAX_REQUEST_BYTES = 1_000_000


class LogLines(io.StringIO):
    def lines(self) -> list[str]:
        return self.getvalue().splitlines()

    def lines_after(self, start: int, count: int, timeout_s: float = 10.0) -> list[str]:
        """The lines after the first ``start``, once there are ``count`` (a line is written just after its
        response is sent, so it may lag the client by a moment)."""
        deadline = time.monotonic() + timeout_s
        while len(self.lines()) < start + count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.lines()[start:]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def png_header(width: int, height: int) -> bytes:
    """A PNG that says it is ``width`` x ``height`` (its header), with no pixels to speak of."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def decode_data_url(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def noise_image(width: int, height: int) -> Image.Image:
    rng = random.Random(0)
    return Image.frombytes("RGB", (width, height), bytes(rng.randrange(256) for _ in range(width * height * 3)))


@pytest.fixture(scope="module")
def server(runtime):
    log = LogLines()
    settings = ServerSettings(port=0, max_batch_size=4, batch_wait_s=0.25, max_tokens=MAX_TOKENS,
                              max_request_bytes=MAX_REQUEST_BYTES, images=LIMITS)
    with ChatCompletionServer(runtime, settings, log=log) as live:
        live.test_log = log
        yield live


def hf_messages(messages):
    """OpenAI-style messages (images as data: URLs) in transformers' form (PIL images)."""
    converted = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": decode_data_url(part["image_url"]["url"])}
                       if part["type"] == "image_url" else part for part in content]
        else:
            content = [{"type": "text", "text": content}]
        converted.append({"role": message["role"], "content": content})
    return converted


def reference_answer(runtime, messages, max_tokens=MAX_TOKENS, sampling=None):
    """(text, finish_reason, prompt_tokens, completion_tokens) from transformers' chat template + generate."""
    encoded = runtime.processor.apply_chat_template(hf_messages(messages), add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt")
    stop_ids = set(runtime.config.stop_token_ids)
    sampling = sampling or Sampling(max_new_tokens=max_tokens, stop_token_ids=tuple(stop_ids))
    tokens = generate(runtime.model, encoded["input_ids"], attention_mask=encoded["attention_mask"],
                      pixel_values=encoded.get("pixel_values"), sampling=sampling)[0]
    finish = "stop" if tokens[-1] in stop_ids else "length"
    text = runtime.tokenizer.decode([t for t in tokens if t not in stop_ids], skip_special_tokens=True)
    return text, finish, encoded["input_ids"].shape[1], len(tokens)


def image_messages(text="What is in the picture?", kind="red circle"):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(draw_picture(kind))}},
        {"type": "text", "text": text},
    ]}]


def post_raw(server, body: bytes, path="/v1/chat/completions", headers=None, method="POST"):
    connection = http.client.HTTPConnection(*server.address, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


@contextlib.contextmanager
def live_server(runtime, **settings):
    """A server on a free loopback port with these ``ServerSettings``, its log kept out of the test's output."""
    with ChatCompletionServer(runtime, ServerSettings(port=0, **settings), log=io.StringIO()) as live:
        yield live


def chat_reply(server, messages, max_tokens, **fields) -> dict:
    """A greedy chat completion's answer (a 200 asserted)."""
    status, reply = post_json(server, {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **fields})
    assert status == 200, reply
    return reply


def post_json(server, obj, **kwargs):
    status, _, raw = post_raw(server, json.dumps(obj).encode(), **kwargs)
    return status, json.loads(raw)


# ---------------------------------------------------------------------------------------------- answers
def test_non_streaming_answer_with_an_image_equals_generate(server, client, runtime):
    messages = image_messages()
    response = client.chat.completions.create(model=server.model_name, messages=messages, temperature=0,
                                              max_tokens=MAX_TOKENS)
    text, finish, prompt_tokens, completion_tokens = reference_answer(runtime, messages)
    assert response.choices[0].message.content == text
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason == finish
    assert response.choices[0].index == 0
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert response.model == server.model_name == "tiny-gemma3" and isinstance(response.created, int)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert response.usage.total_tokens == prompt_tokens + completion_tokens


def test_streaming_answer_with_an_image_equals_generate(server, client, runtime):
    messages = image_messages("Describe it", "blue square and green star")
    stream = client.chat.completions.create(model=server.model_name, messages=messages, temperature=0,
                                            max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text, finish, prompt_tokens, completion_tokens = reference_answer(runtime, messages)
    with_choices = [chunk for chunk in chunks if chunk.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in with_choices) == text
    assert [chunk.choices[0].finish_reason for chunk in with_choices] == [None] * (len(with_choices) - 1) + [finish]
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == completion_tokens
    assert chunks[-1].usage.prompt_tokens == prompt_tokens


def test_stream_wire_format_is_server_sent_events(server, runtime):
    messages = [{"role": "user", "content": "Question number 0"}]
    status, content_type, raw = post_raw(server, json.dumps(
        {"model": server.model_name, "messages": messages, "stream": True, "temperature": 0}).encode())
    assert status == 200 and content_type.startswith("text/event-stream")
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert all(event.startswith("data: ") for event in events[:-1])
    text, finish, _, _ = reference_answer(runtime, messages)
    assert len(payloads) > 3  # text arrives in several chunks, not all at the end
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads) == text
    assert payloads[-1]["choices"][0]["finish_reason"] == finish and "usage" not in payloads[-1]


def test_system_and_assistant_turns_go_through_the_template(server, client, runtime):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        *image_messages("What shape?", "yellow triangle"),
        {"role": "assistant", "content": "A triangle."},
        {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]},
    ]
    response = client.chat.completions.create(model=server.model_name, messages=messages, temperature=0, max_tokens=8)
    assert response.choices[0].message.content == reference_answer(runtime, messages, max_tokens=8)[0]


def test_max_tokens_and_stop_strings(server, client, runtime):
    messages = [{"role": "user", "content": "Question number 0"}]
    full, _, _, _ = reference_answer(runtime, messages)
    short = client.chat.completions.create(model=server.model_name, messages=messages, temperature=0,
                                           max_completion_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert full.startswith(short.choices[0].message.content)
    stop = next(full[i:i + 2] for i in range(1, len(full) - 1) if "\ufffd" not in full[i:i + 2])
    expected = full[: full.find(stop)]
    for stream in (False, True):
        response = client.chat.completions.create(model=server.model_name, messages=messages, temperature=0,
                                                  max_tokens=MAX_TOKENS, stop=[stop, "never appears"], stream=stream)
        if stream:
            chunks = [chunk for chunk in response if chunk.choices]
            text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = response.choices[0].message.content, response.choices[0].finish_reason
        assert (text, finish) == (expected, "stop")


def test_seeded_sampling_is_reproducible_and_equals_generate(server, client, runtime):
    messages = [{"role": "user", "content": "Tell me a story"}]
    answers = [client.chat.completions.create(model=server.model_name, messages=messages, temperature=0.9, top_p=0.9,
                                              seed=7, max_tokens=MAX_TOKENS).choices[0].message.content
               for _ in range(2)]
    defaults = runtime.generation_defaults  # hub-style: top_k 64 comes from generation_config.json
    sampling = Sampling(max_new_tokens=MAX_TOKENS, greedy=False, temperature=0.9, top_k=defaults["top_k"], top_p=0.9,
                        seed=7, stop_token_ids=runtime.config.stop_token_ids)
    assert answers[0] == answers[1] == reference_answer(runtime, messages, sampling=sampling)[0]


def test_models_and_health(server, client):
    assert [model.id for model in client.models.list().data] == [server.model_name]
    assert client.models.retrieve(server.model_name).id == server.model_name
    # vLLM's max_model_len: the positions one request may take (the scheduler's rows), which clients size by
    assert client.models.list().data[0].max_model_len == server.scheduler.max_length > 0
    status, _, raw = post_raw(server, b"", path="/health", method="GET")
    health = json.loads(raw)
    assert status == 200 and health["status"] == "ok" and health["model"] == server.model_name
    assert health["max_batch_size"] == 4


def test_concurrent_requests_are_batched_and_answered_correctly(server, runtime):
    prompts = ["Question number 1", "Is it a red circle or a blue square?", "hi", "What colour is the sky"]
    before = len(server.test_log.lines())
    answers: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def ask(index: int) -> None:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0) as own:
            barrier.wait(timeout=30)
            answers[index] = own.chat.completions.create(
                model=server.model_name, messages=[{"role": "user", "content": prompts[index]}], temperature=0,
                max_tokens=MAX_TOKENS).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == [reference_answer(runtime, [{"role": "user", "content": p}])[0] for p in prompts]
    assert server.scheduler.stats()["largest_batch"] > 1
    logged = server.test_log.lines_after(before, len(prompts))[-len(prompts):]
    assert sum(bool(re.search(r"200 .* batch=[234] ", line)) for line in logged) >= 2, logged


def test_one_log_line_per_request(server, client):
    before = len(server.test_log.lines())
    client.models.list()
    post_json(server, {"messages": []})
    lines = server.test_log.lines_after(before, 2)
    assert len(lines) == 2
    assert '"GET /v1/models" 200' in lines[0] and '"POST /v1/chat/completions" 400' in lines[1]


def test_binds_loopback_by_default(runtime):
    assert ServerSettings().host == "127.0.0.1"
    quiet = ChatCompletionServer(runtime, ServerSettings(port=0), log=io.StringIO())
    try:
        assert quiet.address[0] == "127.0.0.1"
    finally:
        quiet.stop()


def test_listens_on_ipv6_loopback_when_asked(runtime):
    """``--host ::1``: an IPv6 socket, and its URL with the address in brackets, which clients can reach."""
    import urllib.request

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    with ChatCompletionServer(runtime, ServerSettings(host="::1", port=0), log=io.StringIO()) as live:
        assert live.url.startswith("http://[::1]:")
        with urllib.request.urlopen(live.url + "/health", timeout=30) as response:
            assert response.status == 200


# ---------------------------------------------------------------------------------------------- refusals
def _with_image(url: str, count: int = 1) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for _ in range(count)]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "what?"}]}]}


BAD_REQUESTS = {
    "bad json": (b'{"messages": [', 400, "invalid_json"),
    "not an object": (b"[1, 2]", 400, "invalid_json"),
    "missing messages": ({"model": "tiny-gemma3"}, 400, "missing_required_parameter"),
    "empty messages": ({"messages": []}, 400, "invalid_value"),
    "n over the server's max_n": ({"messages": [{"role": "user", "content": "hi"}], "n": 9}, 400, "invalid_value"),
    "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value"),
    "bad part type": ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400,
                      "unsupported_content_type"),
    "roles not alternating": ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
                              400, "invalid_conversation"),
    "temperature out of range": ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400,
                                 "invalid_value"),
    "max_tokens over the limit": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS + 1},
                                  400, "invalid_value"),
    "unsupported tools": ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "custom"}]}, 400,
                          "unsupported_parameter"),
    "logit_bias out of range": ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 101}}, 400,
                                "invalid_value"),
    "unknown model": ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    "image in bad base64": (_with_image("data:image/png;base64,@@@not-base64"), 400, "invalid_image_url"),
    "not an image": (_with_image("data:image/png;base64," + base64.b64encode(b"hello").decode()), 400,
                     "invalid_image"),
    "image too big in bytes": (_with_image(data_url(noise_image(200, 200))), 413, "image_too_large"),
    "image too big in pixels": (_with_image(data_url(Image.new("RGB", (400, 400), "white"))), 413, "image_too_large"),
    # past Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS), which it meets at open, before our check: the same 413
    "image past Pillow's limit": (_with_image("data:image/png;base64," + base64.b64encode(
        png_header(20_000, 20_000)).decode()), 413, "image_too_large"),
    "too many images": (_with_image(data_url(draw_picture()), count=3), 400, "too_many_images"),
    "file path without --allow-local-images": (_with_image("/etc/passwd"), 403, "local_images_not_allowed"),
    "file URL without --allow-local-images": (_with_image("file:///etc/hostname"), 403, "local_images_not_allowed"),
    "remote URL without --allow-remote-images": (_with_image("http://127.0.0.1:9/cat.png"), 403,
                                                 "remote_images_not_allowed"),
    "request body over the limit": ({"messages": [{"role": "user", "content": "x" * MAX_REQUEST_BYTES}]}, 413,
                                    "request_too_large"),
    # each of these was a 500 (or, for the vLLM field, silently ignored) before the compatibility bug hunt
    "seed past 64 bits": ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**64, "temperature": 1}, 400,
                          "invalid_value"),
    "JSON nested too deep": (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    "an integer of 5000 digits": (b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}", 400, "invalid_json"),
    "vLLM's truncate_prompt_tokens": ({"messages": [{"role": "user", "content": "hi"}],
                                       "truncate_prompt_tokens": 5}, 400, "unsupported_parameter"),
    "repetition_penalty of 0": ({"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 0}, 400,
                                "invalid_value"),
    "image URL that does not parse": (_with_image("http://[::1/cat.png"), 400, "invalid_image_url"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(server, case):
    body, status, code = BAD_REQUESTS[case]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got_status, content_type, answer = post_raw(server, raw)
    error = json.loads(answer)["error"]
    assert (got_status, error["code"]) == (status, code), error
    assert content_type == "application/json"
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    ok, reply = post_json(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok == 200 and reply["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "a\udc00", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": ["hi", "\ud800"], "max_tokens": 2}, "prompt[1]"),
    ("/tokenize", {"prompt": "a\ud83d"}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "bad_words": ["\ud800"]},
     "bad_words[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages[0].content[0].text"),
    ("/v1/responses", {"input": "hi", "instructions": "be \udfff"}, "instructions"),
])
def test_a_lone_surrogate_anywhere_is_a_400_naming_its_field(server, path, body, param):
    """JSON's ``\\ud800`` escapes are valid JSON that Python reads as strings that are not Unicode text: the tokenizer
    failed on them deep inside (a 500); every endpoint now refuses them, naming where."""
    status, reply = post_json(server, body, path=path)
    assert (status, reply["error"]["param"], reply["error"]["code"]) == (400, param, "invalid_value"), reply
    assert "lone surrogate" in reply["error"]["message"]


def test_the_openai_client_sees_the_errors_as_its_own_exceptions(server, client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "hi"}], n=9)
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model=server.model_name, messages=_with_image("picture.png")["messages"])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="another-model", messages=[{"role": "user", "content": "hi"}])


def test_unknown_routes_and_methods(server):
    assert post_raw(server, b"", path="/v2/nothing", method="GET")[0] == 404
    status, _, raw = post_raw(server, b"", path="/v1/chat/completions", method="GET")
    assert status == 405 and json.loads(raw)["error"]["code"] == "method_not_allowed"


def test_a_client_that_hangs_up_mid_stream_does_not_stop_the_server(server):
    connection = http.client.HTTPConnection(*server.address, timeout=60)
    connection.request("POST", "/v1/chat/completions", body=json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": MAX_TOKENS}),
        headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    response.read(20)
    connection.close()
    status, reply = post_json(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 200


def test_a_connection_reset_between_requests_is_a_log_line_not_a_traceback(server, capsys):
    """A client that resets its connection (RST) while the server waits for its next request line used to make
    the standard library print "Exception occurred during processing of request" and a traceback on stderr."""
    import socket
    import struct

    connection = socket.create_connection(server.address, timeout=10)
    connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200" in connection.recv(4096).split(b"\r\n", 1)[0]
    time.sleep(0.3)  # the server is back at reading the next request line
    connection.sendall(b"GET /hea")  # half a request line, then a reset
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()
    deadline = time.monotonic() + 10
    while not any("connection ended (ConnectionResetError)" in line for line in server.test_log.lines()):
        assert time.monotonic() < deadline, server.test_log.lines()[-5:]
        time.sleep(0.05)
    assert "Exception occurred" not in capsys.readouterr().err
    assert post_json(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})[0] == 200


# ---------------------------------------------------------------------------------------------- image sources
@pytest.fixture
def image_dir(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    draw_picture("purple star").save(allowed / "sub" / "star.png")
    draw_picture("purple star").save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", allowed / "link.png")
    return allowed


@pytest.fixture
def picture_site(image_dir):
    """A plain static HTTP server on 127.0.0.1 serving the allowed directory."""
    handler = functools.partial(_QuietStaticHandler, directory=str(image_dir))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=site.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()
    site.server_close()


class _QuietStaticHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_local_and_remote_images_when_allowed(runtime, image_dir, picture_site):
    settings = ServerSettings(port=0, max_tokens=MAX_TOKENS, images=LIMITS, allow_local_images=image_dir,
                              allow_remote_images=True)
    expected = reference_answer(runtime, image_messages("what?", "purple star"))[0]
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        def ask(url):
            return post_json(live, {**_with_image(url), "temperature": 0, "max_tokens": MAX_TOKENS})

        for url in ("sub/star.png", str(image_dir / "sub" / "star.png"), f"file://{image_dir}/sub/star.png",
                    f"{picture_site}/sub/star.png"):
            status, reply = ask(url)
            assert status == 200, reply
            assert reply["choices"][0]["message"]["content"] == expected
        for url in ("../secret.png", "sub/../../secret.png", str(image_dir.parent / "secret.png"), "link.png"):
            status, reply = ask(url)
            assert (status, reply["error"]["code"]) == (403, "path_not_allowed"), url
        status, reply = ask("sub/missing.png")
        assert (status, reply["error"]["code"]) == (400, "image_not_found")
        status, reply = ask(f"{picture_site}/sub/missing.png")
        assert (status, reply["error"]["code"]) == (400, "image_download_failed")


def test_text_only_checkpoint_refuses_images_with_422(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / "text", text_only=True)
    text_runtime = InferenceRuntime.load(directory, device="cpu", dtype="float32")
    with ChatCompletionServer(text_runtime, ServerSettings(port=0, max_tokens=4), log=io.StringIO()) as live:
        status, reply = post_json(live, _with_image(data_url(draw_picture())))
        assert (status, reply["error"]["code"]) == (422, "images_not_supported")
        status, reply = post_json(live, {"messages": [{"role": "user", "content": "hi"}], "temperature": 0})
        assert status == 200 and reply["usage"]["completion_tokens"] >= 1


def test_stop_fails_waiting_jobs_and_frees_the_port(runtime):
    scheduler = BatchScheduler(runtime)  # not started: only stop() can answer the queued job
    job = scheduler.submit(Job(prompt=runtime.encode_prompt("hi", []), sampling=runtime.sampling(max_new_tokens=2),
                               max_new_tokens=2))
    scheduler.stop()
    assert job.events.get(timeout=5) == ("error", "the server is shutting down")
    live = ChatCompletionServer(runtime, ServerSettings(port=0), log=io.StringIO()).start()
    address = live.address
    assert post_raw(live, b"", path="/health", method="GET")[0] == 200
    live.stop()
    assert not live.scheduler_alive()
    with pytest.raises(OSError):
        http.client.HTTPConnection(*address, timeout=5).request("GET", "/health")


def test_a_short_request_is_answered_while_its_batch_goes_on(runtime):
    """Rows keep their own token limits in a shared batch, and each is reported done at its own end."""
    events: list[tuple[str, int]] = []
    rows = [
        Row(prompt=runtime.encode_prompt(text, []), max_new_tokens=limit,
            on_text=lambda _, i=i: events.append(("text", i)), on_finish=lambda _, i=i: events.append(("done", i)))
        for i, (text, limit) in enumerate([("Question number 0", 2), ("Question number 1", MAX_TOKENS)])
    ]
    short, long = runtime.complete(rows, runtime.sampling(max_new_tokens=1, greedy=True))
    assert (short.finish_reason, short.completion_tokens) == ("length", 2)
    assert long.completion_tokens > 2
    assert events.index(("done", 0)) < max(i for i, event in enumerate(events) if event == ("text", 1))
    assert events[-1] == ("done", 1) and events.count(("done", 0)) == 1
    for text, completion in (("Question number 0", short), ("Question number 1", long)):
        alone = reference_answer(runtime, [{"role": "user", "content": text}], completion.completion_tokens)
        assert completion.text == alone[0]


# ---------------------------------------------------------------------------------------------- continuous batching
def slowed(monkeypatch, server, seconds: float) -> None:
    """Make each decode step of the server's engine take ``seconds`` more, so that arrival moments are certain."""
    engine = server.scheduler.engine
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)


def test_requests_join_a_running_batch_and_each_gets_its_solo_answer(server, runtime, monkeypatch):
    """Greedy requests of different lengths, with and without images, each sent when the previous one has
    streamed its first token: they join the running batch between decode steps (5 requests, 4 slots), and each
    answer equals ``generate`` on that request alone."""
    conversations = [
        [{"role": "user", "content": "Question number 3"}],
        image_messages("Describe it in detail please", "red circle"),
        [{"role": "user", "content": "hi"}],
        image_messages("What shape?", "blue square and green star"),
        [{"role": "user", "content": "Tell me a long story about the sea and the sky, please"}],
    ]
    expected = [reference_answer(runtime, messages) for messages in conversations]
    slowed(monkeypatch, server, 0.03)
    before = server.scheduler.stats()["joined_running"]
    answers: list = [None] * len(conversations)
    started = [threading.Event() for _ in conversations]

    def ask(index: int) -> None:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0) as own:
            stream = own.chat.completions.create(model=server.model_name, messages=conversations[index],
                                                 temperature=0, max_tokens=MAX_TOKENS, stream=True)
            chunks = []
            for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == 2:  # the role chunk, then the first token's: it is decoding now
                    started[index].set()
            started[index].set()
            answers[index] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    threads = []
    for index in range(len(conversations)):
        threads.append(threading.Thread(target=ask, args=(index,)))
        threads[-1].start()
        assert started[index].wait(30)
    for thread in threads:
        thread.join(60)
    assert answers == [text for text, _, _, _ in expected]
    # each one joins while the one before it still decodes (if that one has more than a few tokens to go)
    long_enough = sum(tokens > 3 for _, _, _, tokens in expected[:-1])
    assert server.scheduler.stats()["joined_running"] - before >= long_enough


def test_a_full_queue_answers_429_and_the_server_goes_on(runtime, monkeypatch):
    settings = ServerSettings(port=0, max_batch_size=1, max_waiting=1, batch_wait_s=0, max_tokens=MAX_TOKENS)
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        slowed(monkeypatch, live, 0.05)
        body = {"messages": [{"role": "user", "content": "Question number 1"}], "temperature": 0,
                "max_tokens": MAX_TOKENS}
        replies: dict = {}

        def send(name):
            replies[name] = post_json(live, body)

        def wait_for(key, value):
            deadline = time.monotonic() + 30
            while live.scheduler.stats()[key] != value and time.monotonic() < deadline:
                time.sleep(0.005)
            assert live.scheduler.stats()[key] == value

        first = threading.Thread(target=send, args=("running",))
        first.start()
        wait_for("running", 1)
        second = threading.Thread(target=send, args=("waiting",))
        second.start()
        wait_for("waiting", 1)
        status, reply = post_json(live, body)
        assert (status, reply["error"]["code"], reply["error"]["type"]) == (429, "server_busy", "rate_limit_error")
        first.join(60)
        second.join(60)
        assert replies["running"][0] == replies["waiting"][0] == 200
        assert replies["running"][1]["choices"][0]["message"] == replies["waiting"][1]["choices"][0]["message"]


# ---------------------------------------------------------------------------------------------- client compatibility
def test_harmless_fields_are_accepted_and_the_limit_names_the_field_sent(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": "u-1", "store": False,
            "metadata": {"k": "v"}, "parallel_tool_calls": False, "seed": -(2**63), "temperature": 1,
            "repetition_penalty": 1.0, "stream": True, "stream_options": {"include_usage": None}}
    status, content_type, raw = post_raw(server, json.dumps(body).encode())
    assert status == 200 and content_type.startswith("text/event-stream"), raw
    status, reply = post_json(server, {"messages": [{"role": "user", "content": "hi"}],
                                       "max_completion_tokens": MAX_TOKENS + 1})
    assert (status, reply["error"]["param"]) == (400, "max_completion_tokens")
    assert reply["error"]["message"].startswith("max_completion_tokens=")


def test_head_options_and_bad_headers_get_json_not_the_stdlib_html_page(server):
    status, content_type, raw = post_raw(server, None, path="/health", method="HEAD")
    assert (status, content_type, raw) == (200, "application/json", b"")
    status, content_type, raw = post_raw(server, None, path="/v1/chat/completions", method="OPTIONS")
    assert (status, content_type, json.loads(raw)["error"]["code"]) == (405, "application/json",
                                                                         "method_not_allowed")
    status, content_type, raw = post_raw(server, None, headers={"Content-Length": "-1"})
    assert (status, content_type, json.loads(raw)["error"]["code"]) == (400, "application/json", "invalid_request")


def test_an_error_echoing_a_lone_surrogate_is_still_answered(server):
    """A model name holding "\\ud800" (which cannot be encoded as UTF-8: echoed, it used to fail the response and
    drop the connection without an answer) is answered: a 400 naming the field, as every lone surrogate is."""
    status, reply = post_json(server, {"model": "m\ud800", "messages": [{"role": "user", "content": "hi"}]})
    assert (status, reply["error"]["code"], reply["error"]["param"]) == (400, "invalid_value", "model")


def test_models_retrieve_finds_a_served_name_with_a_slash(runtime):
    """The openai client percent-encodes the id in GET /v1/models/{model} ("google/x" -> "google%2Fx")."""
    settings = ServerSettings(port=0, model_name="google/tiny gemma3", max_tokens=2)
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        with openai.OpenAI(base_url=live.url + "/v1", api_key="unused", timeout=60, max_retries=0) as own:
            assert own.models.retrieve("google/tiny gemma3").id == "google/tiny gemma3"
            with pytest.raises(openai.NotFoundError):
                own.models.retrieve("google/other")


def test_a_non_streaming_client_that_hangs_up_frees_its_slot(runtime, monkeypatch):
    """Without stop tokens the answer runs to max_tokens (about 8 s here); the client leaves after a moment, and
    its slot must be free within a second or so, not after the whole answer nobody will read."""
    settings = ServerSettings(port=0, max_batch_size=1, batch_wait_s=0, max_tokens=800)
    sampling = runtime.sampling
    monkeypatch.setattr(runtime, "sampling", lambda **kw: dataclasses.replace(sampling(**kw), stop_token_ids=()))
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        slowed(monkeypatch, live, 0.01)
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 800})
        client = socket.create_connection(live.address, timeout=10)
        client.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        deadline = time.monotonic() + 10
        while live.scheduler.stats()["running"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert live.scheduler.stats()["running"] == 1
        client.close()
        left = time.monotonic()
        while live.scheduler.stats()["running"] and time.monotonic() - left < 3:
            time.sleep(0.02)
        assert live.scheduler.stats()["running"] == 0, "the hung-up client's answer is still being decoded"
        assert live.scheduler.stats()["steps"] < 400
        status, reply = post_json(live, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 200 and reply["usage"]["completion_tokens"] == 2


def test_image_sources_refuse_odd_urls_with_4xx_and_accept_an_upper_case_data_scheme(tmp_path):
    fetcher = ImageFetcher(LIMITS, local_dir=tmp_path, allow_remote=True)
    url = data_url(draw_picture())
    assert fetcher.fetch("DATA:" + url.removeprefix("data:"), "p").size == draw_picture().size
    for bad in ("a\x00b.png", "x" * 5000 + ".png", "http://127.0.0.1:notaport/cat.png", "http://a b.example/c.png"):
        with pytest.raises(ApiError) as refused:
            fetcher.fetch(bad, "p")
        assert refused.value.status == 400 and refused.value.param == "p", bad


def test_requests_ended_by_stopping_the_server_get_503_unavailable(runtime):
    """Ctrl-C with requests in flight: the running and the waiting ones, streamed or not, chat, legacy or Responses,
    are all answered 503 ``unavailable`` (not ``generation_failed``, which says the generation itself went wrong)."""
    settings = ServerSettings(port=0, max_batch_size=1, max_tokens=2000)
    live = ChatCompletionServer(runtime, settings, log=io.StringIO()).start()
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "temperature": 0,
            "stop": ["never"]}
    legacy = {"prompt": "hi", "max_tokens": 2000, "temperature": 0, "stop": ["never"]}
    requests = [("/v1/chat/completions", {**chat, "stream": stream}) for stream in (False, True, False, True)]
    requests += [("/v1/completions", {**legacy, "stream": stream}) for stream in (False, True)]
    responses = {"input": "hi", "max_output_tokens": 2000, "temperature": 0, "stop": ["never"]}
    requests += [("/v1/responses", {**responses, "stream": stream}) for stream in (False, True)]
    replies: dict[int, tuple[int, bytes]] = {}

    def send(index: int, path: str, body: dict) -> None:
        status, _, raw = post_raw(live, json.dumps(body).encode(), path=path)
        replies[index] = (status, raw)

    threads = [threading.Thread(target=send, args=(i, *request)) for i, request in enumerate(requests)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while True:  # one running (the tiny model's greedy answer is ~1000 tokens), the others waiting for the slot
        health = json.loads(post_raw(live, b"", path="/health", method="GET")[2])
        if health["running"] == 1 and health["waiting"] == len(requests) - 1:
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.02)
    live.stop()
    for thread in threads:
        thread.join(30)
    assert sorted(replies) == list(range(len(requests)))
    for index, (status, raw) in replies.items():
        if requests[index][1]["stream"]:  # the 200 stream ends with an error event
            assert status == 200
            events = [json.loads(line[len(b"data: "):]) for line in raw.splitlines()
                      if line.startswith(b"data: {")]
            if requests[index][0] == "/v1/responses":  # an error event, then response.failed
                assert [event["type"] for event in events[-2:]] == ["error", "response.failed"]
                assert events[-2]["code"] == "unavailable"
            error = events[-1]["response"]["error"] if "response" in events[-1] else events[-1]["error"]
        else:
            assert status == 503, raw
            error = json.loads(raw)["error"]
        assert error["code"] == "unavailable", (index, error)


def raw_exchange(server, request: bytes) -> tuple[int, dict]:
    """Send ``request`` (a whole HTTP request, as bytes) and read the status and JSON body of the answer."""
    with socket.create_connection(server.address, timeout=60) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def test_a_chunked_request_body_is_read_as_uvicorn_reads_it(server):
    """``Transfer-Encoding: chunked`` (vLLM's uvicorn takes it; it was a 411): the same answer as with a
    Content-Length; past the byte limit a 413, a malformed chunk a 400, no length at all a 411."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)]
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\nX-Trailer: 1\r\n\r\n"
    status, reply = raw_exchange(server, head + chunked)
    assert status == 200, reply
    expected = post_json(server, json.loads(body))[1]
    assert reply["choices"][0]["message"] == expected["choices"][0]["message"]
    big = b"x" * (MAX_REQUEST_BYTES + 1)
    status, reply = raw_exchange(server, head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big))
    assert (status, reply["error"]["code"]) == (413, "request_too_large")
    status, reply = raw_exchange(server, head + b"zz\r\nabc\r\n0\r\n\r\n")
    assert (status, reply["error"]["code"]) == (400, "invalid_request")
    status, reply = raw_exchange(server, head.replace(b"Transfer-Encoding: chunked", b"X-No-Length: 1"))
    assert (status, reply["error"]["code"]) == (411, "length_required")
