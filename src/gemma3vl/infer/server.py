"""``gemma3vl serve``: an OpenAI-compatible HTTP server (``/v1/chat/completions``, ``/v1/models``, ``/health``,
the legacy ``/v1/completions`` (:mod:`legacy_completions`), the Responses API's ``/v1/responses``
(:mod:`responses_api`), vLLM's ``/tokenize`` and ``/detokenize`` (:mod:`tokenize_api`), and Prometheus'
``/metrics`` (:mod:`metrics`)).

The standard library's ``http.server`` (a thread per connection), so the official ``openai`` client works
against it unchanged. Each handler thread validates its request
(:mod:`openai_protocol`), fetches and checks its images (:mod:`image_sources`), encodes the conversation
with the checkpoint's chat template, and queues it for the :class:`BatchScheduler`, the one thread that
runs the model (continuous batching: a request joins the running batch at the next decode step); answers come
back whole or as server-sent events. When ``max_waiting`` requests already wait for a slot, the next one gets
429 at once rather than an unbounded wait; a stopping server answers 503. Every limit is a setting, every refusal
is a JSON error in OpenAI's format, and the server keeps serving after any bad request. One line per
request goes to standard error.
"""

from __future__ import annotations

import hmac
import json
import queue
import select
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, NoReturn, TextIO

from gemma3vl.errors import Gemma3VLError
from gemma3vl.infer.completion import FINISH_CANCELLED, FINISH_ERROR, Completion
from gemma3vl.infer.conversation import EncodedPrompt, Turn
from gemma3vl.infer.image_sources import ImageFetcher, ImageLimits
from gemma3vl.infer.legacy_completions import TokenWidths, serve_completion
from gemma3vl.infer.logprobs import TokenLogprob, TokenTexts
from gemma3vl.infer.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gemma3vl.infer.metrics import ServingMetrics
from gemma3vl.infer.openai_protocol import (
    ApiError,
    ChatRequest,
    ImagePart,
    RequestMessage,
    choice_object,
    chunk_choice,
    chunk_object,
    completion_object,
    generation_error,
    logprobs_object,
    models_object,
    new_completion_id,
    now,
    parse_chat_request,
    prompt_logprobs_object,
    request_sampling,
    usage,
)
from gemma3vl.infer.prompt_options import PromptOptionError
from gemma3vl.infer.responses_api import KeptResponse, ResponseStore, input_items_page, serve_response
from gemma3vl.infer.scheduler import BatchScheduler, Job, QueueFull
from gemma3vl.infer.sampling import Sampling
from gemma3vl.infer.structured import Constraint, StructuredOutputUnavailable
from gemma3vl.infer.tokenize_api import serve_tokenizer
from gemma3vl.infer.tool_calls import (
    StreamedCalls,
    StreamedForcedCalls,
    ToolError,
    ToolUse,
    converse,
    forced_constraint,
    involves_tools,
    message_object,
    read_answer,
)

CHUNK_LINE_BYTES = 4096  # the longest chunk-size or trailer line a chunked request body may have
EVENT_POLL_S = 1.0  # how often a waiting handler checks that the scheduler is still alive
CLIENT_CHECK_S = 0.25  # how often a handler waiting for its answer checks that the client is still connected
DRAIN_SLACK_BYTES = 1 << 20


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None  # default: the checkpoint directory's name
    max_batch_size: int = 8  # rows decoded together (the engine's slots)
    batch_wait_s: float = 0.005  # when idle, how long the first request waits for others to start with
    max_waiting: int = 256  # requests waiting for a slot; more get 429
    max_sequence_length: int = 4096  # prompt + answer per row (the KV cache holds max_batch_size such rows)
    compile_decode: bool = False  # CUDA: decode steps as one compiled CUDA graph (compiled when the server starts)
    max_request_bytes: int = 64 * 2**20
    max_tokens: int = 2048  # the most a request may ask for, and what it gets when it asks for none
    max_n: int = 8  # the most choices (OpenAI's n) a request may ask for
    images: ImageLimits = field(default_factory=ImageLimits)
    allow_local_images: str | Path | None = None
    allow_remote_images: bool = False
    pan_and_scan: bool | None = None  # None: as the processor config says
    connection_timeout_s: float = 120.0
    # when set, every route but /health needs "Authorization: Bearer <api_key>" (what OpenAI clients send)
    api_key: str | None = None
    # origins whose web pages may call the server from a browser (CORS); "*": any; empty: none (no CORS headers)
    allowed_origins: tuple[str, ...] = ()
    # memory for the Responses API's kept responses (previous_response_id, GET/DELETE /v1/responses/ID); 0: none
    response_store_bytes: int = 64 * 2**20


