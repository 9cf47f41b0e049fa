"""Context parallelism (``parallel.cp``): each rank of a context-parallel group holds a slice of every sequence.

The ``cp`` ranks of one data-parallel rank read the same micro-batches (``train/run.py`` shards the data by
data-parallel rank only). Each keeps the whole batch's token ids and mask description (a few integers per
token) and computes on its own slice of the sequence:

* **The slice** ("zigzag"). A row of ``T`` tokens (padded to a multiple of ``2 * cp`` with tokens of segment 0
  and no target, which nothing attends to) is cut into ``2 * cp`` equal chunks, and rank ``r`` takes chunks
  ``r`` and ``2*cp - 1 - r``. Under a causal mask a late chunk attends to far more keys than an early one;
  pairing an early chunk with the mirror late one gives every rank the same attention work.
* **Embeddings.** A rank embeds only its slice's tokens, and runs the vision tower only on the images whose
  soft tokens fall in its slice (an image whose block straddles a chunk boundary is run on both ranks: at most
  one extra image per chunk boundary). Each rank's embedding and vision gradients are its slice's share; FSDP, which
  shards over ``dp_shard x cp`` (``ParallelContext.fsdp_mesh``), sums them over the context-parallel ranks.
* **Attention.** :class:`KeyValueExchange` sits in the decoder's cache slot (the ``Cache`` protocol of
  ``model/text.py``). ``keys_info`` gives the whole row's mask description; ``update`` all-gathers every layer's
  keys and values over the context-parallel group, with autograd (its backward is a reduce-scatter of the
  key/value gradients back to the ranks that own them), and puts them back in row order. The decoder then builds
  the mask between the local queries and all keys from positions, segment ids and image block ids, exactly as
  in one process, so sliding windows, bidirectional image blocks and packing are exact by construction.
* **Loss.** Each rank sums the cross-entropy over its slice's targets and counts only those. The trainer sums
  losses and counts over data x context parallel (``ParallelContext.sum_over_batch``), so the step's count is the
  whole batch's, counted once.

Cost: per layer, each rank holds all keys and values of the row (``2 x K x head_dim`` values per token; for the
4B, K=4 and head_dim=256: 4 KiB per token in bf16, 128 MiB at 32k tokens) for the attention of that layer, and
sends its own slice's to the other ranks (an all-gather in forward, a reduce-scatter in backward, recomputed
with activation checkpointing). The queries, the MLPs, the activations and the loss are 1/cp per rank. A ring
exchange that overlaps the transfer of key/value blocks with attention is the later optimisation.

Where it is hooked: :class:`ContextParallelFeed` wraps the trainer's feed and hands out
:class:`ContextParallelBatch` micro-batches (whose token counts are the slice's); ``train.trainer.step_loss``
computes their loss with :meth:`ContextParallelBatch.loss`, through ``model.context_parallel_loss``, which
:func:`apply_context_parallel` installs and FSDP registers as a forward method (so the root unit gathers its
parameters around it, as for ``loss``). The held-out loss is sliced the same way (``train/run.py``: ``shard_batch``,
then the slices' sums added over the context-parallel ranks).

Inside pipeline stages (``parallel.pp``) the same pieces are used stage by stage: ``parallel/pipeline.py`` keeps
each micro-batch whole with this rank's ``SequenceShard``, stage 0 runs :func:`embed_slice`, every stage's blocks a
:class:`KeyValueExchange` over the stage's context-parallel group, the last stage the slice's loss; a pipelined
model's ``context_parallel_loss`` runs one slice through the stages for the held-out loss.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed._functional_collectives as funcol

from gemma3vl.errors import Gemma3VLError
from gemma3vl.model import Gemma3Model, TokenInfo
from gemma3vl.model.loss import IGNORE, linear_cross_entropy
from gemma3vl.parallel.fsdp import unused_image_parameters_term
from gemma3vl.parallel.loss import vocab_parallel_cross_entropy
from gemma3vl.parallel.tensor import TensorParallelGemma3Model, pad_sequence

if TYPE_CHECKING:
    from gemma3vl.data.batch import Batch

# The differentiable all-gather (backward: reduce-scatter); newer torch renames it and deprecates the old name.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


# ---------------------------------------------------------------------------------------------- the slice
def zigzag_indices(length: int, degree: int, rank: int) -> torch.Tensor:
    """Positions of a row of ``length`` tokens (a multiple of ``2 * degree``) that rank ``rank`` holds: chunks
    ``rank`` and ``2*degree - 1 - rank`` of ``2 * degree`` equal chunks, in row order."""
    chunk = length // (2 * degree)
    first = torch.arange(rank * chunk, (rank + 1) * chunk)
    last = torch.arange((2 * degree - 1 - rank) * chunk, (2 * degree - rank) * chunk)
    return torch.cat((first, last))


@dataclass
class SequenceShard:
    """Which positions of the (padded) rows this rank holds, and how to put gathered keys back in row order."""

    rank: int
    degree: int
    length: int  # the padded row length T
    indices: torch.Tensor  # [T / degree] the positions this rank holds
    row_order: torch.Tensor  # [T] for each position of the row, where it is in the rank-major gathered keys
    group: Any = None  # the context-parallel process group

    @classmethod
    def create(cls, length: int, degree: int, rank: int, group: Any = None) -> "SequenceShard":
        if length % (2 * degree):
            raise ValueError(f"a row of {length} tokens does not split into {2 * degree} equal chunks")
        gathered = torch.cat([zigzag_indices(length, degree, r) for r in range(degree)])
        return cls(rank=rank, degree=degree, length=length, indices=zigzag_indices(length, degree, rank),
                   row_order=torch.argsort(gathered), group=group)

    def to(self, device: torch.device) -> "SequenceShard":
        return SequenceShard(self.rank, self.degree, self.length, self.indices.to(device),
                             self.row_order.to(device), self.group)


def pad_batch(batch: Batch, multiple: int) -> Batch:
    """``batch`` right-padded to a multiple of ``multiple`` tokens: segment 0 (never attended to), no target."""
    input_ids, targets, info = pad_sequence(batch.input_ids, batch.targets, batch.info, multiple)
    return replace(batch, input_ids=input_ids, targets=targets, info=info)


def slice_info(info: TokenInfo, indices: torch.Tensor) -> TokenInfo:
    return TokenInfo(positions=info.positions[:, indices], segment_ids=info.segment_ids[:, indices],
                     image_block_ids=info.image_block_ids[:, indices])


# ---------------------------------------------------------------------------------------------- the feed
@dataclass
class ContextParallelBatch:
    """A data-parallel rank's micro-batch as one context-parallel rank sees it: the whole (padded) batch, and
    the slice this rank computes. Its token counts are the slice's, so that summing them over data x context
    parallel ranks counts every token of the step once."""

    whole: Batch
    shard: SequenceShard

    @property
    def num_target_tokens(self) -> int:
        return int((self.whole.targets[:, self.shard.indices] != IGNORE).sum())

    @property
    def num_tokens(self) -> int:
        return int((self.whole.info.segment_ids[:, self.shard.indices] != 0).sum())

    @property
    def num_images(self) -> int:
        """The whole micro-batch's images (every context-parallel rank holds them all)."""
        return self.whole.num_images

    @property
    def sources(self) -> list[list[str]]:
        return self.whole.sources

    def to(self, device: torch.device) -> "ContextParallelBatch":
        return ContextParallelBatch(self.whole.to(device), self.shard.to(device))

    def loss(self, model: Gemma3Model) -> tuple[torch.Tensor, int]:
        """(summed cross-entropy over this slice's targets, their count)."""
        whole = self.whole
        return model.context_parallel_loss(whole.input_ids, whole.targets, whole.info, whole.pixel_values,
                                           self.shard)


