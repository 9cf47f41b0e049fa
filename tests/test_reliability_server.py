"""The server under load: 200 requests at once against the tiny model on CPU, on 127.0.0.1.

With 8 slots and at most 16 requests waiting, most of the 200 must be refused (a quarter of them stream);
what matters is that every request gets an answer (200 with a completion, or 429 in OpenAI's error format),
none hangs, none is dropped or reset, no 5xx; that the answers given equal a request sent alone; that the
server is healthy afterwards; and that its threads and memory come back to where they were before the burst.
"""

from __future__ import annotations

import gc
import http.client
import io
import json
import threading
import time


from gemma3vl.infer.server import ChatCompletionServer, ServerSettings

REQUESTS = 200
MAX_TOKENS = 3


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def post(url_host: str, port: int, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
    """(status, JSON reply); a streamed answer is put together into the shape of a whole one."""
    connection = http.client.HTTPConnection(url_host, port, timeout=timeout)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
        if not response.getheader("Content-Type", "").startswith("text/event-stream"):
            return response.status, json.loads(raw)
        events = [line[len("data: "):] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(event) for event in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        return response.status, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
    finally:
        connection.close()


def eventually(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"still not true after {timeout_s} s"
        time.sleep(0.02)


def test_200_concurrent_requests_are_all_answered_or_refused_and_nothing_leaks(runtime):
    settings = ServerSettings(port=0, max_batch_size=8, max_waiting=16, batch_wait_s=0.01, max_tokens=MAX_TOKENS,
                              max_sequence_length=256)
    log = io.StringIO()
    with ChatCompletionServer(runtime, settings, log=log) as live:
        host, port = live.address
        body = {"messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0,
                "max_tokens": MAX_TOKENS}
        alone = post(host, port, body)  # also warms the engine up before the baseline is taken
        assert alone[0] == 200
        gc.collect()
        threads_before, rss_before = threading.active_count(), rss_bytes()

        results: list = [None] * REQUESTS
        start = threading.Barrier(REQUESTS)

        def client(index: int) -> None:
            start.wait()
            try:
                results[index] = post(host, port, {**body, "stream": index % 4 == 0})  # a quarter streamed
            except Exception as exc:  # a reset, a timeout, a half answer: counted as lost
                results[index] = ("lost", f"{type(exc).__name__}: {exc}")

        clients = [threading.Thread(target=client, args=(i,)) for i in range(REQUESTS)]
        started = time.monotonic()
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(120)
        elapsed = time.monotonic() - started
        assert not any(thread.is_alive() for thread in clients), "a request is still waiting after 120 s"

        statuses = [r[0] for r in results]
        lost = [r for r in results if r[0] == "lost"]
        assert not lost, f"{len(lost)} of {REQUESTS} requests lost, e.g. {lost[0][1]}"
        assert set(statuses) <= {200, 429}, sorted(set(statuses))
        answered = [reply for status, reply in results if status == 200]
        refused = [reply for status, reply in results if status == 429]
        assert len(answered) >= settings.max_batch_size and refused, (len(answered), len(refused))
        for reply in answered:  # same prompt, greedy: every answer is the one given to the request alone
            assert reply["choices"][0]["message"]["content"] == alone[1]["choices"][0]["message"]["content"]
        for reply in refused:
            assert reply["error"]["code"] == "server_busy" and reply["error"]["type"] == "rate_limit_error"
        # One log line per request, refused ones too (a line is written just after its response is sent).
        eventually(lambda: len(log.getvalue().splitlines()) >= REQUESTS + 1)

        # healthy afterwards: the slots free themselves (a row is released just after its answer is sent) and
        # the next request is answered as before
        def idle() -> bool:
            health = http.client.HTTPConnection(host, port, timeout=10)
            health.request("GET", "/health")
            stats = json.loads(health.getresponse().read())
            health.close()
            return stats["status"] == "ok" and stats["waiting"] == 0 and stats["running"] == 0

        eventually(idle)
        after = post(host, port, body)
        assert after[0] == 200 and after[1]["choices"] == alone[1]["choices"]

        # threads and memory back near where they were (handler threads end with their connections)
        eventually(lambda: threading.active_count() <= threads_before)
        del results, answered, refused, clients
        gc.collect()
        grown = rss_bytes() - rss_before
        assert grown < 64 * 2**20, f"resident memory grew by {grown / 2**20:.0f} MiB after the burst"
    print(f"{REQUESTS} requests in {elapsed:.1f}s: {statuses.count(200)} answered, {statuses.count(429)} refused; "
          f"resident memory {grown / 2**20:+.1f} MiB")
