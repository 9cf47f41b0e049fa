"""The Python API end to end: convert, verify, answer (whole, streamed, batched, in a chat), fine-tune with LoRA,
merge the adapter, answer again.

    python examples/python_api.py                        # a tiny random model on the CPU, about 30 s
    python examples/python_api.py --model gemma-3-4b-it --image receipt.jpg --data train.jsonl --device cuda

With --model (a downloaded google/gemma-3-*-it directory) the same steps run on the real model: give --data
(training conversations, docs/data.md) for the fine-tuning step, which then uses the model's PEFT recipe.
Everything is written under --out (default: ./python-api-example).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import gemma3vl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an HF Gemma 3 checkpoint directory (default: a tiny random one)")
    parser.add_argument("--image", help="a picture to ask about (default: one drawn here)")
    parser.add_argument("--data", help="training conversations for the LoRA step (default with --model: skip it)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="python-api-example")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: 20 tiny, 50 real)")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    model_dir = args.model
    if model_dir is None:
        from gemma3vl.tiny import write_tiny_checkpoint

        model_dir = write_tiny_checkpoint(out / "tiny-hf")
    image = args.image
    if image is None:
        from gemma3vl.pictures import draw_picture

        image = out / "shapes.png"
        draw_picture("red circle and blue square").save(image)

    # 1. HF -> native and back: the round trip is bit for bit; verify runs transformers and ours on one batch.
    native = gemma3vl.convert_import(model_dir, out / "native")
    exported = gemma3vl.convert_export(native, out / "hf-again")
    print(f"converted {model_dir} -> {native} -> {exported}")
    report = gemma3vl.verify_checkpoint(model_dir, native=native, device=args.device, greedy_tokens=4)
    print(f"verify: {'passed' if report.passed else 'FAILED'} (cosine {report.cosine:.6f})")

    # 2. Answers: whole, streamed, several prompts at once, and a conversation.
    model = gemma3vl.load(native, device=args.device)
    print(model)
    answer = model.generate("What is in this picture?", images=[image], max_new_tokens=24, details=True)
    print(f"generate: {answer.text!r} ({len(answer.token_ids)} tokens, {answer.finish_reason})")
    print("stream: ", end="")
    for text in model.stream("Describe the picture.", images=[image], max_new_tokens=24, greedy=True):
        print(text, end="", flush=True)
    print()
    answers = model.generate(["Say hello.", "What shapes are there?"], images=[None, [image]], max_new_tokens=16)
    print(f"batch: {answers}")
    reply = model.chat([
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "Colours?"}]},
    ], max_new_tokens=16, temperature=0.7, seed=0)
    print(f"chat: {reply!r}")

    # 3. LoRA fine-tuning, then the adapter merged into a complete HF checkpoint.
    if args.model is None:
        recipe, settings = "tiny_peft", {"train.steps": args.steps or 20, "logging.progress": False}
    elif args.data is not None:
        size = model.config.text.num_hidden_layers  # 34, 48 or 62
        recipe = {34: "gemma3_vl_4b_peft", 48: "gemma3_vl_12b_peft", 62: "gemma3_vl_27b_peft"}.get(size)
        if recipe is None:
            raise SystemExit(f"{args.model}: not a 4B, 12B or 27B Gemma 3 checkpoint ({size} layers)")
        settings = {"train.steps": args.steps or 50}
    else:
        print("no --data: fine-tuning skipped")
        return
    del model  # free its memory for training
    result = gemma3vl.fine_tune(recipe, model=args.model, data=args.data, out=out / "run", settings=settings)
    print(f"fine-tuned {result.steps} steps, final loss {result.final_loss:.4f}")
    run = out / "run"
    merged = gemma3vl.merge_adapter(run / "base" if args.model is None else args.model, run / "adapter",
                                    out / "merged")
    tuned = gemma3vl.load(merged, device=args.device)
    print(f"after fine-tuning: {tuned.generate('What is in this picture?', images=[image], max_new_tokens=16)!r}")


if __name__ == "__main__":
    main()