def shard_batch(batch: Batch, degree: int, rank: int, group: Any = None, *, sequence_shards: int = 1
                ) -> ContextParallelBatch:
    """Rank ``rank``'s view of ``batch``: padded so that each of the ``2 * degree`` chunks is whole (and, under
    sequence parallelism, so that the slice splits evenly over ``sequence_shards`` TP ranks)."""
    whole = pad_batch(batch, 2 * degree * sequence_shards)
    return ContextParallelBatch(whole, SequenceShard.create(whole.input_ids.shape[1], degree, rank, group))


class ContextParallelFeed:
    """The trainer's step feed (``train.steps.StepFeed``) with every micro-batch handed out as this rank's
    :class:`ContextParallelBatch`. Resuming is the wrapped feed's (the context-parallel ranks of a data-parallel
    rank read the same data)."""

    def __init__(self, feed, degree: int, rank: int, group: Any = None, *, sequence_shards: int = 1):
        self.feed = feed
        self.degree = degree
        self.rank = rank
        self.group = group
        self.sequence_shards = sequence_shards

    def next_step(self) -> list[ContextParallelBatch]:
        return [shard_batch(batch, self.degree, self.rank, self.group, sequence_shards=self.sequence_shards)
                for batch in self.feed.next_step()]

    def state_dict(self) -> dict[str, Any]:
        return self.feed.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.feed.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:  # anything else (the loader, ...) is the wrapped feed's
        return getattr(self.__dict__["feed"], name)


