"""Evaluation: the field's dataset layouts (CORD-v2 receipts, VQA / DocVQA / ChartQA / TextVQA, captions), its
metrics from their published definitions, and ``gemma3vl eval``: score a checkpoint (HF dir, native dir, or
base + PEFT adapter) on a local dataset, alone or against another with a paired bootstrap interval.

``layouts`` (rows -> examples / conversation records) -> ``runner`` (batched greedy answers) -> ``metrics``
(per-sample statistics, corpus scores) -> ``report`` (predictions.jsonl, report.json, the table).
"""
