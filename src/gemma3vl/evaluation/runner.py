"""``gemma3vl eval``: answer every example of a dataset with a checkpoint, and score the answers.

Prompts are built from the examples exactly as ``gemma3vl train`` builds them (``layouts``), encoded with the
checkpoint's chat template (the ``InferenceRuntime`` ``chat`` and ``serve`` use), and answered by batched
greedy generation (``runtime.complete``: left-padded rows, each cut at its own stop token) in batches of
``batch_size``, under a progress bar as ``generate --batch`` shows one. An example that cannot be read or
encoded is reported with its ``file:row`` and left out of the scores (and counted).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gemma3vl.data.images import ImageLoader
from gemma3vl.data.records import BadRecord, ImageRef
from gemma3vl.errors import Gemma3VLError
from gemma3vl.evaluation.layouts import Example, ExampleFile
from gemma3vl.evaluation.metrics import METRICS, compute_stats


@dataclass
class ExampleSet:
    """The examples read from a data file (in file order), and the rows that could not be read."""

    path: Path
    layout: str
    examples: list[Example]
    skipped: list[str] = field(default_factory=list)  # one message per bad row


def read_examples(path: str | Path, *, layout: str = "auto", split: str | None = None, limit: int | None = None,
                  report: Callable[[str], None] | None = None) -> ExampleSet:
    """The first ``limit`` rows of ``path`` as examples (bad rows reported and skipped)."""
    if limit is not None and limit < 1:
        raise Gemma3VLError(f"--limit {limit} must be >= 1")
    source = ExampleFile(path, layout, split)
    found = ExampleSet(source.path, source.layout, [])
    for index in range(len(source) if limit is None else min(limit, len(source))):
        try:
            found.examples.append(source.example(index))
        except BadRecord as bad:
            found.skipped.append(str(bad))
            if report is not None:
                report(f"skipping {bad}")
    if not found.examples:
        raise Gemma3VLError(f"{source.path}: no usable example" +
                            (f" (e.g. {found.skipped[0]})" if found.skipped else ""))
    return found


@dataclass
class Answered:
    """One model's answers: ``predictions[i]`` answers ``examples[i]``; None where it could not be asked."""

    model: str
    adapter: str | None
    predictions: list[str | None]
    failures: list[str]
    seconds: float


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during generation, carrying what was answered until then (``answered`` once the model is known)."""

    def __init__(self, predictions: list[str | None], failures: list[str]):
        super().__init__()
        self.predictions, self.failures = predictions, failures
        self.answered: Answered | None = None


def answer_examples(runtime: Any, examples: list[Example], *, batch_size: int, max_new_tokens: int,
                    progress: bool = True, report: Callable[[str], None] | None = None,
                    image_loader: ImageLoader | None = None) -> tuple[list[str | None], list[str]]:
    """Greedy answers of ``runtime``'s model to ``examples``, in order, and one message per failure."""
    from tqdm import tqdm

    from gemma3vl.infer.completion import Row
    from gemma3vl.infer.conversation import Turn

    if batch_size < 1:
        raise Gemma3VLError(f"--batch-size {batch_size} must be >= 1")
    if max_new_tokens >= runtime.context_length:
        raise Gemma3VLError(f"--max-new-tokens {max_new_tokens}: the model's context is {runtime.context_length} "
                            "tokens, prompt included")
    loader = image_loader or ImageLoader()
    sampling = runtime.sampling(max_new_tokens=max_new_tokens, greedy=True)
    predictions: list[str | None] = [None] * len(examples)
    failures: list[str] = []
    say = report or (lambda message: tqdm.write(message, file=sys.stderr))

    def encode(example: Example):
        turns = []
        for turn in example.turns:
            parts = [turn.content] if isinstance(turn.content, str) else turn.content
            turns.append(Turn(turn.role, [loader.load(p, example.base_dir, example.source)
                                          if isinstance(p, ImageRef) else p for p in parts]))
        prompt = runtime.encode_conversation(turns)
        if prompt.length + max_new_tokens > runtime.context_length:
            raise Gemma3VLError(f"{example.source}: the prompt is {prompt.length} tokens; with max_new_tokens="
                                f"{max_new_tokens} that is over the context of {runtime.context_length}")
        return prompt

    with tqdm(total=len(examples), desc="eval", unit="example", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        try:
            for start in range(0, len(examples), batch_size):
                indices, rows = [], []
                for index in range(start, min(start + batch_size, len(examples))):
                    try:
                        rows.append(Row(prompt=encode(examples[index]), max_new_tokens=max_new_tokens))
                        indices.append(index)
                    except Gemma3VLError as exc:  # BadRecord is one too
                        source = examples[index].source
                        message = str(exc) if source in str(exc) else f"{source}: {exc}"
                        failures.append(message)
                        say(f"skipping {message}")
                if rows:
                    for index, completion in zip(indices, runtime.complete(rows, sampling)):
                        predictions[index] = completion.text.strip()
                bar.update(min(batch_size, len(examples) - start))
        except KeyboardInterrupt:
            raise Interrupted(predictions, failures) from None
    return predictions, failures


def evaluate_model(model_dir: str | Path, examples: list[Example], *, adapter: str | Path | None = None,
                   batch_size: int = 8, max_new_tokens: int = 64, device: str | None = None,
                   dtype: str | None = None, progress: bool = True,
                   report: Callable[[str], None] | None = None) -> Answered:
    """Load ``model_dir`` (with ``adapter`` merged in), answer the examples, and let the model go."""
    from gemma3vl.infer.runtime import InferenceRuntime

    say = report or (lambda message: print(message, file=sys.stderr, flush=True))
    runtime = InferenceRuntime.load(model_dir, device=device, dtype=dtype, adapter=adapter)
    say(runtime.describe())
    if not runtime.config.is_vision_language and all(_has_image(example) for example in examples):
        raise Gemma3VLError(f"{model_dir}: a text-only Gemma 3 checkpoint cannot answer these examples: "
                            "every one has an image")
    started = time.perf_counter()
    try:
        predictions, failures = answer_examples(runtime, examples, batch_size=batch_size,
                                                max_new_tokens=max_new_tokens, progress=progress, report=report)
    except Interrupted as stop:
        stop.answered = Answered(str(model_dir), None if adapter is None else str(adapter), stop.predictions,
                                 stop.failures, time.perf_counter() - started)
        raise
    return Answered(str(model_dir), None if adapter is None else str(adapter), predictions, failures,
                    time.perf_counter() - started)


@dataclass
class Scored:
    """Per metric: the per-sample statistics over the scored examples (those every model answered)."""

    stats: dict[str, np.ndarray]

    def value(self, name: str) -> float:
        return METRICS[name].score(self.stats[name])

    def sample_scores(self, name: str) -> list[float]:
        return METRICS[name].sample_scores(self.stats[name])


def score_answers(names: list[str], answers: list[str], examples: list[Example]) -> Scored:
    return Scored(compute_stats(names, answers, [example.references for example in examples]))


def run_eval(model_dir: str | Path, data: str | Path, *, out: str | Path, layout: str = "auto",
             metrics: list[str] | None = None, adapter: str | Path | None = None, compare: str | Path | None = None,
             limit: int | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
             split: str | None = None, device: str | None = None, dtype: str | None = None,
             progress: bool = True, report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score ``model_dir`` (and ``compare``) on ``data``; write ``OUT/predictions.jsonl`` (and
    ``OUT/compare_predictions.jsonl``) and ``OUT/report.json``; return the report."""
    from gemma3vl.evaluation.layouts import DEFAULT_MAX_NEW_TOKENS, DEFAULT_METRICS
    from gemma3vl.evaluation.metrics import bleu_signature, check_metrics, metric_available
    from gemma3vl.evaluation.report import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, paired_bootstrap,
                                            write_predictions, write_report)

    say = report or (lambda message: print(message, file=sys.stderr, flush=True))
    for label, directory in (("MODEL_DIR", model_dir), ("--compare", compare), ("--adapter", adapter)):
        if directory is not None and not Path(directory).is_dir():
            raise Gemma3VLError(f"{label} {directory}: no such directory")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Gemma3VLError(f"--out {out}: exists and is not a directory")
    if adapter is not None:
        from gemma3vl.evaluation.loading import check_adapter

        check_adapter(model_dir, adapter)
    found = read_examples(data, layout=layout, split=split, limit=limit, report=say)
    notes: list[str] = []
    if metrics:
        names = check_metrics(metrics)
    else:
        names = [name for name in DEFAULT_METRICS[found.layout] if metric_available(name)]
        left_out = [name for name in DEFAULT_METRICS[found.layout] if name not in names]
        if left_out:
            notes.append(f"{', '.join(left_out)} left out: {METRICS[left_out[0]].needs} is not installed "
                         "(pip install 'gemma3vl[eval]')")
            say(f"note: {notes[-1]}")
    max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[found.layout]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Gemma3VLError(f"--out {out}: cannot create the directory ({exc.strerror or exc})") from None
    _check_writable(out, ("predictions.jsonl", "compare_predictions.jsonl", "report.json"))
    say(f"{found.path}: {len(found.examples)} {found.layout} examples"
        + (f" ({len(found.skipped)} bad rows skipped)" if found.skipped else "") + f"; metrics: {', '.join(names)}")

    runs: list[Answered] = []
    interrupted = False
    try:
        runs.append(evaluate_model(model_dir, found.examples, adapter=adapter, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, device=device, dtype=dtype, progress=progress,
                                   report=report))
        if compare is not None:
            runs.append(evaluate_model(compare, found.examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                       device=device, dtype=dtype, progress=progress, report=report))
    except Interrupted as stop:
        # Ctrl-C during generation: what was answered is scored and written (marked interrupted), not thrown
        # away with hours of generation. Interrupted during the first model, there is no comparison.
        runs.append(stop.answered)
        interrupted = True
        notes.append(f"interrupted: {sum(p is not None for p in stop.answered.predictions)} of "
                     f"{len(found.examples)} examples answered by {stop.answered.model}; only those are scored")
    # Only examples every model answered are scored, so that the comparison is paired.
    kept = [i for i in range(len(found.examples)) if all(run.predictions[i] is not None for run in runs)]
    examples = [found.examples[i] for i in kept]
    scored = [score_answers(names, [run.predictions[i] for i in kept], examples) for run in runs]

    files = ["predictions.jsonl", "compare_predictions.jsonl"]
    results: dict[str, Any] = {
        "data": str(found.path), "layout": found.layout, "examples": len(found.examples) + len(found.skipped),
        "examples_scored": len(examples), "rows_skipped": found.skipped, "metrics": names,
        "max_new_tokens": max_new_tokens, "decoding": "greedy", "notes": notes, "interrupted": interrupted,
    }
    if "bleu4" in names:
        results["bleu4_signature"] = bleu_signature()
    for key, run, scores, file in zip(("model", "compare"), runs, scored, files):
        label = _label(run.model) + (f" + {_label(run.adapter)}" if run.adapter else "")
        values = {name: (scores.value(name) if examples else None) for name in names}
        results[key] = {"path": run.model, "adapter": run.adapter, "label": label, "scores": values,
                        "failures": run.failures, "seconds": round(run.seconds, 3), "predictions": file}
        per_sample = {name: scores.sample_scores(name) for name in names}
        write_predictions(out / file, found.examples, run.predictions, kept, per_sample)
    if len(runs) > 1:
        results["difference"] = {}
        for name in names:
            first, second = scored[0].stats[name], scored[1].stats[name]
            low, high = paired_bootstrap(name, first, second) if examples else (None, None)
            value = (results["model"]["scores"][name] - results["compare"]["scores"][name]) if examples else None
            results["difference"][name] = {"value": value, "ci95": [low, high]}
        results["bootstrap"] = {"method": "paired percentile bootstrap over examples (same resample indices for "
                                          "both models)", "resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED,
                                "interval": 0.95}
    elif (out / files[1]).exists():
        (out / files[1]).unlink()  # an earlier run's comparison would pass for this run's
    write_report(out / "report.json", results)
    if interrupted:
        say(f"interrupted: the {len(examples)} examples answered so far are scored in {out / 'report.json'}")
        raise KeyboardInterrupt
    if not examples:
        # Every example failed (unreadable images, prompts over the context, ...): no score is not a result.
        failures = [failure for run in runs for failure in run.failures]
        raise Gemma3VLError(f"none of the {len(found.examples)} examples could be answered, so nothing was scored "
                            f"(e.g. {failures[0] if failures else 'no answer'}); every failure is in "
                            f"{out / 'report.json'}")
    return results


def _check_writable(out: Path, names: tuple[str, ...]) -> None:
    """Fail now, not after hours of generation, when the results could not be written to ``out``."""
    for name in names:
        if (out / name).is_dir():
            raise Gemma3VLError(f"--out {out}: {out / name} is a directory; it must be free for a file")
    probe = out / f".gemma3vl-eval-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise Gemma3VLError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


def _has_image(example: Example) -> bool:
    return any(isinstance(part, ImageRef) for turn in example.turns if not isinstance(turn.content, str)
               for part in turn.content)


def _label(directory: str) -> str:
    """A checkpoint's short name for the table: its last two path components (``run/hf``, ``out/base``)."""
    parts = Path(directory).resolve().parts
    return "/".join(parts[-2:]) if len(parts) > 1 else str(directory)
