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
