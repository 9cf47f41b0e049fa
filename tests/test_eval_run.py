"""`gemma3vl eval` end to end on tiny random models: a model fine-tuned (with `gemma3vl train`, reading the VQA
layout) to answer a synthetic set perfectly scores 1.0 where the untouched one scores nothing; PEFT adapter
directories load back onto the base model; the files and the errors. The adapter oracle is our own export
(tests/test_lora_peft.py checks that export against peft itself)."""

from __future__ import annotations

import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gemma3vl import verify
from gemma3vl.cli import main
from gemma3vl.errors import Gemma3VLError
from gemma3vl.evaluation.loading import load_peft_adapter
from gemma3vl.infer.loading import load_model
from gemma3vl.pictures import draw_picture
from gemma3vl.tiny import write_tiny_checkpoint
from gemma3vl.train.lora import LoraConfig, apply_lora, lora_modules
from gemma3vl.train.metrics import read_metrics
from gemma3vl.train.peft_export import ADAPTER_WEIGHTS, write_peft_adapter

# Four questions whose answers the model must learn (the pictures vary, the answers do not).
QUESTIONS = {"What colour is the sky?": "blue", "How many legs has a cat?": "four",
             "What shape is a ball?": "round", "Is fire hot?": "yes"}


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    draw_picture("red circle", size=(56, 56), seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()


def write_vqa(path, count: int, seed: int):
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        question = list(QUESTIONS)[index % len(QUESTIONS)]
        answers = [QUESTIONS[question]] * 9 + ["no idea"]
        rows.append({"question_id": f"q{seed}-{index}", "image": {"bytes": png(rng.randrange(1 << 20)), "path": None},
                     "question": question, "answers": answers})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("eval-base") / "base", seed=0)


