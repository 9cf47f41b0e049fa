"""How the ranks are arranged: the parallel degrees, checked against the world size and the model.

The mesh has five dimensions, outermost first: ``pp`` (pipeline stages), ``dp_replicate`` (HSDP replicas),
``dp_shard`` (FSDP2 sharding), ``cp`` (context parallel: each rank holds a slice of every sequence) and ``tp``
(tensor + sequence parallel). TP is innermost so that its collectives, the most frequent and the most
latency-bound, stay between neighbouring ranks (on one node when ``tp`` divides the GPUs per node); CP next,
for its per-layer key/value exchange; pipeline stages outermost, as their point-to-point traffic is the
lightest. Degrees of 1 cost nothing: every dimension is always in the mesh.

A user writes the degrees as ``parallel.*`` settings; exactly one of them may be ``-1``, "whatever is
left" of the world size once the others are placed.
"""

from __future__ import annotations

from dataclasses import dataclass

from gemma3vl.config import Gemma3Config
from gemma3vl.errors import Gemma3VLError

DEGREES = ("dp_replicate", "dp_shard", "tp", "pp", "cp")
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    cp: int
    world_size: int

    @classmethod
    def resolve(cls, degrees: dict[str, int], world_size: int) -> "ParallelDims":
        """Fill in the one ``-1`` degree and check that the degrees multiply to ``world_size``.

        ``degrees`` maps each name of ``DEGREES`` to its setting.
        """
        values = {name: int(degrees[name]) for name in DEGREES}
        for name, value in values.items():
            if value == 0 or value < -1:
                raise Gemma3VLError(f"parallel.{name}={value}: a degree is a positive integer, or -1 for the rest")
        rest = [name for name, value in values.items() if value == -1]
        if len(rest) > 1:
            raise Gemma3VLError(
                f"parallel.{' and parallel.'.join(rest)} are all -1: at most one degree can take the rest of the ranks"
            )
        placed = 1
        for value in values.values():
            placed *= value if value != -1 else 1
        if rest:
            if world_size % placed:
                raise Gemma3VLError(
                    f"{_product(values)} needs a multiple of {placed} ranks, but {_launched(world_size)}: launch "
                    f"a multiple of {placed} processes (torchrun --nproc-per-node {placed}), or choose degrees whose "
                    f"product divides {world_size}"
                )
            values[rest[0]] = world_size // placed
        total = 1
        for value in values.values():
            total *= value
        if total != world_size:
            others = total // values["dp_shard"]  # what parallel.dp_shard=-1 would have to divide the world size by
            fix = ("set parallel.dp_shard=-1 to give the data-parallel dimension the rest" if world_size % others == 0
                   else f"choose degrees whose product divides {world_size} (the others than parallel.dp_shard "
                        f"alone make {others})")
            raise Gemma3VLError(
                f"{_product(values)} = {total} ranks, but {_launched(world_size)}: {fix}, or launch {total} processes "
                f"(torchrun --nproc-per-node {total}, or as many across nodes)"
            )
        return cls(**values, world_size=world_size)

    # ------------------------------------------------------------------ what is on
    @property
    def dp(self) -> int:
        """Ranks that see different data: the replicas times the FSDP shards."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP shards over the data-parallel ranks and the context-parallel ones (which hold the same
        parameters and must sum their gradients too)."""
        return self.dp * self.cp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        parts = [f"{name}={getattr(self, name)}" for name in DEGREES if getattr(self, name) > 1]
        return f"{self.world_size} rank(s): " + (", ".join(parts) if parts else "no parallelism")

    # ------------------------------------------------------------------ checks
    def validate(self, config: Gemma3Config, *, peft: bool = False, seq_length: int | None = None,
                 sequence_parallel: bool = False, pp_schedule: str = "1f1b", pp_stages_per_rank: int = 2,
                 pp_microbatches: int | None = None) -> None:
        """Refuse layouts this model cannot take, saying which setting to change and to what.

        ``seq_length`` (``train.seq_length``) and ``sequence_parallel`` are needed to check context parallelism;
        ``pp_schedule``, ``pp_stages_per_rank`` and ``pp_microbatches`` (the micro-batches each data-parallel
        rank runs per step, when known) to check pipeline parallelism.
        """
        if self.pp > 1:
            from gemma3vl.parallel.pipeline import check_pipeline  # (imports torch.distributed.pipelining)

            check_pipeline(self.pp, config.text.num_hidden_layers, pp_schedule, pp_stages_per_rank, pp_microbatches)
            # LoRA/DoRA: the adapters live in the stage that holds their block (parallel/pipeline.py).
        if self.cp > 1:
            self._check_context_parallel(seq_length, sequence_parallel)
        if self.tp > 1:
            text = config.text
            # A rank must hold whole KV groups (DESIGN.md: QKV is [K, (G+2)*hd, D], sharded on K) ...
            self._check_divides(text.num_key_value_heads, "the model's key/value heads (num_key_value_heads)")
            # ... whole rows of the MLP and of the vocabulary (even shards keep the vocab offsets simple).
            self._check_divides(text.intermediate_size, "the MLP width (intermediate_size)")
            self._check_divides(text.vocab_size, "the vocabulary (vocab_size)")
            # LoRA/DoRA adapters follow their projection's sharding (parallel/tensor.py): nothing more to check.

    def _check_context_parallel(self, seq_length: int | None, sequence_parallel: bool) -> None:
        """Context parallelism (``parallel/context.py``) cuts each row into ``2 x cp`` chunks (two per rank, for
        balanced causal work), each a multiple of the TP degree under sequence parallelism; rows are padded to
        that, but a row shorter than the chunk count leaves ranks without a single real token. With pipeline
        stages (``parallel.pp``) the same holds inside each stage: its context-parallel ranks split every row."""
        if seq_length is None:
            return
        per_chunk = self.tp if sequence_parallel and self.tp > 1 else 1  # tokens a chunk must split into
        chunks = 2 * self.cp * per_chunk
        if seq_length < chunks:
            split = f" of {per_chunk} tokens or more (one per TP rank under sequence parallelism)" * (per_chunk > 1)
            stages = f" (in each of the parallel.pp={self.pp} pipeline stages)" * (self.pp > 1)
            raise Gemma3VLError(
                f"parallel.cp={self.cp} cuts each row into {2 * self.cp} chunks{split}{stages}, two per "
                f"context-parallel rank, but train.seq_length={seq_length} is shorter than {chunks}: raise "
                f"train.seq_length to at least {chunks}, or set parallel.cp to at most "
                f"{max(seq_length // (2 * per_chunk), 1)}"
            )

    def _check_divides(self, count: int, what: str) -> None:
        if count % self.tp:
            choices = [d for d in range(1, count + 1) if count % d == 0 and self.world_size % d == 0]
            raise Gemma3VLError(
                f"parallel.tp={self.tp} does not divide {what}, {count}: each tensor-parallel rank must hold an "
                f"equal whole share; choose parallel.tp from {', '.join(map(str, choices))} and give the other "
                f"ranks to parallel.dp_shard (-1 does that)"
            )


def _product(values: dict[str, int]) -> str:
    return " x ".join(f"{name}={values[name]}" for name in DEGREES)


def _launched(world_size: int) -> str:
    return "this is a single process" if world_size == 1 else f"{world_size} processes were launched"
