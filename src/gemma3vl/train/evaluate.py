"""Held-out evaluation: the loss over the eval set, and answer accuracy by greedy generation.

Accuracy asks the model each held-out conversation without its last assistant turn and compares the
greedy answer with that turn (case, surrounding whitespace and final punctuation ignored). ``metrics``
(names from ``gemma3vl.evaluation.metrics``) score the same answers, against every reference a dataset
layout gives (VQA's ten answers), and are logged as ``eval_<name>``.
"""

from __future__ import annotations

import string
from typing import Any, Callable

import torch

from gemma3vl.data.dataset import ConversationDataset
from gemma3vl.data.loader import BatchLoader
from gemma3vl.data.records import BadRecord, Conversation
from gemma3vl.infer.generate import Sampling, generate
from gemma3vl.model import Gemma3Model
from gemma3vl.train.trainer import step_loss


def normalise_answer(text: str) -> str:
    return text.strip().strip(string.punctuation + " \n").lower()


class Evaluator:
    def __init__(
        self,
        dataset: ConversationDataset,
        *,
        micro_batch_size: int,
        accuracy_samples: int,
        max_new_tokens: int,
        stop_token_ids: tuple[int, ...],
        device: torch.device,
        metrics: list[str] | None = None,
        slice_batch: Callable[[Any], Any] | None = None,
        sum_slices: Callable[[float, float], list[float]] | None = None,
        autocast: bool = True,
        answering_model: Callable[[Gemma3Model], Gemma3Model | None] | None = None,
    ):
        """``slice_batch`` / ``sum_slices``: under context parallelism, each batch becomes this rank's slice of
        every row (``parallel.context.shard_batch``) and the slices' summed losses and target counts are added
        over the context-parallel ranks, so a long held-out row is never held whole on one rank.

        ``answering_model``: under torchrun, where the trained model is sharded and cannot generate, a collective that
        gives rank 0 a whole plain copy of it (``None`` on the other ranks): rank 0 answers the questions with it
        and sends every rank the answers."""
        self.answering_model = answering_model
        self.slice_batch = slice_batch
        self.autocast = autocast  # as the training step (trainer.uses_autocast)
        self.sum_slices = sum_slices
        self.dataset = dataset
        self.loader = BatchLoader(dataset, micro_batch_size)
        self.accuracy_samples = accuracy_samples
        self.max_new_tokens = max_new_tokens
        self.stop_token_ids = stop_token_ids
        self.device = device
        self.metrics = list(metrics or [])
        self.references: list[list[str]] = []  # per question: what the metrics score against
        self.questions = self._questions()

    def _questions(self) -> list[tuple[dict[str, Any], str]]:
        """(processor inputs of the prompt, expected answer) for the first held-out conversations."""
        encoder = self.dataset.encoder
        questions = []
        for index in range(min(self.accuracy_samples, len(self.dataset))):
            try:
                conversation = self.dataset.conversation(index)  # (image paths from the record's own file)
                source = conversation.source
                answer = " ".join(conversation.turns[-1].texts())
                prompt = Conversation(conversation.turns[:-1], source, conversation.base_dir)
                images = [encoder.image_loader.load(ref, prompt.base_dir, source) for ref in prompt.images]
                kwargs = {"processor_kwargs": encoder.processor_kwargs} if images and encoder.processor_kwargs else {}
                inputs = encoder.processor.apply_chat_template(
                    encoder.messages(prompt, images), add_generation_prompt=True, tokenize=True,
                    return_dict=True, return_tensors="pt", **kwargs,
                )
            except BadRecord:
                continue  # already reported by the dataset's own pass
            except Exception:  # noqa: BLE001 - the chat template or processor refused the prompt (a template
                # that raises on this conversation): the dataset's pass reports the record as encoding_failed
                continue
            questions.append(({k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in inputs},
                              answer))
            layout_references = getattr(self.dataset.records, "references", None)
            self.references.append(layout_references(index) if layout_references else [answer])
        return questions

    @torch.no_grad()
    def loss(self, model: Gemma3Model) -> float | None:
        self.loader.load_state_dict({**self.dataset.state_dict(), "epoch": 0, "position": 0, "epoch_samples": 0})
        total, count = 0.0, 0
        for batch in self.loader:
            if self.slice_batch is not None:
                batch = self.slice_batch(batch)
            summed, targets = step_loss(model, batch, self.device, autocast=self.autocast)
            total += float(summed)
            count += targets
        if self.sum_slices is not None:
            total, count = self.sum_slices(total, count)
        return total / count if count else None

    @torch.no_grad()
    def accuracy(self, model: Gemma3Model) -> tuple[float | None, list[str]]:
        if not self.questions:
            return None, []
        if self.answering_model is None:
            return self._answer(model)
        import torch.distributed as dist

        whole = self.answering_model(model)  # collective
        result = [None if whole is None else self._answer(whole)]
        del whole
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the copy's memory back to the training steps
        dist.broadcast_object_list(result, src=0)
        return result[0]

    def _answer(self, model: Gemma3Model) -> tuple[float | None, list[str]]:
        tokenizer = self.dataset.encoder.tokenizer
        correct, answers = 0, []
        for inputs, expected in self.questions:
            pixels = inputs.get("pixel_values")
            tokens = generate(
                model, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                pixel_values=None if pixels is None else pixels.to(self.device),
                sampling=Sampling(max_new_tokens=self.max_new_tokens, stop_token_ids=self.stop_token_ids,
                                  pad_token_id=self.dataset.encoder.pad_token_id),
            )[0]
            answer = tokenizer.decode([t for t in tokens if t not in self.stop_token_ids], skip_special_tokens=True)
            answers.append(answer)
            correct += normalise_answer(answer) == normalise_answer(expected)
        return correct / len(self.questions), answers

    def __call__(self, model: Gemma3Model) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        try:
            result: dict[str, Any] = {"eval_loss": self.loss(model)}
            accuracy, answers = self.accuracy(model)
            result["eval_accuracy"] = accuracy
            # (not a metric: the trainer writes these to eval_answers.jsonl, not to metrics.jsonl)
            result["eval_answers"] = [{"index": index, "answer": answer, "expected": expected}
                                      for index, (answer, (_, expected)) in enumerate(zip(answers, self.questions))]
            if self.metrics and answers:
                from gemma3vl.evaluation.metrics import METRICS, compute_stats

                stats = compute_stats(self.metrics, answers, self.references)
                result.update({f"eval_{name}": METRICS[name].score(stats[name]) for name in self.metrics})
        finally:
            model.train(was_training)
        return result