def test_fine_tuned_model_scores_perfectly_and_the_untouched_one_does_not(base, tmp_path, capsys):
    train = write_vqa(tmp_path / "train.parquet", 64, seed=1)
    held_out = write_vqa(tmp_path / "eval.parquet", 8, seed=2)
    tuned = tmp_path / "tuned"
    assert main(["train", "--recipe", "tiny_sft", "--model", str(base), "--data", str(train),
                 "--eval-data", str(held_out), "--out", str(tuned), "data.layout=vqa",
                 "data.eval_metric=vqa_accuracy,anls", "train.steps=30", "train.seq_length=128",
                 "train.global_batch_size=8", "train.micro_batch_size=8", "train.eval_every=0", "checkpoint.every=0",
                 "data.eval_accuracy_samples=8", "data.eval_max_new_tokens=4", "logging.progress=false",
                 "logging.tensorboard=false"]) == 0
    # the trainer's periodic evaluation logged the layout's metrics like the loss
    evals = [r for r in read_metrics(tuned / "metrics.jsonl") if "eval_loss" in r]
    assert evals[0]["eval_vqa_accuracy"] < 0.5 and evals[-1]["eval_vqa_accuracy"] == 1.0
    assert evals[-1]["eval_anls"] == 1.0
    capsys.readouterr()

    out = tmp_path / "report"
    assert main(["eval", str(tuned / "hf"), "--data", str(held_out), "--compare", str(base), "--out", str(out),
                 "--batch-size", "3", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["layout"] == "vqa" and report["examples_scored"] == 8
    assert report["metrics"] == ["vqa_accuracy", "anls", "exact_match"]
    # nine of ten humans said the answer: every leave-one-out subset still holds >= 3 matches
    assert report["model"]["scores"] == {"vqa_accuracy": 1.0, "anls": 1.0, "exact_match": 1.0}
    untouched = report["compare"]["scores"]
    assert all(value <= 0.25 for value in untouched.values())  # a random model: at most chance
    difference = report["difference"]["vqa_accuracy"]
    assert difference["value"] == pytest.approx(1.0 - untouched["vqa_accuracy"])
    low, high = difference["ci95"]
    assert 0 < low <= difference["value"] <= high
    assert report["bootstrap"]["resamples"] == 1000 and report["bootstrap"]["seed"] == 0
    assert "vqa_accuracy" in printed and "95% interval" in printed and "tuned/hf" in printed

    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"q2-{i}" for i in range(8)]
    first = lines[0]
    assert first["prompt"].startswith("<image>What colour is the sky?") and first["reference"] == "blue"
    assert first["prediction"] == "blue" and first["scores"] == {"vqa_accuracy": 1.0, "anls": 1.0, "exact_match": 1.0}
    assert len(first["references"]) == 10
    other = [json.loads(line) for line in (out / "compare_predictions.jsonl").read_text().splitlines()]
    assert len(other) == 8 and all(line["prediction"] != "blue" for line in other[:1])


def test_cord_layout_runs_with_receipt_metrics(base, tmp_path, capsys):
    rows = [{"image": {"bytes": png(i), "path": None},
             "ground_truth": json.dumps({"gt_parse": {"total": {"total_price": str(i)}}})} for i in range(3)]
    rows.append({"image": {"bytes": b"not an image", "path": None}, "ground_truth": rows[0]["ground_truth"]})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "cord.parquet")
    out = tmp_path / "out"
    assert main(["eval", str(base), "--data", str(tmp_path / "cord.parquet"), "--out", str(out),
                 "--max-new-tokens", "6", "--metric", "field_f1,ted_accuracy", "--metric", "field_recall"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["layout"] == "cord" and report["metrics"] == ["field_f1", "ted_accuracy", "field_recall"]
    # a random model writes no JSON: nothing found, and the unreadable image is reported, not scored
    assert report["model"]["scores"] == {"field_f1": 0.0, "ted_accuracy": 0.0, "field_recall": 0.0}
    assert report["examples_scored"] == 3 and "row 3" in report["model"]["failures"][0]
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert lines[3]["prediction"] is None and "scores" not in lines[3]
    assert lines[0]["reference"] == '{"total":{"total_price":"0"}}'
    assert "row 3" in capsys.readouterr().err


def test_caption_layout_runs_with_its_default_metrics(base, tmp_path):
    # bleu4 is a default of the caption layout: report.json carries sacrebleu's signature for it
    pytest.importorskip("sacrebleu")
    data = tmp_path / "captions.jsonl"
    (tmp_path / "red.png").write_bytes(png(0))
    data.write_text(json.dumps({"image": "red.png", "captions": ["a red circle", "a circle"]}) + "\n"
                    + json.dumps({"image": "red.png", "caption": "red"}) + "\n")
    out = tmp_path / "out"
    assert main(["eval", str(base), "--data", str(data), "--out", str(out), "--max-new-tokens", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["layout"] == "caption" and report["metrics"] == ["bleu4", "token_f1"]
    assert report["examples_scored"] == 2 and "nrefs:var|" in report["bleu4_signature"]


def _logits(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch.get("pixel_values"), attention_mask=batch["attention_mask"])


def test_peft_adapter_directory_loads_back_onto_the_base(base, tmp_path):
    adapted, config = load_model(base, device="cpu", dtype=torch.float32)
    lora = LoraConfig(rank=4, alpha=8, use_dora=True, targets=("q_proj", "v_proj", "down_proj"), include_vision=True,
                      vision_targets=("fc1",))
    apply_lora(adapted, lora)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, module in lora_modules(adapted):
            for adapter in module.adapters.values():
                adapter.lora_B.weight.copy_(torch.randn(adapter.lora_B.weight.shape, generator=generator) * 0.1)
                adapter.magnitude.mul_(1 + 0.2 * torch.randn(adapter.magnitude.shape, generator=generator))
    adapter_dir = write_peft_adapter(adapted, lora, tmp_path / "adapter", str(base))
    batch = verify.synthetic_batch(config)
    expected = _logits(adapted.eval(), batch)

    loaded, _ = load_model(base, device="cpu", dtype=torch.float32)
    untouched = _logits(loaded, batch)
    got_config = load_peft_adapter(loaded, adapter_dir)
    assert (got_config.rank, got_config.scaling, got_config.use_dora) == (4, 2.0, True)
    assert set(got_config.targets) == {"q_proj", "v_proj", "down_proj"} and got_config.vision_targets == ("fc1",)
    assert not lora_modules(loaded)  # merged
    got = _logits(loaded, batch)
    valid = batch["attention_mask"].bool()
    scale = expected[valid].abs().max()
    assert (expected - got)[valid].abs().max() <= 1e-5 * scale
    assert (expected - untouched)[valid].abs().max() > 1e-3 * scale

    # a file that does not hold what its config describes is refused, naming a missing key
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(adapter_dir / ADAPTER_WEIGHTS))
    with pytest.raises(Gemma3VLError, match=f"missing 1 \\(e.g. {dropped}"):
        load_peft_adapter(load_model(base, device="cpu", dtype=torch.float32)[0], adapter_dir)
    with pytest.raises(Gemma3VLError, match="not a PEFT adapter directory"):
        load_peft_adapter(loaded, tmp_path)


def test_eval_errors_are_one_clear_line(base, tmp_path, capsys):
    data = write_vqa(tmp_path / "eval.parquet", 2, seed=0)
    assert main(["eval", str(base), "--data", str(data), "--metric", "cider", "--out", str(tmp_path / "o")]) == 2
    assert "unknown metric(s) cider" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere"), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "MODEL_DIR" in capsys.readouterr().err
    pq.write_table(pa.Table.from_pylist([{"picture": b"x", "label": "y"}]), tmp_path / "odd.parquet")
    assert main(["eval", str(base), "--data", str(tmp_path / "odd.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "columns ['label', 'picture']" in capsys.readouterr().err
    assert main(["eval", str(base), "--data", str(data), "--batch-size", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--batch-size 0 must be >= 1" in capsys.readouterr().err


def test_training_settings_for_layouts_and_metrics_are_checked():
    from gemma3vl.train.config import build_config

    cfg = build_config("tiny_sft", overrides=["data.layout=cord", "data.eval_metric=field_f1, ted_accuracy"])
    assert cfg.data.layout == "cord" and cfg.data.eval_metrics() == ["field_f1", "ted_accuracy"]
    with pytest.raises(Gemma3VLError, match="data.eval_metric: unknown metric.*cider"):
        build_config("tiny_sft", overrides=["data.eval_metric=cider"])
    with pytest.raises(Gemma3VLError, match="data.layout='receipts' is not one of"):
        build_config("tiny_sft", overrides=["data.layout=receipts"])


def _peft_saved_adapter(hf_checkpoint, tmp_path, rename=(), **peft_settings):
    """An adapter written by peft itself (``PeftModel.save_pretrained``, random A and B) on transformers' model of
    a tiny checkpoint, keys optionally renamed to another transformers version's module names; with the base
    directory, peft's model and a batch."""
    peft = pytest.importorskip("peft")
    directory, reference = hf_checkpoint()
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **peft_settings)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        peft_model = peft.get_peft_model(reference, config).eval()
    adapter_dir = tmp_path / "peft-adapter"
    peft_model.save_pretrained(adapter_dir)
    if rename:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
        renamed = {}
        for key, value in tensors.items():
            for new, old in rename:
                if key.startswith(new):
                    key = old + key[len(new):]
                    break
            renamed[key] = value
        save_file(renamed, str(adapter_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory, peft_model, adapter_dir


@pytest.mark.parametrize("case", ["exclude_modules", "transformers4.57-names"])
def test_adapters_peft_saved_with_exclusions_or_older_names_load(hf_checkpoint, tmp_path, case):
    """Oracle: peft. An adapter that PeftModel.save_pretrained wrote with ``exclude_modules`` (here: q/v_proj of
    the text only, the SigLIP tower excluded), or under transformers 4.52-4.57's module names (the tower still
    ``model.vision_tower.vision_model.``, target_modules a regex in those names), loads onto our model and gives
    peft's logits. Before, the exclusion was ignored and the 4.57 names were not recognised: both were refused as
    tensors that do not match their config."""
    if case == "exclude_modules":
        directory, peft_model, adapter_dir = _peft_saved_adapter(
            hf_checkpoint, tmp_path, target_modules=["q_proj", "v_proj"], exclude_modules=r".*vision_tower.*")
    else:
        directory, peft_model, adapter_dir = _peft_saved_adapter(
            hf_checkpoint, tmp_path, target_modules=["q_proj", "v_proj", "fc1"],
            rename=[("base_model.model.model.vision_tower.", "base_model.model.model.vision_tower.vision_model.")])
        settings = json.loads((adapter_dir / "adapter_config.json").read_text())
        settings["target_modules"] = r".*(language_model|vision_model)\..*\.(q_proj|v_proj|fc1)"
        (adapter_dir / "adapter_config.json").write_text(json.dumps(settings))
    ours, config = load_model(directory, device="cpu", dtype=torch.float32)
    lora = load_peft_adapter(ours, adapter_dir)
    assert lora.include_vision == (case != "exclude_modules")
    batch = verify.synthetic_batch(config)
    with torch.no_grad():
        expected = verify.reference_logits(peft_model, batch, config)
        got = _logits(ours, batch)
        with peft_model.disable_adapter():
            untouched = verify.reference_logits(peft_model, batch, config)
    valid = batch["attention_mask"].bool()
    scale = expected[valid].abs().max()
    assert (expected - got)[valid].abs().max() <= 1e-5 * scale
    assert (expected - untouched)[valid].abs().max() > 1e-3 * scale


def test_an_adapter_of_modules_gemma3vl_does_not_adapt_says_so(hf_checkpoint, tmp_path):
    """Oracle: peft. An adapter peft wrote on ``q_proj`` and ``lm_head`` was refused as "the tensors do not match
    the adapters its config describes" (they do): now the message names lm_head as a module gemma3vl does not
    adapt. Another model's names (a text-only adapter's under ``model.layers`` on a vision-language base's
    ``model.language_model.layers``) are named as such."""
    from gemma3vl.evaluation.loading import _mismatch

    directory, _, adapter_dir = _peft_saved_adapter(hf_checkpoint, tmp_path, target_modules=["q_proj", "lm_head"])
    ours, _ = load_model(directory, device="cpu", dtype=torch.float32)
    with pytest.raises(Gemma3VLError, match="the adapter adapts lm_head .* which gemma3vl does not adapt"):
        load_peft_adapter(ours, adapter_dir)
    said = _mismatch(["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"],
                     ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    assert said.startswith("the adapter's modules are another model's: its tensors are under "
                           "base_model.model.model.layers, this model's under base_model.model.model.language_model")


def test_adapter_with_trained_biases_is_refused_by_its_config(hf_checkpoint, tmp_path):
    """peft's ``lora_bias=True`` (a trained bias on each lora_B) is named as unsupported, not reported as
    unexpected tensors."""
    directory, _, adapter_dir = _peft_saved_adapter(hf_checkpoint, tmp_path, target_modules=["q_proj"],
                                                    lora_bias=True)
    with pytest.raises(Gemma3VLError, match="lora_bias=True is not supported"):
        load_peft_adapter(load_model(directory, device="cpu", dtype=torch.float32)[0], adapter_dir)


def test_adapter_on_the_merged_export_of_its_own_run_is_refused(base, tmp_path, capsys):
    """``gemma3vl eval OUT/hf --adapter OUT/adapter`` would add the adapter a second time to weights that already
    hold it (OUT/hf is the merged export of the same run): one clear error naming the base to use instead; on the
    base itself the same adapter loads."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(base, run / "hf")
    (run / "train_config.json").write_text("{}\n")
    model, _ = load_model(base, device="cpu", dtype=torch.float32)
    lora = LoraConfig(rank=2, alpha=4, targets=("q_proj",))
    apply_lora(model, lora)
    write_peft_adapter(model, lora, run / "adapter", str(base))
    data = write_vqa(tmp_path / "eval.parquet", 1, seed=0)
    assert main(["eval", str(run / "hf"), "--adapter", str(run / "adapter"), "--data", str(data),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is the merged export of the training run" in err and f"({base})" in err
    assert main(["eval", str(base), "--adapter", str(run / "adapter"), "--data", str(data), "--max-new-tokens", "2",
                 "--out", str(tmp_path / "o")]) == 0


def test_eval_out_file_text_only_model_and_overlong_answers_are_one_clear_line(base, tmp_path, capsys):
    """--out naming a file was a FileExistsError traceback; a text-only checkpoint on image examples, or a
    --max-new-tokens over the context, skipped every example and exited 0 with no score at all."""
    data = write_vqa(tmp_path / "eval.parquet", 2, seed=0)
    (tmp_path / "afile").write_text("")
    assert main(["eval", str(base), "--data", str(data), "--out", str(tmp_path / "afile")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["eval", str(base), "--data", str(data), "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--max-new-tokens", "100000"]) == 2
    assert "--max-new-tokens 100000: the model's context is" in capsys.readouterr().err
    text_only = write_tiny_checkpoint(tmp_path / "text", text_only=True)
    assert main(["eval", str(text_only), "--data", str(data), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "text-only" in capsys.readouterr().err


def test_unlabelled_rows_are_noted_and_the_counts_add_up(tmp_path, monkeypatch, capsys):
    """A directory of VQAv2's validation and test files read whole: the test rows (null answers) are bad rows the
    report notes as unlabelled, not examples scored as wrong; rows read = scored + failed + bad rows. An unknown
    --metric is refused before the data's first pass (before: after reading, and reporting, every row)."""
    from gemma3vl.infer.runtime import InferenceRuntime
    from test_eval_hardening import FakeRuntime

    monkeypatch.setattr(InferenceRuntime, "load", classmethod(lambda cls, *a, **k: FakeRuntime([])))
    (tmp_path / "model").mkdir()
    data = tmp_path / "vqav2" / "data"
    data.mkdir(parents=True)
    answers = [{"answer": "four", "answer_confidence": "yes", "answer_id": i} for i in range(10)]
    rows = [{"question_id": i, "question": "How many legs has a cat?", "answers": answers if i < 3 else None,
             "image": {"bytes": b"not an image" if i == 2 else png(i), "path": None}} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows[:3]), data / "validation-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), data / "test-00000-of-00001.parquet")
    command = ["eval", str(tmp_path / "model"), "--data", str(tmp_path / "vqav2"), "--out", str(tmp_path / "out")]

    assert main(command + ["--metric", "vqa_acc"]) == 2
    err = capsys.readouterr().err
    assert "unknown metric(s) vqa_acc" in err and "skipping" not in err
    assert main(command) == 0
    err = capsys.readouterr().err
    assert "note: 5 of the 8 rows read have no answers" in err and "--split picks one split's files" in err
    # the first rows without answers are named, then one line for the rest (a test split has thousands)
    assert err.count("no answer to score against") == 3 and "skipping further rows without answers" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["examples"] == 8 and report["examples_scored"] == 2
    assert len(report["rows_skipped"]) == 5 and len(report["model"]["failures"]) == 1
    assert report["examples"] == report["examples_scored"] + len(report["rows_skipped"]) + \
        len(report["model"]["failures"])
    assert "5 of the 8 rows read have no answers" in report["notes"][0]
    assert report["model"]["scores"]["exact_match"] == 1.0


def test_a_resume_with_another_split_names_the_split_not_changed_files():
    """Another --split reads other files of the same directory: the refusal said the data's files 'changed since
    the first run', which they had not."""
    from gemma3vl.evaluation.runner import _differences

    first = {"data": "/d", "data_files": [["data/validation-0.parquet", 10, 1]], "split": "validation"}
    now = {"data": "/d", "data_files": [["data/test-0.parquet", 10, 1]], "split": "test"}
    assert _differences(first, now) == ["--split test (the first run: validation)"]
    changed = {**first, "data_files": [["data/validation-0.parquet", 11, 2]]}
    assert _differences(first, changed) == ["the files of --data /d changed since the first run "
                                            "(data/validation-0.parquet)"]


def test_resume_with_the_data_path_spelled_another_way(tmp_path, monkeypatch):
    """The first run given --data relative to its directory, the resume the same data by its absolute path (or from
    another directory): eval_run.json found the same data, then each answer line was refused as 'the data changed
    since the first run', its source spelled with the other path."""
    from gemma3vl.infer.runtime import InferenceRuntime
    from test_eval_hardening import FakeRuntime

    batches: list[int] = []
    monkeypatch.setattr(InferenceRuntime, "load", classmethod(lambda cls, *a, **k: FakeRuntime(batches)))
    (tmp_path / "model").mkdir()
    (tmp_path / "vqav2" / "data").mkdir(parents=True)
    rows = [{"question_id": i, "question": "Is fire hot?", "answers": ["yes"] * 10,
             "image": {"bytes": png(i), "path": None}} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "vqav2" / "data" / "validation-00000-of-00001.parquet")
    real = FakeRuntime.complete

    def stopped(self, rows, sampling):
        if len(self.batches) == 1:
            raise KeyboardInterrupt
        return real(self, rows, sampling)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(FakeRuntime, "complete", stopped)
    command = ["eval", "model", "--split", "validation", "--out", str(tmp_path / "out"), "--batch-size", "2"]
    assert main(command + ["--data", "vqav2"]) == 130
    monkeypatch.setattr(FakeRuntime, "complete", real)
    batches.clear()
    assert main(command + ["--data", str(tmp_path / "vqav2"), "--resume"]) == 0
    assert sum(batches) == 3  # only the rows not answered before
    lines = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [line["prediction"] for line in lines] == ["yes"] * 5
    assert lines[0]["source"] == f"{tmp_path / 'vqav2' / 'data' / 'validation-00000-of-00001.parquet'}:row 0"
