"""``GET /metrics``: the server's counters in Prometheus' text format (``prometheus_client``), for dashboards and
alerts, named as vLLM names its own (``vllm:`` there, ``gemma3vl_`` here):

* ``gemma3vl_http_requests_total{route, status}``: requests answered, by route (ids in paths replaced by ``{id}``;
  routes this server does not have count as ``other``) and HTTP status;
* ``gemma3vl_prompt_tokens_total``, ``gemma3vl_generation_tokens_total``: the tokens of the prompts generation
  requests were admitted with (once per prompt, images' soft tokens included) and of every answer (each choice's,
  stop tokens included, as ``usage`` counts them);
* ``gemma3vl_request_success_total{finished_reason}``: answers (choices) ended, by finish reason;
* ``gemma3vl_time_to_first_token_seconds``, ``gemma3vl_e2e_request_latency_seconds``: histograms, from the moment a
  request's job was queued to its first token, and to its last choice's end;
* ``gemma3vl_num_requests_running``, ``gemma3vl_num_requests_waiting``: gauges, read from the scheduler when
  scraped.

Each server has its own registry (several servers in one process count apart).
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text exposition format
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/responses",
          "/tokenize", "/detokenize")
# ids in paths: /v1/models/NAME, /v1/responses/ID and /v1/responses/ID/input_items
_ID_ROUTES = ((re.compile(r"^/v1/models/[^/]+$"), "/v1/models/{id}"),
              (re.compile(r"^/v1/responses/[^/]+/input_items$"), "/v1/responses/{id}/input_items"),
              (re.compile(r"^/v1/responses/[^/]+$"), "/v1/responses/{id}"))
# seconds: from tens of milliseconds (a short answer on a GPU) to minutes (a long one on a CPU)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


def route_label(path: str) -> str:
    """The ``route`` label of a request path: the route itself, with ids as ``{id}``, or ``other``."""
    if path in ROUTES:
        return path
    for pattern, label in _ID_ROUTES:
        if pattern.match(path):
            return label
    return "other"


class _SchedulerGauges:
    """The running and waiting requests, read when Prometheus scrapes (a custom collector)."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.stats = stats

    def collect(self):
        stats = self.stats()
        yield GaugeMetricFamily("gemma3vl_num_requests_running", "Requests with rows in the running batch",
                                value=stats["running"])
        yield GaugeMetricFamily("gemma3vl_num_requests_waiting", "Requests waiting for a slot",
                                value=stats["waiting"])


class ServingMetrics:
    """One server's metrics (module docstring); ``stats``: the scheduler's ``stats()``."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.http_requests = Counter("gemma3vl_http_requests", "HTTP requests answered, by route and status",
                                     ["route", "status"], registry=registry)
        self.prompt_tokens = Counter("gemma3vl_prompt_tokens", "Prompt tokens of admitted generation requests",
                                     registry=registry)
        self.generation_tokens = Counter("gemma3vl_generation_tokens", "Tokens generated (every choice)",
                                         registry=registry)
        self.request_success = Counter("gemma3vl_request_success", "Answers (choices) ended, by finish reason",
                                       ["finished_reason"], registry=registry)
        self.time_to_first_token = Histogram("gemma3vl_time_to_first_token_seconds",
                                             "From queueing to the first token", buckets=LATENCY_BUCKETS,
                                             registry=registry)
        self.e2e_latency = Histogram("gemma3vl_e2e_request_latency_seconds",
                                     "From queueing to the last choice's end", buckets=LATENCY_BUCKETS,
                                     registry=registry)
        registry.register(_SchedulerGauges(stats))

    def answered(self, path: str, status: int) -> None:
        self.http_requests.labels(route=route_label(path), status=str(status)).inc()

    def admitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def first_token(self, queued_at: float) -> None:
        self.time_to_first_token.observe(max(0.0, time.monotonic() - queued_at))

    def choice_done(self, completion_tokens: int, finish_reason: str) -> None:
        self.generation_tokens.inc(completion_tokens)
        self.request_success.labels(finished_reason=finish_reason).inc()

    def job_done(self, queued_at: float) -> None:
        self.e2e_latency.observe(max(0.0, time.monotonic() - queued_at))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