@dataclass
class RequestRecord:
    """What the request log line reports."""

    status: int = 200
    detail: str = ""


class ChatCompletionServer:
    """The model runtime, the scheduler and the HTTP server, started and stopped together."""

    def __init__(self, runtime: Any, settings: ServerSettings | None = None, *, log: TextIO | None = None):
        self.runtime = runtime
        self.settings = settings or ServerSettings()
        self.model_name = self.settings.model_name or Path(runtime.model_dir).resolve().name
        self.created = now()
        self.images = ImageFetcher(self.settings.images, local_dir=self.settings.allow_local_images,
                                   allow_remote=self.settings.allow_remote_images)
        self.scheduler = BatchScheduler(runtime, max_batch_size=self.settings.max_batch_size,
                                        batch_wait_s=self.settings.batch_wait_s,
                                        max_waiting=self.settings.max_waiting,
                                        max_length=self.settings.max_sequence_length,
                                        compile=self.settings.compile_decode)
        self.metrics = ServingMetrics(self.scheduler.stats)
        self.scheduler.metrics = self.metrics
        self.token_texts = TokenTexts(runtime.tokenizer, runtime.lock)
        self.responses = ResponseStore(self.settings.response_store_bytes)
        self.completion_widths = TokenWidths(runtime.tokenizer, runtime.lock)  # /v1/completions' text_offset
        with runtime.lock:
            self.tokenizer_size = len(runtime.tokenizer)
        self._log_stream = log if log is not None else sys.stderr
        self._log_lock = threading.Lock()
        self._httpd = _HTTPServer((self.settings.host, self.settings.port), _Handler, self)
        self._thread: threading.Thread | None = None
        self.stopping = False

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"  # (an IPv6 address in brackets)

    def log(self, line: str) -> None:
        with self._log_lock:
            print(line, file=self._log_stream, flush=True)

    def start(self) -> "ChatCompletionServer":
        self.scheduler.start()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="gemma3vl-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end running generations, answer waiting requests with 503, close the socket."""
        self.stopping = True
        if self._thread is not None:
            self._httpd.shutdown()  # returns once serve_forever has; would wait forever if never started
        self.scheduler.stop()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "ChatCompletionServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def token_id_limit(self) -> int:
        """One past the largest token id a request may give: ids the model and the tokenizer both have."""
        return min(self.runtime.config.text.vocab_size, self.tokenizer_size)

    # ------------------------------------------------------------------------------------ request -> job
    def check_model(self, model: str | None) -> None:
        """A request's ``model``, when given, must be the one served: else OpenAI's 404."""
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def encode_messages(self, messages: list[RequestMessage], continue_final: bool = False,
                        tool_use: ToolUse | None = None, template_kwargs: dict[str, Any] | None = None,
                        processor_kwargs: dict[str, Any] | None = None, field: str = "messages") -> EncodedPrompt:
        """A conversation as the model reads it: its images counted against the limit and fetched, tools and tool
        messages written as plain turns (:func:`tool_calls.converse`), the chat template applied (with the
        generation prompt, or with ``continue_final`` the last, assistant, message left open; with the template
        variables of ``template_kwargs`` and the pan & scan settings of ``processor_kwargs``, vLLM's
        ``chat_template_kwargs`` and ``mm_processor_kwargs``); a 4xx naming ``field`` (the request's ``messages``,
        the Responses API's ``input``), or the option at fault, when that cannot be done."""
        crops = (processor_kwargs or {}).get("pan_and_scan_max_num_crops", 0)
        if crops > self.settings.images.max_images:  # (each crop is one more image for the model)
            raise ApiError(400, f"mm_processor_kwargs.pan_and_scan_max_num_crops={crops} is over this server's limit "
                                f"of {self.settings.images.max_images} images per request",
                           param="mm_processor_kwargs", code="invalid_value")
        converted = involves_tools(messages, tool_use)
        try:
            messages = [RequestMessage(m.role, m.parts, param=m.param if converted else None)
                        for m in converse(messages, tool_use)]
        except ToolError as exc:
            raise ApiError(400, str(exc), param=exc.param, code=exc.code) from None
        images = sum(isinstance(part, ImagePart) for message in messages for part in message.parts)
        if images > self.settings.images.max_images:
            raise ApiError(400, f"the request has {images} images, over the limit of "
                                f"{self.settings.images.max_images}", param=field, code="too_many_images")
        if images and not self.runtime.config.is_vision_language:
            raise ApiError(422, "this is a text-only Gemma 3 checkpoint: it cannot take images",
                           param=field, code="images_not_supported")
        turns = [
            Turn(message.role, [self.images.fetch(p.url, p.param) if isinstance(p, ImagePart) else p
                                for p in message.parts], label=message.param)
            for message in messages
        ]
        try:
            return self.runtime.encode_conversation(turns, pan_and_scan=self.settings.pan_and_scan,
                                                    continue_final=continue_final, template_kwargs=template_kwargs,
                                                    processor_kwargs=processor_kwargs)
        except PromptOptionError as exc:
            raise ApiError(400, str(exc), param=exc.field, code="invalid_value") from None
        except Gemma3VLError as exc:
            raise ApiError(400, str(exc), param=field, code="invalid_conversation") from None

    def prepare(self, request: ChatRequest) -> Job:
        """Check limits, fetch images, encode the conversation, and make the scheduler job."""
        settings = self.settings
        self.check_model(request.model)
        if request.n > settings.max_n:
            raise ApiError(400, f"n={request.n} is over this server's limit of {settings.max_n}", param="n",
                           code="invalid_value")
        if request.max_tokens is not None and request.max_tokens > settings.max_tokens:
            raise ApiError(400, f"{request.max_tokens_param}={request.max_tokens} is over this server's limit of "
                                f"{settings.max_tokens}", param=request.max_tokens_param, code="invalid_value")
        constraint = self.constraint(request)  # (checked before any image is fetched)
        prompt = self.encode_messages(request.messages, request.continue_final_message, request.tool_use,
                                      request.template_kwargs, request.processor_kwargs, request.messages_param)
        context = self.scheduler.max_length
        room = context - prompt.length
        max_tokens = request.max_tokens if request.max_tokens is not None else min(settings.max_tokens, room)
        if max_tokens > room or room < 1:
            asked = (f" and {request.max_tokens_param} asks for {max_tokens} more" if request.max_tokens is not None
                     else ", leaving no room for an answer")
            raise ApiError(400, f"This server's maximum context length is {context} tokens; "
                                f"the {request.messages_param} take{'s' if request.messages_param == 'input' else ''} "
                                f"{prompt.length}{asked}.", param=request.messages_param,
                           code="context_length_exceeded")
        sampling = self.constrained(request_sampling(self.runtime, request, max_tokens), request, constraint)
        return Job(prompt=prompt, sampling=sampling, max_new_tokens=max_tokens, stop_strings=request.stop,
                   n=request.n, logprobs=request.top_logprobs if request.logprobs else None,
                   prompt_logprobs=request.prompt_logprobs)

    @staticmethod
    def constraint(request: ChatRequest) -> Constraint | None:
        """The request's one structured-output constraint: ``response_format`` (the Responses API's ``text.format``)
        JSON, vLLM's ``guided_*`` / ``structured_outputs``, or a forced tool call's grammar (``tool_choice``
        ``required`` or a named function); two of them are a 400 naming the second."""
        given = [constraint for constraint in (
            None if request.json_schema is None else Constraint("json", request.json_schema, "response_format"),
            request.guided,
        ) if constraint is not None]
        if len(given) > 1:
            raise ApiError(400, f"give one structured-output constraint, not '{given[0].param}' and "
                                f"'{given[1].param}'", param=given[1].param, code="invalid_value")
        try:
            forced = forced_constraint(request.tool_use, f"'{given[0].param}'" if given else None)
        except ToolError as exc:
            raise ApiError(400, str(exc), param=exc.param, code=exc.code) from None
        return forced or (given[0] if given else None)

    def constrained(self, sampling: Sampling, request: Any, constraint: Constraint | None) -> Sampling:
        """``sampling`` with the grammar of ``constraint`` (response_format's JSON, or vLLM's guided_* /
        structured_outputs; compiled here, in the request's thread, once per distinct one): a constraint xgrammar
        cannot use, or no xgrammar, is a 400 naming its field; so are the settings that do not go with a grammar."""
        if constraint is None:
            return sampling
        against = "a JSON response_format" if constraint.param == "response_format" else f"'{constraint.param}'"
        for name, given in (("ignore_eos", request.ignore_eos), ("min_tokens", request.min_tokens),
                            ("allowed_token_ids", request.allowed_token_ids),
                            ("continue_final_message", getattr(request, "continue_final_message", False))):
            if given:
                raise ApiError(400, f"'{name}' does not go with {against}: the grammar decides the answer's tokens, "
                                    "and it ends where the grammar does, at an EOS token", param=name,
                               code="invalid_value")
        try:
            grammar = self.runtime.grammar(constraint)
        except StructuredOutputUnavailable as exc:
            raise ApiError(400, str(exc), param=constraint.param, code="unsupported_parameter") from None
        except Gemma3VLError as exc:
            raise ApiError(400, str(exc), param=constraint.param, code="invalid_value") from None
        # (the answer ends where its grammar does: a checkpoint's min_new_tokens does not apply)
        return replace(sampling, grammar=grammar, min_new_tokens=0)

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        """OpenAI's ``logprobs`` object for ``entries`` (None: the request asked for none)."""
        return None if entries is None else logprobs_object(entries, self.token_texts)

    def events(self, job: Job, client_gone: Callable[[], bool] | None = None):
        """The job's events, until every choice is done or the job failed; a scheduler that died turns into an
        error instead of a hang. While the answer is not done, ``client_gone`` is asked every ``CLIENT_CHECK_S``: a
        client that hung up cancels the job (its slots are free at the next step, not after max_tokens more) and
        raises ConnectionResetError."""
        checked = time.monotonic()
        unfinished = job.n
        while True:
            try:
                event = job.events.get(timeout=EVENT_POLL_S)
            except queue.Empty:
                if not self.scheduler_alive():
                    yield ("error", "the scheduler stopped")
                    return
                event = None
            if (client_gone is not None and (event is None or event[0] == "text")
                    and time.monotonic() - checked >= CLIENT_CHECK_S):
                checked = time.monotonic()
                if client_gone():
                    job.cancel()
                    raise ConnectionResetError("the client disconnected")
            if event is None:
                continue
            yield event
            if event[0] == "done":
                unfinished -= 1
            if event[0] == "error" or not unfinished:
                return

    def failure(self, event: tuple) -> ApiError | None:
        """The error a job's event stands for: a failed generation (500, or 503 when the server is stopping), a row
        cancelled by a stopping server (503), a row that could not go on (500); None for an ordinary event."""
        if event[0] == "error":
            return generation_error(event[1], stopping=self.stopping)
        if event[0] == "done" and event[2].finish_reason == FINISH_CANCELLED:
            return ApiError(503, "the server is shutting down", code="unavailable")
        if event[0] == "done" and event[2].finish_reason == FINISH_ERROR:
            return ApiError(500, event[2].error, code="generation_failed")
        return None

    def scheduler_alive(self) -> bool:
        thread = self.scheduler._thread
        return thread is not None and thread.is_alive()


