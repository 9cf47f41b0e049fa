"""The training dataset: records -> encoded samples, in a seeded order per epoch, resumable to the sample.

Position is kept as (epoch, how many records of that epoch's order were consumed). The order is a pure
function of ``(seed, epoch)`` and the encoding a pure function of the record, so a run restored from
:meth:`ConversationDataset.state_dict` yields exactly the sample the interrupted run would have yielded next.
Bad records are skipped (or fatal) as :class:`DataConfig` says and counted in :meth:`~ConversationDataset.summary`.

Data parallelism (:meth:`ConversationDataset.shard`): rank r of n reads ``order[start + r :: n]`` of each epoch,
so together the ranks read the order once, in about the order one process would. Each rank keeps its own
position in its share; a checkpoint holds every rank's state (``{"ranks": [...]}``) and resumes exactly on
the same number of ranks. On a different number, the ranks continue from where the slowest rank stood:
``start`` moves past the records all ranks had read, and the new ranks stride from there (records that only
some ranks had read are read again; with one sample per row all ranks read the same number, so none are).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma3vl.data.batch import Sample
from gemma3vl.data.encode import ConversationEncoder
from gemma3vl.data.images import ImageLoader
from gemma3vl.data.records import BadRecord, Conversation, parse_record
from gemma3vl.data.settings import DataConfig
from gemma3vl.data.sources import open_records
from gemma3vl.errors import Gemma3VLError

logger = logging.getLogger("gemma3vl.data")


@dataclass
class DataSummary:
    """What reading the data has met so far (over all epochs read: a record skipped twice counts twice)."""

    records: int = 0  # records read
    samples: int = 0  # samples produced
    truncated: int = 0  # samples whose trailing turns were dropped to fit seq_length
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, str] = field(default_factory=dict)  # reason -> the first message with it

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "DataSummary") -> "DataSummary":
        """Add another reader's counts to these (data-parallel ranks each keep their own)."""
        self.records += other.records
        self.samples += other.samples
        self.truncated += other.truncated
        self.skipped.update(other.skipped)
        for reason, example in other.examples.items():
            self.examples.setdefault(reason, example)
        return self

    def record_skip(self, bad: BadRecord) -> None:
        self.skipped[bad.reason] += 1
        self.examples.setdefault(bad.reason, str(bad))

    def __str__(self) -> str:
        text = f"{self.records} records read, {self.samples} samples, {self.truncated} truncated, "
        text += f"{self.num_skipped} skipped"
        if self.skipped:
            text += " (" + ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items())) + ")"
        for reason in sorted(self.examples):
            text += f"\n  e.g. {reason}: {self.examples[reason]}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "samples": self.samples,
            "truncated": self.truncated,
            "skipped": dict(self.skipped),
            "examples": dict(self.examples),
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "DataSummary":
        return cls(
            records=int(state["records"]),
            samples=int(state["samples"]),
            truncated=int(state["truncated"]),
            skipped=Counter(state["skipped"]),
            examples=dict(state["examples"]),
        )


