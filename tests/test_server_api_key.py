"""``gemma3vl serve --api-key`` (or ``GEMMA3VL_API_KEY``): every route but ``/health`` needs the key as OpenAI
clients send it (``Authorization: Bearer KEY``), through the official ``openai`` client and raw HTTP, against a
tiny random model."""

from __future__ import annotations

import io
import json

import openai
import pytest

from gemma3vl.infer.runtime import InferenceRuntime
from gemma3vl.infer.server import ChatCompletionServer, ServerSettings
from gemma3vl.tiny import write_tiny_checkpoint
from test_server import post_raw

KEY = "sk-test-4f1c"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = write_tiny_checkpoint(tmp_path_factory.mktemp("key") / "tiny")
    runtime = InferenceRuntime.load(directory, device="cpu", dtype="float32")
    settings = ServerSettings(port=0, max_batch_size=2, max_tokens=4, api_key=KEY)
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        yield live


def test_the_key_is_needed_everywhere_but_health(server):
    assert post_raw(server, None, "/health", method="GET")[0] == 200
    for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/chat/completions", b"{}")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
            status, _, raw = post_raw(server, body, path, headers, method)
            error = json.loads(raw)["error"]
            assert status == 401 and error["code"] == "invalid_api_key" and "--api-key" in error["message"]
    status, _, raw = post_raw(server, None, "/v1/models", {"Authorization": f"bearer {KEY}"}, "GET")
    assert status == 200 and json.loads(raw)["data"][0]["id"] == server.model_name


def test_the_openai_client_with_and_without_the_key(server):
    base = server.url + "/v1"
    messages = [{"role": "user", "content": "hi"}]
    with openai.OpenAI(base_url=base, api_key="wrong", timeout=60, max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=server.model_name, messages=messages)
    with openai.OpenAI(base_url=base, api_key=KEY, timeout=60, max_retries=0) as client:
        reply = client.chat.completions.create(model=server.model_name, messages=messages, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert [model.id for model in client.models.list()] == [server.model_name]
