"""``GET /metrics``: Prometheus' text format, read back with ``prometheus_client``'s own parser. Requests of every
kind are counted by route and status; the prompt and generated tokens equal the ``usage`` the answers reported;
each finished choice is counted by finish reason; the latency histograms count each generation request once."""

from __future__ import annotations

import http.client
import io
import time

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gemma3vl.infer.metrics import route_label
from gemma3vl.infer.server import ChatCompletionServer, ServerSettings
from test_server import image_messages, post_json

MAX_TOKENS = 4


@pytest.fixture(scope="module")
def server(runtime):
    settings = ServerSettings(port=0, max_batch_size=2, batch_wait_s=0.01, max_tokens=MAX_TOKENS, max_n=2)
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        yield live


def scrape(server) -> tuple[str, dict[tuple[str, tuple], float]]:
    connection = http.client.HTTPConnection(*server.address, timeout=30)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        text = response.read().decode()
        assert response.status == 200
        content_type = response.getheader("Content-Type")
    finally:
        connection.close()
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples}
    return content_type, samples


def get(server, path: str) -> int:
    connection = http.client.HTTPConnection(*server.address, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_metrics_count_requests_tokens_and_latencies(server):
    usages, choices = [], 0
    status, reply = post_json(server, {"messages": image_messages(), "max_tokens": MAX_TOKENS, "temperature": 0})
    assert status == 200
    usages.append(reply["usage"])
    choices += 1
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        chunks = list(client.chat.completions.create(
            model=server.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS,
            stream=True, stream_options={"include_usage": True}, seed=1))
        usages.append(chunks[-1].usage.model_dump())
        legacy = client.completions.create(model=server.model_name, prompt="Tell me", max_tokens=MAX_TOKENS, n=2,
                                           seed=2)
        usages.append(legacy.usage.model_dump())
    choices += 1 + 2
    assert post_json(server, {"messages": []})[0] == 400
    assert get(server, "/v1/responses/resp_missing") == 404
    assert get(server, "/no/such/route") == 404
    assert get(server, f"/v1/models/{server.model_name}") == 200

    expected_requests = {("/v1/chat/completions", "200"): 2, ("/v1/chat/completions", "400"): 1,
                         ("/v1/completions", "200"): 1, ("/v1/responses/{id}", "404"): 1, ("other", "404"): 1,
                         ("/v1/models/{id}", "200"): 1}
    deadline = time.monotonic() + 10  # (a request is counted as its log line is written, after its answer)
    while True:
        content_type, samples = scrape(server)
        counted = {key: samples.get(("gemma3vl_http_requests_total", (("route", key[0]), ("status", key[1]))))
                   for key in expected_requests}
        if counted == expected_requests or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert counted == expected_requests
    assert content_type.startswith("text/plain; version=0.0.4")
    assert samples[("gemma3vl_prompt_tokens_total", ())] == sum(u["prompt_tokens"] for u in usages)
    assert samples[("gemma3vl_generation_tokens_total", ())] == sum(u["completion_tokens"] for u in usages)
    finished = sum(value for (name, _), value in samples.items() if name == "gemma3vl_request_success_total")
    assert finished == choices
    assert samples[("gemma3vl_time_to_first_token_seconds_count", ())] == 3
    assert samples[("gemma3vl_e2e_request_latency_seconds_count", ())] == 3
    assert samples[("gemma3vl_e2e_request_latency_seconds_sum", ())] > 0
    assert samples[("gemma3vl_num_requests_running", ())] == 0
    assert samples[("gemma3vl_num_requests_waiting", ())] == 0


def test_route_labels_keep_ids_out():
    assert route_label("/v1/chat/completions") == "/v1/chat/completions"
    assert route_label("/v1/responses/resp_123/input_items") == "/v1/responses/{id}/input_items"
    assert route_label("/v1/models/google%2Fgemma") == "/v1/models/{id}"
    assert route_label("/../etc/passwd") == "other"


def test_metrics_need_the_api_key_when_one_is_set(runtime):
    settings = ServerSettings(port=0, max_tokens=2, api_key="sk-test")
    with ChatCompletionServer(runtime, settings, log=io.StringIO()) as live:
        assert get(live, "/metrics") == 401
        connection = http.client.HTTPConnection(*live.address, timeout=30)
        try:
            connection.request("GET", "/metrics", headers={"Authorization": "Bearer sk-test"})
            response = connection.getresponse()
            assert response.status == 200 and b"gemma3vl_http_requests_total" in response.read()
        finally:
            connection.close()
