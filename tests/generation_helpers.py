"""Helpers for tests of generation's text and stopping: decoding with scripted tokens."""

from __future__ import annotations

import torch

from gemma3vl.infer import generate as generate_module


def scripted(monkeypatch, rows: list[list[int]]) -> None:
    """Make every step choose the next scripted token of each row (instead of the model's)."""
    step = {"n": 0}

    def choose(scores, settings, active=None):
        n = step["n"]
        step["n"] += 1
        return torch.tensor([row[min(n, len(row) - 1)] for row in rows], device=scores.device)

    monkeypatch.setattr(generate_module, "choose_tokens", choose)


def run_batch_lines(runtime, directory, lines: list, *flags: str) -> tuple[int, str, list[dict]]:
    """``gemma3vl generate --batch`` over ``lines`` (JSON objects, one a line) on ``runtime``'s checkpoint: the
    exit code, what it printed on stderr, and the answer records written."""
    import contextlib
    import io
    import json

    from gemma3vl.cli import main

    source, answers = directory / "in.jsonl", directory / "out.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["generate", str(runtime.model_dir), "--batch", str(source), "--output", str(answers),
                     "--device", "cpu", *flags])
    records = [json.loads(line) for line in answers.read_text().splitlines()] if answers.exists() else []
    return code, err.getvalue(), records
