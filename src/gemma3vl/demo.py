"""``gemma3vl demo``: the whole toolkit on a tiny random checkpoint, offline, on the CPU.

1. write a complete HF-format Gemma 3 VL checkpoint (random weights, tiny tokenizer, chat template,
   processor configs); 2. import it into the native format; 3. export it back and check every tensor is
bitwise identical; 4. compare our model with transformers on a synthetic batch (several images, padding);
5. draw a picture and answer a question about it, checking the tokens against transformers' ``generate``
(the weights are random, so the answer is noise — but it must be transformers' noise, token for token);
6. fine-tune the tiny model on pictures it draws (shapes, colours, counts, a written word) and measure held-out accuracy
before and after; 7. load the exported fine-tuned checkpoint in transformers and check it gives the same
answers. The last line is ``demo: held-out accuracy BEFORE -> AFTER``.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch

from gemma3vl.errors import Gemma3VLError

MARKER = ".gemma3vl-demo"
DEMO_TRAIN_RECORDS = 1024
DEMO_EVAL_RECORDS = 48
DEMO_STEPS = 300
DEMO_TRAINING = ["optim.lr=0.005", "data.eval_accuracy_samples=48"]  # and steps, evaluating and saving at each third


def say(step: str) -> None:
    print(step, flush=True)


def prepare_workdir(out: Path) -> None:
    """Use ``out`` for the demo; only ever clear a directory an earlier demo made."""
    from gemma3vl.bridge.fsutil import blocking_file

    if out.exists() and not out.is_dir():
        raise Gemma3VLError(f"--out {out}: exists and is not a directory")
    blocking = blocking_file(out)
    if blocking is not None:
        raise Gemma3VLError(f"{out}: cannot write the output ({blocking} is a file, not a directory)")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise Gemma3VLError(f"{out}: exists and is not a demo directory; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by gemma3vl demo\n")


def tensors_identical(first: Path, second: Path) -> tuple[int, list[str]]:
    """Compare every tensor of two HF directories bitwise; returns (count, problems)."""
    from safetensors import safe_open

    def collect(directory: Path) -> dict[str, tuple[Path, str]]:
        found = {}
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(file, "pt") as handle:
                for key in handle.keys():
                    found[key] = (file, key)
        return found

    left, right = collect(first), collect(second)
    problems = [f"only in {first}: {k}" for k in left.keys() - right.keys()]
    problems += [f"only in {second}: {k}" for k in right.keys() - left.keys()]
    for key in sorted(left.keys() & right.keys()):
        with safe_open(left[key][0], "pt") as a, safe_open(right[key][0], "pt") as b:
            x, y = a.get_tensor(key), b.get_tensor(key)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)):
            problems.append(f"{key}: differs")
    return len(left), problems


def run_demo(out: Path, seed: int = 0, steps: int = DEMO_STEPS) -> int:
    from gemma3vl import bridge, verify
    from gemma3vl.infer.generate import Sampling, generate
    from gemma3vl.infer.loading import load_model
    from gemma3vl.infer.prompt import build_inputs, load_processor, tokenizer_of
    from gemma3vl.pictures import draw_picture
    from gemma3vl.tiny import write_tiny_checkpoint

    torch.manual_seed(seed)
    prepare_workdir(out)
    started = time.perf_counter()
    hf_dir, native_dir, exported_dir = out / "hf-tiny", out / "native", out / "exported"

    say(f"[1/7] writing a tiny random Gemma 3 VL checkpoint (HF format, hub layout, 2 shards) to {hf_dir}")
    write_tiny_checkpoint(hf_dir, seed=seed, max_shard_bytes=200_000)
    config = bridge.read_config(hf_dir)
    say(f"      {config.text.num_hidden_layers} decoder layers {list(config.text.layer_types)}, "
        f"window {config.text.sliding_window}, {config.text.num_attention_heads}/{config.text.num_key_value_heads} "
        f"q/kv heads, head_dim {config.text.head_dim}; SigLIP {config.vision.num_hidden_layers} layers, "
        f"{config.mm_tokens_per_image} tokens per image")

    say(f"[2/7] importing into the native format: {native_dir}")
    bridge.import_checkpoint(hf_dir, native_dir, progress=False)

    say(f"[3/7] exporting back to HF format: {exported_dir}")
    bridge.export_checkpoint(native_dir, exported_dir, progress=False)
    count, problems = tensors_identical(hf_dir, exported_dir)
    if problems:
        raise Gemma3VLError("round trip changed tensors: " + "; ".join(problems[:5]))
    say(f"      round trip bitwise identical: {count} tensors")

    say("[4/7] parity with transformers (float32, 3 rows, 3 images, left padding, past the sliding window)")
    device = torch.device("cpu")
    reference = verify.load_reference(exported_dir, config, torch.float32, device)
    ours, _ = load_model(native_dir, device=device, dtype=torch.float32)
    report = verify.compare(ours, reference, config, dtype=torch.float32, device=device, greedy_tokens=12)
    for line in verify.format_report(report).splitlines():
        say("      " + line)
    if not report.passed:
        return 1

    picture = out / "picture.png"
    draw_picture("red circle", seed=seed).save(picture)
    question = "What is in this picture?"
    say(f"[5/7] asking about {picture}: {question!r}")
    processor = load_processor(native_dir, config)
    inputs = build_inputs(processor, config, question, [draw_picture("red circle", seed=seed)])
    sampling = Sampling(max_new_tokens=16, stop_token_ids=config.stop_token_ids)
    ours_tokens = generate(ours, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           pixel_values=inputs["pixel_values"], sampling=sampling)[0]
    batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    reference_tokens = verify.reference_greedy(reference, batch, config, len(ours_tokens))[0]
    answer = tokenizer_of(processor).decode(ours_tokens, skip_special_tokens=True)
    say(f"      prompt: {inputs['input_ids'].shape[1]} tokens, {inputs['pixel_values'].shape[0]} image")
    say(f"      answer ({len(ours_tokens)} tokens, random weights): {answer!r}")
    same = reference_tokens[: len(ours_tokens)] == ours_tokens
    say(f"      transformers' generate gives the same tokens: {'yes' if same else 'NO'}")
    if not same:
        print("error: generated tokens differ from transformers", file=sys.stderr)
        return 1

    before, after, agreeing, asked = fine_tune(out, hf_dir, seed, steps)
    say(f"      transformers loads the export and gives the same answers: {agreeing} of {asked}")
    say(f"done in {time.perf_counter() - started:.1f}s; files in {out}")
    say(f"demo: held-out accuracy {before:.0%} -> {after:.0%}")
    return 0 if agreeing == asked else 1


def fine_tune(out: Path, base_dir: Path, seed: int, steps: int) -> tuple[float, float, int, int]:
    """Steps 6 and 7: train on drawn shapes, then compare the export's answers with transformers'."""
    from gemma3vl import verify
    from gemma3vl.shapes import write_shapes_dataset
    from gemma3vl.train.config import recipe, apply_overrides
    from gemma3vl.train.run import run_training

    data = out / "shapes"
    train_path = write_shapes_dataset(data, DEMO_TRAIN_RECORDS, seed=seed, name="train")
    eval_path = write_shapes_dataset(data, DEMO_EVAL_RECORDS, seed=seed, name="eval")
    cfg = recipe("tiny_sft")
    third = -(-steps // 3)  # rounded up: the last evaluation is the last step's
    apply_overrides(cfg, [*DEMO_TRAINING, f"train.steps={steps}", f"train.eval_every={third}",
                          f"checkpoint.every={third}"])
    cfg.model.path, cfg.data.path, cfg.data.eval_path = str(base_dir), str(train_path), str(eval_path)
    cfg.out = str(out / "finetune")
    cfg.train.seed = seed
    say(f"[6/7] fine-tuning on {DEMO_TRAIN_RECORDS} drawn pictures (colour, shape, count and written-word questions): "
        f"{cfg.train.steps} steps of {cfg.train.global_batch_size} packed rows; {DEMO_EVAL_RECORDS} held out")
    trainer_result = run_training(cfg)
    evals = [r for r in trainer_result.history if r.get("eval_accuracy") is not None]
    before, after = evals[0]["eval_accuracy"], evals[-1]["eval_accuracy"]
    say(f"      eval loss {evals[0]['eval_loss']:.3f} -> {evals[-1]['eval_loss']:.3f}; "
        f"held-out accuracy {before:.0%} -> {after:.0%}")

    exported = Path(cfg.out) / "hf"
    say(f"[7/7] answering the held-out questions with the export ({exported}) in transformers and in gemma3vl")
    from gemma3vl.data.dataset import ConversationDataset
    from gemma3vl.data.settings import DataConfig
    from gemma3vl.infer.loading import load_model
    from gemma3vl.infer.prompt import load_processor
    from gemma3vl.train.evaluate import Evaluator

    ours, config = load_model(exported, device="cpu", dtype=torch.float32)
    reference = verify.load_reference(exported, config, torch.float32, torch.device("cpu"))
    dataset = ConversationDataset(DataConfig(path=eval_path, shuffle=False), load_processor(exported, config))
    evaluator = Evaluator(dataset, micro_batch_size=4, accuracy_samples=DEMO_EVAL_RECORDS,
                          max_new_tokens=cfg.data.eval_max_new_tokens, stop_token_ids=config.stop_token_ids,
                          device=torch.device("cpu"))
    _, our_answers = evaluator.accuracy(ours)
    tokenizer = dataset.encoder.tokenizer
    agreeing = 0
    for (inputs, expected), ours_text in zip(evaluator.questions, our_answers):
        tokens = verify.reference_answer(reference, inputs, config, cfg.data.eval_max_new_tokens)
        agreeing += tokenizer.decode(tokens, skip_special_tokens=True) == ours_text
    return before, after, agreeing, len(our_answers)