class ConversationDataset:
    """Iterating gives one epoch of samples from the current position; the next iteration is the next epoch."""

    def __init__(self, config: DataConfig, processor: Any):
        self.config = config
        self.records = open_records(
            config.path, source_format=config.source_format, split=config.split, columns=config.columns,
            layout=config.layout,
        )
        if not len(self.records):
            raise Gemma3VLError(f"{config.path}: the dataset holds no records")
        self.encoder = ConversationEncoder(
            processor,
            seq_length=config.seq_length,
            truncation=config.truncation,
            pan_and_scan=config.pan_and_scan,
            image_loader=ImageLoader(
                allow_remote_images=config.allow_remote_images,
                allow_outside_paths=config.allow_outside_paths,
                max_image_pixels=config.max_image_pixels,
                max_remote_bytes=config.max_remote_image_bytes,
            ),
        )
        self.epoch = 0
        self.position = 0  # records of this rank's share of this epoch's order already consumed
        self.epoch_samples = 0  # samples produced so far in this epoch
        self.start = 0  # where in this epoch's order the ranks began striding (moves when resharded)
        self.rank, self.num_ranks = 0, 1
        self._summary = DataSummary()
        self._reported: set[int] = set()  # bad records already logged (every read is counted, each logged once)

    def shard(self, rank: int, num_ranks: int) -> "ConversationDataset":
        """Read only data-parallel rank ``rank``'s share of ``num_ranks`` (call before iterating)."""
        if not 0 <= rank < num_ranks:
            raise Gemma3VLError(f"data rank {rank} is not in 0..{num_ranks - 1}")
        self.rank, self.num_ranks = rank, num_ranks
        return self

    @classmethod
    def for_checkpoint(cls, config: DataConfig, model_dir: str | Path) -> "ConversationDataset":
        """The dataset encoded with the processor of the checkpoint in ``model_dir``."""
        from gemma3vl import bridge
        from gemma3vl.infer.prompt import load_processor

        return cls(config, load_processor(model_dir, bridge.read_config(model_dir)))

    def __len__(self) -> int:
        """The number of records (samples may be fewer: bad records are skipped)."""
        return len(self.records)

    def order(self, epoch: int) -> list[int]:
        """Record indices in the order epoch ``epoch`` visits them."""
        indices = list(range(len(self.records)))
        if self.config.shuffle:
            # A string seed is hashed with SHA-512 by ``random``: the same order on every platform and run.
            random.Random(f"gemma3vl.data:{self.config.seed}:{epoch}").shuffle(indices)
        return indices

    def __iter__(self) -> Iterator[Sample]:
        order = self.order(self.epoch)[self.start + self.rank::self.num_ranks]
        while self.position < len(order):
            index = order[self.position]
            # Advance before yielding: a state_dict taken after receiving a sample resumes after it.
            self.position += 1
            sample = self.read(index)
            if sample is not None:
                self.epoch_samples += 1
                yield sample
        if order and self.epoch_samples == 0:
            if self.num_ranks == 1:
                split = "" if self.config.split == "train" else f" (split {self.config.split!r})"
                raise Gemma3VLError(f"{self.config.path}{split}: no usable record in a whole epoch; {self._summary}")
            # Only this rank's share of the order: the other ranks', or this rank's share of the next epoch, may
            # hold usable records. The reader of the batches (train.steps.StepFeed) stops when two epochs in a
            # row give this rank nothing.
            logger.warning("data rank %d of %d: no usable record in its share of epoch %d", self.rank,
                           self.num_ranks, self.epoch)
        self.epoch += 1
        self.position = 0
        self.epoch_samples = 0
        self.start = 0

    def read(self, index: int) -> Sample | None:
        """Record ``index`` encoded, or ``None`` when it is bad and ``on_bad_record`` is ``skip``."""
        self._summary.records += 1
        try:
            conversation = self.conversation(index)
            sample, truncated = self.encoder.fit(self.encoder.encode_whole(conversation))
        except BadRecord as bad:
            if self.config.on_bad_record == "error":
                raise
            self._summary.record_skip(bad)
            if index not in self._reported:  # not again each epoch (a small file) or each held-out evaluation
                self._reported.add(index)
                logger.warning("skipping record %s", bad)
            return None
        self._summary.truncated += int(truncated)
        self._summary.samples += 1
        return sample

    def conversation(self, index: int) -> Conversation:
        """Record ``index`` parsed (raises :class:`BadRecord`), its image paths relative to where they start."""
        raw, source = self.records.record(index)
        base_dir = getattr(self.records, "record_base_dir", None)  # (the files of a data directory)
        return parse_record(raw, source, self.records.base_dir if base_dir is None else base_dir(index),
                            record_format=self.config.record_format)

    def summary(self) -> DataSummary:
        return self._summary

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "epoch_samples": self.epoch_samples,
            "start": self.start,
            "rank": self.rank,
            "num_ranks": self.num_ranks,
            "seed": self.config.seed,
            "shuffle": self.config.shuffle,
            "num_records": len(self.records),
            "summary": self._summary.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`, or from every rank's states ``{"ranks": [state, ...]}``."""
        states = state["ranks"] if "ranks" in state else [state]
        expected = {"seed": self.config.seed, "shuffle": self.config.shuffle, "num_records": len(self.records)}
        for one in states:
            changed = {key: (one.get(key), value) for key, value in expected.items() if one.get(key) != value}
            if changed:
                detail = ", ".join(f"{key} was {old!r}, is {new!r}" for key, (old, new) in changed.items())
                raise Gemma3VLError(f"{self.config.path}: cannot resume, the data or its order changed ({detail})")
        if len(states) == self.num_ranks and all(one.get("num_ranks", 1) == self.num_ranks for one in states):
            mine = states[self.rank]
            self.epoch = int(mine["epoch"])
            self.position = int(mine["position"])
            self.epoch_samples = int(mine["epoch_samples"])
            self.start = int(mine.get("start", 0))
            self._summary = DataSummary.from_dict(mine["summary"])
            return
        self._reshard(states)

    def _reshard(self, states: list[dict[str, Any]]) -> None:
        """Continue on this number of ranks from states saved on another number (see the module docstring)."""
        saved_ranks = len(states)
        epoch = min(int(one["epoch"]) for one in states)
        behind = [one for one in states if int(one["epoch"]) == epoch]
        consumed = min(int(one["position"]) for one in behind)
        if len({(int(one["epoch"]), int(one["position"])) for one in states}) > 1:
            logger.warning("resuming on %d data-parallel rank(s) from %d whose positions differ: records read by "
                           "only some of them are read again", self.num_ranks, saved_ranks)
        self.epoch = epoch
        self.start = int(behind[0].get("start", 0)) + consumed * saved_ranks
        if self.start >= len(self.records):
            self.epoch, self.start = epoch + 1, 0
        self.position = 0
        self.epoch_samples = sum(int(one["epoch_samples"]) for one in behind) if self.epoch == epoch else 0
        # The counts so far travel with rank 0 (the run's summary is the sum over ranks).
        self._summary = DataSummary()
        if self.rank == 0:
            for one in states:
                self._summary.merge(DataSummary.from_dict(one["summary"]))
