"""The thread that owns the model: requests join the running batch between decode steps (continuous batching).

HTTP handler threads only parse, fetch images and encode prompts; then they queue a :class:`Job` and read
its events. One scheduler thread runs a :class:`ContinuousBatcher`: between two decode steps it admits waiting
jobs into free slots (each prefilled on its own, then decoded with the others), and a job leaves its slot the
step it ends, so a short answer never waits for a long one and a new request never waits for a batch to drain.
Every row samples with its own settings and seeded generator, so greedy and sampled requests share a batch and
a seeded request gets the answer ``generate`` gives with that seed. When the engine is idle, the first job waits
``batch_wait_s`` from its arrival so that requests arriving together start together. At most ``max_waiting``
jobs wait for a slot; beyond that ``submit`` refuses (the server answers 429). Events go to each job's own
queue, so a slow client never stalls the batch.

A job asking for ``n`` choices (OpenAI's ``n``) is ``n`` rows of the engine (added one after another, they share
one prefill: ``ContinuousBatcher.add``), each its own sample (a seeded job's choice ``i`` draws with
``derived_seed(seed, i)``). Its rows take free slots as they come, oldest job first, so a job may start with
some of its rows and the rest join as slots free; it counts as one waiting job until its last row has a slot.

A job may ask for ``prompt_logprobs`` (the legacy completions endpoint's ``echo`` with ``logprobs``, vLLM's
``prompt_logprobs`` on either completions endpoint): the log-probability of every prompt token (images included),
from one forward over the prompt, sent as a ``("prompt_logprobs", entries)`` event before anything else. A
*direct* job, one that asks for no token (``max_tokens: 0``), or for one token with prompt logprobs
(lm-evaluation-harness's loglikelihood requests), takes no engine slot and no decode step: it is answered here,
between two engine steps, from that one forward (``logprobs.score_prompt``; its one token chosen from the last
position's logits as the engine would choose it, each choice with its own sampling). A generating job's prompt is
scored by the engine's own prefill of its first choice (``ContinuousBatcher.add(..., prompt_logprobs=k)``), one
forward for both.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from gemma3vl.infer import structured
from gemma3vl.infer.completion import FINISH_LENGTH, Completion, Row, RowState
from gemma3vl.infer.conversation import EncodedPrompt
from gemma3vl.infer.engine import ContinuousBatcher
from gemma3vl.infer.generate import Sampling
from gemma3vl.infer.logprobs import LogprobRows, score_prompt
from gemma3vl.infer.metrics import ServingMetrics
from gemma3vl.infer.sampling import RowSampling, choose_tokens, derived_seed, process_logits, row_generator, seen_tokens

_job_numbers = itertools.count()
SHUTTING_DOWN = "the server is shutting down"


class QueueFull(Exception):
    """``max_waiting`` jobs already wait for a slot."""


@dataclass(eq=False)  # identity, not field-by-field (tensors)
class Job:
    """One request for the scheduler: ``n`` choices of one prompt. Its ``events`` queue yields, per choice
    ``index``, ``("text", index, (delta, logprobs))`` items then one ``("done", index, Completion)``; or, for the
    whole job, ``("error", message)``."""

    prompt: EncodedPrompt
    sampling: Sampling
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    n: int = 1  # choices, each its own row and sample
    logprobs: int | None = None  # per token its logprob and this many alternatives' (None: no logprobs)
    # per prompt token its logprob and this many alternatives' (None: none), sent as one "prompt_logprobs" event
    prompt_logprobs: int | None = None
    events: queue.Queue = field(default_factory=queue.Queue)
    queued_at: float = field(default_factory=time.monotonic)
    batch_size: int = 0  # the most rows it shared a decode step with, itself included (for the request log)
    number: int = field(default_factory=lambda: next(_job_numbers))
    admitted: int = 0  # choices given a slot so far (the scheduler's count)
    ended: int = 0  # choices whose rows have ended (the scheduler's count)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    metrics: ServingMetrics | None = None  # the server's, set when the job is queued
    _first_token_seen: bool = False  # a choice has handed out text (or ended)
    _finished: int = 0  # choices that have ended

    def cancel(self) -> None:
        """Nobody waits for this answer any more (the client went away)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def row(self, index: int = 0) -> Row:
        """Choice ``index``'s row."""
        def on_delta(text: str, logprobs: Any) -> None:
            self._noted()
            self.events.put(("text", index, (text, logprobs)))

        def on_finish(completion: Completion) -> None:
            self._noted(completion)
            self.events.put(("done", index, completion))

        return Row(prompt=self.prompt, max_new_tokens=self.max_new_tokens, stop_strings=self.stop_strings,
                   logprobs=self.logprobs, on_delta=on_delta, on_finish=on_finish, is_cancelled=lambda: self.cancelled)

    def _noted(self, completion: Completion | None = None) -> None:
        """The metrics of a choice's text (the job's first: time to first token) or end (the job's last: its
        latency). Called on the scheduler's thread only."""
        if self.metrics is None:
            return
        if not self._first_token_seen:
            self._first_token_seen = True
            self.metrics.first_token(self.queued_at)
        if completion is not None:
            self.metrics.choice_done(completion.completion_tokens, completion.finish_reason)
            self._finished += 1
            if self._finished == self.n:
                self.metrics.job_done(self.queued_at)

    @property
    def direct(self) -> bool:
        """Answered by the scheduler from one forward over the prompt, without an engine slot (module docstring)."""
        return self.max_new_tokens == 0 or (self.max_new_tokens == 1 and self.prompt_logprobs is not None
                                            and self.sampling.grammar is None)

    def choice_sampling(self, index: int) -> Sampling:
        """Choice ``index``'s sampling: the job's, with a seed of its own when the job is seeded."""
        if self.sampling.seed is None:
            return self.sampling
        return replace(self.sampling, seed=derived_seed(self.sampling.seed, index))