def address_family(host: str) -> int:
    """The socket family for ``--host``: IPv6 for an IPv6 address (``::1``, ``::``), IPv4 for the rest."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The listen backlog. socketserver's default of 5 made a burst of connections overflow the kernel's accept
    # queue and get reset (161 of 200 in tests/test_reliability_server.py); now they wait to be accepted.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], handler: type, app: ChatCompletionServer):
        self.app = app
        self.address_family = address_family(address[0])
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        """A client that resets or drops its connection between requests (a keep-alive one closing, a proxy
        timing out) is one log line, not the standard library's traceback on stderr; anything else still is."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            self.app.log(f"{client_address[0]} connection ended ({type(error).__name__})")
            return
        super().handle_error(request, client_address)


def _json_bytes(obj: Any) -> bytes:
    # A lone surrogate (a client may send "\ud800", echoed in an error) cannot be encoded as UTF-8: written as the
    # JSON escape \ud800 instead of failing the response
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace")


def _sse(obj: Any) -> bytes:
    return b"data: " + _json_bytes(obj) + b"\n\n"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    server_version = "gemma3vl"

    def setup(self) -> None:
        self.timeout = self.server.app.settings.connection_timeout_s
        super().setup()

    @property
    def app(self) -> ChatCompletionServer:
        return self.server.app

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass  # one line per request is written by _logged instead

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
        self.app.log(f"{self.client_address[0]} http error: {format % args}")

    # ------------------------------------------------------------------------------------ plumbing
    def _cors_origin(self) -> str | None:
        """The ``Access-Control-Allow-Origin`` this request gets: its ``Origin`` when allowed (``*`` when any is),
        else None (no CORS header: the browser keeps the answer from the page)."""
        allowed = self.app.settings.allowed_origins
        headers = getattr(self, "headers", None)  # none yet when the request line itself was bad
        origin = headers.get("Origin") if headers is not None else None
        if not allowed or not origin:
            return None
        return "*" if "*" in allowed else origin if origin in allowed else None

    def send_response(self, code: int, message: str | None = None) -> None:
        """The status line, then (for a browser's request from an allowed origin) the CORS header: on every
        answer, errors and streams included, so that the page can read them."""
        super().send_response(code, message)
        origin = self._cors_origin()
        if origin is not None:
            self.send_header("Access-Control-Allow-Origin", origin)
            if origin != "*":
                self.send_header("Vary", "Origin")

    def _preflight(self) -> bool:
        """Answer a browser's CORS preflight (``OPTIONS`` with ``Access-Control-Request-Method``) from an allowed
        origin with 204 and what it may send; False when this is not one (the caller answers it as before)."""
        if self.command != "OPTIONS" or "Access-Control-Request-Method" not in self.headers:
            return False
        if self._cors_origin() is None:
            return False
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
        self.send_header("Access-Control-Allow-Headers",
                         self.headers.get("Access-Control-Request-Headers") or "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def _send_json(self, status: int, obj: Any) -> None:
        self._send_bytes(status, _json_bytes(obj), "application/json")

    def _send_bytes(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(self, error: ApiError, record: RequestRecord) -> None:
        record.status = error.status
        record.detail = f"error={error.code or error.type}: {error.message}"
        self._send_json(error.status, error.body())

    def start_event_stream(self) -> None:
        """Send the 200 and headers of a server-sent-events answer, whose chunks ``_write_chunk`` writes."""
        self._streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _logged(self, handle: Callable[[RequestRecord], None]) -> None:
        record = RequestRecord()
        started = time.perf_counter()
        self._streaming = False
        if self._preflight():  # before the key check: browsers send no credentials with a preflight
            self.app.log(f'{self.client_address[0]} "{self.command} {self.path}" 204 CORS preflight from '
                         f'{self.headers.get("Origin")}')
            return
        try:
            try:
                self._check_api_key()
                handle(record)
            except ApiError as error:
                self._send_error(error, record)
            except (BrokenPipeError, ConnectionResetError):
                raise
            except Exception as exc:  # a bug must cost one request, not the server
                if self._streaming:  # the status line is out already: all that can be done is to hang up
                    record.status, record.detail = 500, f"internal error in stream: {type(exc).__name__}: {exc}"
                    self.close_connection = True
                else:
                    self._send_error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}"), record)
        except (BrokenPipeError, ConnectionResetError):
            record.detail = (record.detail + " client disconnected").strip()
            self.close_connection = True
        self.app.metrics.answered(self._route(), record.status)
        self.app.log(f'{self.client_address[0]} "{self.command} {self.path}" {record.status} '
                     f"{time.perf_counter() - started:.3f}s {record.detail}".rstrip())

    def _check_api_key(self) -> None:
        """With ``api_key`` set, a request other than ``/health`` (load balancers' probes carry no key) must bring
        it as ``Authorization: Bearer KEY``, compared in constant time; otherwise a 401 in OpenAI's form, and the
        connection closes (the request's body is left unread)."""
        key = self.app.settings.api_key
        if key is None or self._route() == "/health":
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            self.close_connection = True
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (the server's --api-key)",
                           code="invalid_api_key", type="invalid_request_error")

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked_body()
        if length is None:
            self.close_connection = True
            raise ApiError(411, "send the request body with a Content-Length header (or chunked)",
                           code="length_required")
        try:
            size = int(length)
            if size < 0:
                raise ValueError(size)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, f"bad Content-Length {length!r}", code="invalid_request") from None
        limit = self.app.settings.max_request_bytes
        if size > limit:
            # Read (and drop) a moderately oversized body so that the client, still sending, gets the 413 rather
            # than a reset connection; a huge one is not worth reading. Either way the connection ends here.
            self.close_connection = True
            if size <= 2 * limit + DRAIN_SLACK_BYTES:
                remaining = size
                while remaining > 0:
                    piece = self.rfile.read(min(remaining, 1 << 16))
                    if not piece:
                        break
                    remaining -= len(piece)
            raise ApiError(413, f"the request body is {size} bytes, over the limit of {limit} bytes",
                           code="request_too_large")
        return self.rfile.read(size)

    def _read_chunked_body(self) -> bytes:
        """A body sent with ``Transfer-Encoding: chunked`` (as uvicorn, vLLM's server, takes it): its chunks
        joined, under the same byte limit (a 413 once the chunks go past it; the connection then ends, as a
        malformed chunk ends it with a 400)."""
        limit = self.app.settings.max_request_bytes
        body = bytearray()
        read = 0  # bytes of chunk data read, kept or (past the limit) dropped

        def too_large() -> ApiError:
            self.close_connection = True
            return ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")

        def malformed(why: str) -> ApiError:
            self.close_connection = True
            return ApiError(400, f"bad chunked request body: {why}", code="invalid_request")

        while True:
            line = self.rfile.readline(CHUNK_LINE_BYTES + 1)
            if len(line) > CHUNK_LINE_BYTES or not line.endswith(b"\n"):
                raise malformed("a chunk's size line is missing or too long")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise malformed(f"a chunk's size is not hexadecimal ({line[:40]!r})") from None
            if size < 0:
                raise malformed("a chunk's size is negative")
            if size == 0:
                while True:  # trailers, until the empty line
                    trailer = self.rfile.readline(CHUNK_LINE_BYTES + 1)
                    if trailer in (b"\r\n", b"\n", b""):
                        if read > limit:
                            raise too_large()
                        return bytes(body)
                    if len(trailer) > CHUNK_LINE_BYTES:
                        raise malformed("a trailer line is too long")
            if read + size > 2 * limit + DRAIN_SLACK_BYTES:  # not worth reading on (see _read_body)
                raise too_large()
            piece = self.rfile.read(size)
            if len(piece) != size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise malformed("a chunk ends early or without its line end")
            read += size
            if read <= limit:  # past it, the rest is read and dropped, so that the client gets the 413
                body += piece

    # ------------------------------------------------------------------------------------ routes
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self._logged(self._get)

    do_HEAD = do_GET  # the same status and headers, no body (_send_json)

    def do_POST(self) -> None:  # noqa: N802
        self._logged(self._post)

    def _not_allowed(self, record: RequestRecord) -> NoReturn:
        if "Content-Length" in self.headers:
            self._read_body()
        raise ApiError(405, f"{self.command} is not allowed on {self.path}", code="method_not_allowed")

    def do_PUT(self) -> None:  # noqa: N802
        self._logged(self._not_allowed)

    do_PATCH = do_OPTIONS = do_PUT  # not the stdlib's 501 HTML page

    def do_DELETE(self) -> None:  # noqa: N802
        self._logged(self._delete)

    def _delete(self, record: RequestRecord) -> None:
        path = self._route()
        if not path.startswith("/v1/responses/") or path.endswith("/input_items"):
            return self._not_allowed(record)  # (it raises the 405)
        if "Content-Length" in self.headers:  # read, so that a kept-alive connection's next request starts clean
            self._read_body()
        kept = self._kept_response(path)
        self.app.responses.delete(kept.response["id"])
        self._send_json(200, {"id": kept.response["id"], "object": "response", "deleted": True})

    def _kept_response(self, path: str) -> KeptResponse:
        """The kept response ``/v1/responses/ID`` names, or its 404."""
        response_id = urllib.parse.unquote(path[len("/v1/responses/"):])
        kept = self.app.responses.get(response_id)
        if kept is None:
            raise ApiError(404, f"No response with id '{response_id}' (never kept, deleted, or dropped for room: this "
                                "server keeps responses in memory only)", param="response_id", code="not_found")
        return kept

    def _route(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def _get(self, record: RequestRecord) -> None:
        path = self._route()
        app = self.app
        if path == "/health":
            health = {"status": "stopping" if app.stopping else "ok", "model": app.model_name, **app.scheduler.stats(),
                      "ready": app.scheduler.ready, "structured_output": app.scheduler.structured_output}
            if app.scheduler.compile_error:  # serving with the eager decode step instead
                health["compile_error"] = app.scheduler.compile_error
            self._send_json(200, health)
        elif path == "/metrics":
            self._send_bytes(200, app.metrics.exposition(), METRICS_CONTENT_TYPE)
        elif path == "/v1/models":
            self._send_json(200, models_object(app.model_name, app.created, app.scheduler.max_length))
        elif path.startswith("/v1/models/"):
            name = urllib.parse.unquote(path[len("/v1/models/"):])  # the openai client sends a/b as a%2Fb
            if name != app.model_name:
                raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
            self._send_json(200, models_object(app.model_name, app.created, app.scheduler.max_length)["data"][0])
        elif path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize", "/detokenize"):
            raise ApiError(405, f"use POST for {path}", code="method_not_allowed")
        elif path.startswith("/v1/responses/") and path.endswith("/input_items"):
            kept = self._kept_response(path.removesuffix("/input_items"))
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            self._send_json(200, input_items_page(kept, query))
        elif path.startswith("/v1/responses/"):
            self._send_json(200, self._kept_response(path).response)
        else:
            raise ApiError(404, f"no route {path}", code="unknown_url")

    def _post(self, record: RequestRecord) -> None:
        path = self._route()
        body = self._read_body()
        if path in ("/v1/completions", "/v1/responses"):
            if self.app.stopping:
                raise ApiError(503, "the server is shutting down", code="unavailable")
            (serve_completion if path == "/v1/completions" else serve_response)(self, body, record)
            return
        if path in ("/tokenize", "/detokenize"):
            serve_tokenizer(self, path, body, record)
            return
        if path != "/v1/chat/completions":
            if path in ("/health", "/v1/models", "/metrics"):
                raise ApiError(405, f"use GET for {path}", code="method_not_allowed")
            raise ApiError(404, f"no route {path}", code="unknown_url")
        if self.app.stopping:
            raise ApiError(503, "the server is shutting down", code="unavailable")
        request = parse_chat_request(body)
        job = self.app.prepare(request)
        try:
            self.app.scheduler.submit(job)
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy ({exc}); retry later", code="server_busy",
                           type="rate_limit_error") from None
        try:
            if request.stream:
                self._stream(job, request, record)
            else:
                self._complete(job, request, record)
        except BaseException:  # the client went away, a write timed out, a bug: nobody will read the rest
            job.cancel()
            raise

    def _client_gone(self) -> bool:
        """Whether the client has closed the connection (readable, and at its end: nothing more will come).
        ``poll``, not ``select``: select fails on descriptors past 1024, and a busy server has those."""
        try:
            poller = select.poll()
            poller.register(self.connection, select.POLLIN)
            return bool(poller.poll(0)) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:  # reset by the peer
            return True

    def _finished(self, job: Job, completions: list[Completion], record: RequestRecord, stream: bool,
                  reasons: list[str]) -> dict:
        """The request's usage (prompt once, every choice's tokens), noted for the log line with each choice's
        finish reason as answered (``reasons``: ``tool_calls`` for an answer given as calls, not the engine's)."""
        counts = usage(completions[0].prompt_tokens, sum(c.completion_tokens for c in completions))
        record.detail = (f"prompt={counts['prompt_tokens']} completion={counts['completion_tokens']} "
                         f"finish={','.join(reasons)} batch={job.batch_size} "
                         f"stream={'yes' if stream else 'no'}" + (f" n={job.n}" if job.n > 1 else ""))
        return counts

    def _complete(self, job: Job, request: ChatRequest, record: RequestRecord) -> None:
        done: dict[int, Completion] = {}
        scored = None
        for event in self.app.events(job, self._client_gone):
            error = self.app.failure(event)
            if error is not None:
                raise error
            if event[0] == "done":
                done[event[1]] = event[2]
            elif event[0] == "prompt_logprobs":
                scored = event[1]
        completions = [done[index] for index in range(job.n)]
        choices, reasons = [], []
        for index, c in enumerate(completions):
            read = read_answer(c.text, request.tool_use, c.finish_reason)
            reasons.append(read.finish_reason)
            choices.append(choice_object(index, message_object(read.content, read.calls), reasons[-1],
                                         self.app.logprobs(c.logprobs)))
        counts = self._finished(job, completions, record, stream=False, reasons=reasons)
        body = completion_object(new_completion_id(), now(), self.app.model_name, choices, counts)
        if job.prompt_logprobs is not None:  # (vLLM's, beside the choices)
            body["prompt_logprobs"] = prompt_logprobs_object(scored or [], job.prompt_logprobs, self.app.token_texts)
        self._send_json(200, body)

    def _stream(self, job: Job, request: ChatRequest, record: RequestRecord) -> None:
        completion_id, created, model = new_completion_id(), now(), self.app.model_name
        include_usage = request.include_usage

        def chunk(choice: dict | None, counts: dict | None = None) -> bytes:
            return _sse(chunk_object(completion_id, created, model, [] if choice is None else [choice],
                                     include_usage=include_usage, usage_counts=counts))

        self.start_event_stream()
        for index in range(job.n):
            self._write_chunk(chunk(chunk_choice(index, {"role": "assistant", "content": ""})))
        completions: list[Completion] = []
        reasons: list[str] = []  # as answered, in the order the choices ended
        use = request.tool_use
        forced = use is not None and use.forced
        # each choice's text held back while it may be tool calls (tool_calls.StreamedCalls); a forced call streamed
        # as it is generated (tool_calls.StreamedForcedCalls)
        held = None if use is None or not use.offered else [
            StreamedForcedCalls(use) if forced else StreamedCalls(use) for _ in range(job.n)]

        def send_text(index: int, text: str, logprobs: Any) -> None:
            self._write_chunk(chunk(chunk_choice(index, {"content": text}, logprobs=self.app.logprobs(logprobs))))

        def send_calls(index: int, entries: list[dict]) -> None:
            if entries:
                self._write_chunk(chunk(chunk_choice(index, {"tool_calls": entries})))

        for event in self.app.events(job, self._client_gone):
            error = self.app.failure(event)
            if error is not None:
                record.status, record.detail = error.status, f"error in stream: {error.message}"
                self._write_chunk(_sse(error.body()))
                job.cancel()  # the other choices' answers would go unread
                break
            if event[0] == "text":
                _, index, (text, logprobs) = event
                if forced:
                    send_calls(index, [piece.wire() for piece in held[index].feed(text, logprobs)])
                    continue
                delta = (text, logprobs) if held is None else held[index].feed(text, logprobs)
                if delta is not None:
                    send_text(index, *delta)
                continue
            _, index, completion = event
            completions.append(completion)
            reason = completion.finish_reason
            if forced:  # (never text: the call as far as it went)
                pieces, logprobs, read = held[index].finish(completion.text, completion.finish_reason)
                send_calls(index, [piece.wire() for piece in pieces])
                if logprobs:
                    send_text(index, "", logprobs)
                reason = read.finish_reason
            elif held is not None:
                text, logprobs, read = held[index].finish(completion.text, completion.finish_reason)
                if text or logprobs:
                    send_text(index, text, logprobs)
                send_calls(index, [call.wire(position) for position, call in enumerate(read.calls or ())])
                reason = read.finish_reason
            self._write_chunk(chunk(chunk_choice(index, {}, reason)))
            reasons.append(reason)
        if len(completions) == job.n:
            counts = self._finished(job, completions, record, stream=True, reasons=reasons)
            if include_usage:
                self._write_chunk(chunk(None, counts=counts))
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")  # end of the chunked body

