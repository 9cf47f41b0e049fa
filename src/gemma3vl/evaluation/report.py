"""What ``gemma3vl eval`` leaves behind: ``predictions.jsonl``, ``report.json`` and a printed table.

With two models the difference of each metric comes with a paired bootstrap 95% interval: both models'
per-sample statistics are resampled with the same indices (examples drawn with replacement, as many as
there are), the metric recomputed from the resampled sums for each model, and the 2.5th and 97.5th
percentiles of the differences taken. The generator is seeded, so the interval is the same on every run.
Corpus metrics (field F1, BLEU) are recomputed from their summed counts, not averaged per sample.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from gemma3vl.errors import Gemma3VLError
from gemma3vl.evaluation.layouts import Example
from gemma3vl.evaluation.metrics import METRICS

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def paired_bootstrap(name: str, first: np.ndarray, second: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile interval of ``metric(first) - metric(second)`` over paired resamples of the samples."""
    count = len(first)
    if count != len(second):
        raise ValueError(f"paired samples differ in number: {count} and {len(second)}")
    if count == 0:
        return math.nan, math.nan
    generator = np.random.default_rng(seed)
    # times[b, i]: how often sample i is drawn in resample b; the sums of a resample are then one product.
    draws = generator.integers(0, count, size=(resamples, count))
    times = np.zeros((resamples, count), dtype=np.float64)
    np.add.at(times, (np.repeat(np.arange(resamples), count), draws.ravel()), 1.0)
    metric = METRICS[name]
    differences = metric.aggregate(times @ first, count) - metric.aggregate(times @ second, count)
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(low), float(high)


def write_predictions(path: Path, examples: list[Example], predictions: list[str | None], kept: list[int],
                      scores: dict[str, list[float]]) -> None:
    """One line per example: id, source, prompt, prediction, reference(s), and for the scored examples
    (``kept``, in order; ``scores[name][k]`` is for ``examples[kept[k]]``) each metric's sample score.
    An example the model could not be asked has prediction null."""
    position = {index: at for at, index in enumerate(kept)}

    def lines() -> Iterator[str]:
        for index, (example, prediction) in enumerate(zip(examples, predictions)):
            line: dict[str, Any] = {"id": example.id, "source": example.source, "prompt": example.prompt_text,
                                    "prediction": prediction, "reference": example.target,
                                    "references": example.references}
            if index in position:
                line["scores"] = {name: values[position[index]] for name, values in scores.items()}
            yield json.dumps(line, ensure_ascii=False, default=str) + "\n"

    _write_atomically(path, lines())


def write_report(path: Path, report: dict[str, Any]) -> None:
    _write_atomically(path, [json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n"])


def _write_atomically(path: Path, chunks: Iterable[str]) -> None:
    """``chunks`` into ``path`` through a ``.partial`` file (a reader never sees half a file); a failure (disk
    full, permissions) is one line naming the file, and leaves no ``.partial`` behind."""
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "w", encoding="utf-8") as stream:
            for chunk in chunks:
                stream.write(chunk)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise Gemma3VLError(f"{path}: cannot write ({exc.strerror or exc})") from None


def format_table(report: dict[str, Any]) -> str:
    """The scores as a plain-text table: one column per model, then the difference and its interval."""
    names = report["metrics"]
    model = report["model"]
    other = report.get("compare")
    header = ["metric", _short(model["label"])]
    if other is not None:
        header += [_short(other["label"]), "difference", "95% interval (paired bootstrap)"]
    rows = [header]
    for name in names:
        row = [name, _number(model["scores"].get(name))]
        if other is not None:
            difference = report["difference"][name]
            low, high = difference["ci95"]
            row += [_number(other["scores"].get(name)), _number(difference["value"], signed=True),
                    f"[{_number(low, signed=True)}, {_number(high, signed=True)}]"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in
                       enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    counted = f"{report['examples_scored']} of {report['examples']} examples scored ({report['layout']} layout"
    counted += f", {report['data']})"
    return "\n".join([counted, *lines])


def _short(label: str, width: int = 28) -> str:
    return label if len(label) <= width else "..." + label[-(width - 3):]


def _number(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