# ---------------------------------------------------------------------------------------------- attention
class KeyValueExchange:
    """The decoder's cache slot under context parallelism (``model.text.Cache``): every layer's keys and values
    are all-gathered over the context-parallel group and returned in row order, described by the whole row's
    ``TokenInfo``. Holds nothing between layers or steps."""

    def __init__(self, whole_info: TokenInfo, shard: SequenceShard):
        self.whole_info = whole_info
        self.shard = shard

    def keys_info(self, layer_type: str, new: TokenInfo) -> TokenInfo:
        return self.whole_info

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gather(k), self.gather(v)

    def end_step(self) -> None:
        pass

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """[B, K, T/cp, hd] of this rank -> [B, K, T, hd] of the whole row, differentiably (the gradient of the
        result is summed back onto each rank's own slice)."""
        batch, heads, length, head_dim = local.shape
        gathered = _all_gather_autograd(local.contiguous(), 0, self.shard.group)  # [cp * B, K, T/cp, hd]
        gathered = gathered.view(self.shard.degree, batch, heads, length, head_dim).permute(1, 2, 0, 3, 4)
        rank_major = gathered.reshape(batch, heads, self.shard.degree * length, head_dim)
        return rank_major.index_select(2, self.shard.row_order)


# ---------------------------------------------------------------------------------------------- the loss
def embed_slice(model: Gemma3Model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                indices: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Embeddings [B, T/cp, D] of the slice ``indices`` of ``input_ids`` [B, T], with the soft tokens of the
    images that fall in it; and whether any image was run through the vision tower.

    ``pixel_values`` holds every image of the batch in row-major order of their blocks (as ``Gemma3Model.embed``
    takes them): the j-th image soft token of the batch is token ``j % per_image`` of image ``j // per_image``.
    """
    embeds = model.text.embed_tokens(input_ids[:, indices])
    image_token_id = model.image_token_id
    if image_token_id is None:
        if pixel_values is not None:
            raise Gemma3VLError("this is a text-only Gemma 3 checkpoint: it cannot take images")
        return embeds, False
    slots = input_ids == image_token_id
    slot_count = int(slots.sum())
    if pixel_values is None:
        if slot_count:
            raise Gemma3VLError(f"the input has {slot_count} image soft tokens but no images were given")
        return embeds, False
    per_image = model.config.mm_tokens_per_image
    if pixel_values.shape[0] * per_image != slot_count:
        raise Gemma3VLError(
            f"{pixel_values.shape[0]} image(s) give {pixel_values.shape[0] * per_image} soft tokens, but the input "
            f"has {slot_count} <image_soft_token> positions ({per_image} per image expected)"
        )
    slot_number = (slots.flatten().cumsum(0) - 1).view_as(slots)[:, indices]  # row-major over the whole batch
    local_slots = slots[:, indices]
    numbers = slot_number[local_slots]  # the slice's soft tokens, in its own row-major order
    if numbers.numel() == 0:
        return embeds, False
    needed, which = torch.unique(numbers // per_image, return_inverse=True)
    features = model.embed_images(pixel_values[needed])  # [images in the slice, per_image, D]
    picked = features[which, numbers % per_image]
    return embeds.masked_scatter(local_slots[..., None], picked.to(embeds.dtype)), True


def context_parallel_loss(model: Gemma3Model, input_ids: torch.Tensor, targets: torch.Tensor, info: TokenInfo,
                          pixel_values: torch.Tensor | None, shard: SequenceShard) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the targets of ``shard``'s slice, their count), for a batch that every rank of
    the context-parallel group holds whole: [B, T] with T a multiple of ``2 * cp``."""
    if input_ids.shape[1] != shard.length:
        raise ValueError(f"the batch has {input_ids.shape[1]} tokens per row, the shard was cut for {shard.length}")
    indices = shard.indices
    embeds, ran_vision = embed_slice(model, input_ids, pixel_values, indices)
    hidden = model.text(embeds, slice_info(info, indices), KeyValueExchange(info, shard))
    local_targets = targets[:, indices]
    if isinstance(model, TensorParallelGemma3Model):  # the output matrix is vocab-parallel
        summed, count = vocab_parallel_cross_entropy(hidden, model.text.output_weight, local_targets,
                                                     softcap=model.text.logit_softcap)
    else:
        summed, count = linear_cross_entropy(hidden, model.text.output_weight, local_targets,
                                             softcap=model.text.logit_softcap,
                                             compile_backend=model.text.loss_compile_backend)
    if model.vision is not None and not ran_vision:
        # Other ranks may have run the vision tower: every rank must reduce a gradient for it (zero here).
        summed = summed + unused_image_parameters_term(model)
    return summed, count


def apply_context_parallel(model: Gemma3Model) -> Gemma3Model:
    """Give ``model`` its ``context_parallel_loss`` method (before FSDP, which registers it as a forward method).
    The model's own ``loss`` (whole rows) is untouched."""
    model.context_parallel_loss = partial(context_parallel_loss, model)
    return model