class BatchScheduler:
    def __init__(self, runtime: Any, *, max_batch_size: int = 8, batch_wait_s: float = 0.005,
                 max_waiting: int | None = None, max_length: int | None = None, compile: bool = False):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_waiting = max_waiting
        # positions per row (prompt + answer); the engine's cache holds max_batch_size of them
        self.max_length = min(max_length or runtime.context_length, runtime.context_length)
        self.compile = compile
        self.engine: ContinuousBatcher | None = None
        self._pending: list[Job] = []
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.jobs_done = 0
        self.largest_batch = 0
        self.joined_running = 0  # jobs admitted while others were decoding
        self.compile_error: str | None = None
        self.structured_output = "starting"  # /health: JSON output "ready", "unavailable: ..." or "failed: ..."
        self.ready = False  # /health: the engine's warm-ups (compiling, JSON output) are done; requests wait till then
        self.metrics: ServingMetrics | None = None  # the server's /metrics, given the jobs as they are queued

    def start(self) -> None:
        self.engine = ContinuousBatcher(self.runtime.model, self.runtime.tokenizer, slots=self.max_batch_size,
                                        max_length=self.max_length, compile=self.compile,
                                        decode_lock=self.runtime.lock, report=self._compile_failed)
        self._thread = threading.Thread(target=self._loop, name="gemma3vl-scheduler", daemon=True)
        self._thread.start()

    def _compile_failed(self, why: str) -> None:
        self.compile_error = why

    def submit(self, job: Job) -> Job:
        """Queue ``job`` (:class:`QueueFull` when ``max_waiting`` jobs already wait). A stopping scheduler answers
        the job with an error event."""
        with self._cond:
            if self._stopping:
                job.events.put(("error", SHUTTING_DOWN))
                return job
            if self.max_waiting is not None and len(self._pending) >= self.max_waiting:
                raise QueueFull(f"{len(self._pending)} requests are already waiting")
            self._measure(job)
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def submit_all(self, jobs: list[Job]) -> list[Job]:
        """Queue every job of ``jobs`` or none (:class:`QueueFull`): one request's several prompts."""
        with self._cond:
            if self._stopping:
                for job in jobs:
                    job.events.put(("error", SHUTTING_DOWN))
                return jobs
            if self.max_waiting is not None and len(self._pending) + len(jobs) > self.max_waiting:
                raise QueueFull(f"{len(self._pending)} requests are already waiting")
            for job in jobs:
                self._measure(job)
            self._pending.extend(jobs)
            self._cond.notify_all()
        return jobs

    def _measure(self, job: Job) -> None:
        if self.metrics is not None:
            job.metrics = self.metrics
            self.metrics.admitted(job.prompt.length)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"waiting": len(self._pending), "running": len(self._running), "steps": self.steps,
                    "requests_done": self.jobs_done, "largest_batch": self.largest_batch,
                    "joined_running": self.joined_running, "max_batch_size": self.max_batch_size}

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new jobs, end the running ones at the next step boundary (as cancelled), fail the waiting ones."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._cond:
            for job in self._pending:
                job.events.put(("error", SHUTTING_DOWN))
            self._pending.clear()

    # ------------------------------------------------------------------------------------------ the loop
    def _waiting_rows(self) -> int:
        return sum(job.n - job.admitted for job in self._pending if not job.direct)

    def _next_direct(self) -> Job | None:
        """The oldest waiting direct job, taken off the queue (under ``_cond``); None when there is none."""
        for job in self._pending:
            if job.direct:
                self._pending.remove(job)
                return job
        return None

    def _admissions(self, engine: ContinuousBatcher) -> list[tuple[Job, int]] | None:
        """Wait for work; then the waiting rows (job, choice) that fit in the free slots, oldest job first (None
        when stopping)."""
        with self._cond:
            while not self._pending and not engine.active and not self._stopping:
                self._cond.wait()
            # one direct job per step: a flood of them must not stall the running rows
            direct = None if self._stopping else self._next_direct()
            if direct is not None:
                return [(direct, -1)]
            if not engine.active and self._pending:  # idle: let requests that arrive together start together
                deadline = self._pending[0].queued_at + self.batch_wait_s
                while not self._stopping and self._waiting_rows() < engine.free_slots:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            if self._stopping:
                return None
            admitted: list[tuple[Job, int]] = []
            free = engine.free_slots
            while self._pending and free:
                job = self._pending[0]
                if job.direct:  # came in while this thread waited: the next pass answers it
                    break
                if job.cancelled:  # nobody waits for the rest of it
                    self._pending.pop(0)
                    self._retire(job)
                    continue
                count = min(free, job.n - job.admitted)
                admitted += [(job, job.admitted + i) for i in range(count)]
                job.admitted += count
                free -= count
                if job.admitted == job.n:
                    self._pending.pop(0)
                if job not in self._running:
                    self._running.append(job)
            if engine.active:
                self.joined_running += len(admitted)
            return admitted

    def _retire(self, job: Job) -> None:
        """Forget ``job`` once none of its rows runs or waits any more (under ``_cond``)."""
        if job.ended == job.admitted and job not in self._pending and job in self._running:
            self._running.remove(job)
            self.jobs_done += 1

    def _loop(self) -> None:
        engine = self.engine
        engine.warm_up()  # should compiling fail: serve eagerly, and say why in /health
        self.structured_output = structured.warm_up(self.runtime, engine.device)
        self.ready = True
        while True:
            admitted = self._admissions(engine)
            if admitted is None:
                break
            for job, index in admitted:
                if index < 0:  # a direct job: no slot
                    self._answer_direct(job)
                    continue
                try:
                    scored = job.prompt_logprobs if index == 0 else None  # (the prompt's prefill scores it)
                    scores = engine.add(job.row(index), job.choice_sampling(index), tag=(job, index),
                                        prompt_logprobs=scored)
                    if scores is not None:
                        job.events.put(("prompt_logprobs", scores.entries))
                except Exception as exc:  # a request that cannot run fails alone
                    self._fail([job], exc)
            if not engine.active:
                continue
            batch = engine.active
            for job, _ in engine.tags():
                job.batch_size = max(job.batch_size, batch)
            try:
                ended = engine.step()
            except Exception as exc:  # a failed step fails the rows in it, not the server
                self._fail(_jobs(engine.drop_all()), exc)
                ended = []
            with self._cond:
                self.steps += 1
                self.largest_batch = max(self.largest_batch, batch)
                for job, _ in ended:
                    job.ended += 1
                    self._retire(job)
        stopped = _jobs(engine.cancel_all())  # stopping: each running row hears "cancelled"
        with self._cond:
            self._running = [job for job in self._running if job not in stopped]

    def _score(self, job: Job):
        device = self.engine.device
        pixels = job.prompt.pixel_values
        return score_prompt(self.runtime.model, job.prompt.input_ids.to(device), job.prompt_logprobs,
                            None if pixels is None else pixels.to(device))

    @torch.no_grad()
    def _answer_direct(self, job: Job) -> None:
        """Answer a direct job (``max_new_tokens`` 0, or 1 with prompt logprobs) on this thread, without the engine."""
        job.batch_size = max(job.batch_size, 1)  # (before its answer: the handler logs it once answered)
        try:
            if not job.cancelled:
                self._direct_choices(job)
        except Exception as exc:  # a request that cannot run fails alone
            self._fail([job], exc)
            return
        with self._cond:
            self.jobs_done += 1
            self.largest_batch = max(self.largest_batch, 1)

    def _direct_choices(self, job: Job) -> None:
        device = self.engine.device
        tokenizer = self.runtime.tokenizer
        states = [RowState(job.row(index), tokenizer, job.choice_sampling(index)) for index in range(job.n)]
        tokens: list[int] = []
        reported: dict = {}
        if job.prompt_logprobs is not None or job.max_new_tokens:
            scores = self._score(job)
            if job.prompt_logprobs is not None:
                job.events.put(("prompt_logprobs", scores.entries))
        if job.max_new_tokens:  # one token per choice, chosen as the engine's first step chooses it
            samplings = [job.choice_sampling(index) for index in range(job.n)]
            vocab = scores.last_logits.shape[-1]
            rows = RowSampling.from_samplings(samplings, vocab, device, [row_generator(s, device) for s in samplings])
            logits = scores.last_logits[None].repeat(job.n, 1)
            ids = job.prompt.input_ids.to(device)[None].repeat(job.n, 1)
            seen = seen_tokens(ids, torch.ones_like(ids), vocab) if rows.any_penalty else None
            chosen = choose_tokens(process_logits(logits, rows, seen, answers=[()] * job.n), rows)
            tokens = chosen.tolist()
            if job.logprobs is not None:
                reported = LogprobRows.of([job.logprobs] * job.n, device).compute(logits, chosen).by_row(tokens)
        with self.runtime.lock:  # the tokenizer, shared with the handler threads
            for index, state in enumerate(states):
                if tokens:
                    state.step(tokens[index], set(job.choice_sampling(index).stop_token_ids), reported.get(index))
                if state.finish_reason is None:
                    state.finish(FINISH_LENGTH)

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        """Tell ``jobs`` why they failed and forget them (rows of theirs still running end as cancelled once the
        server has stopped waiting for them)."""
        message = f"generation failed: {type(exc).__name__}: {exc}"
        with self._cond:
            for job in jobs:
                job.events.put(("error", message))
            self._running = [job for job in self._running if job not in jobs]
            self._pending = [job for job in self._pending if job not in jobs]


def _jobs(tags: list[tuple[Job, int]]) -> list[Job]:
    """The jobs of the engine rows tagged ``(job, choice)``, each once."""
    return list(dict.fromkeys(job for job, _ in tags))
