"""The two data structures the pipeline hands on: one encoded conversation, and one model batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gemma3vl.model.attention import TokenInfo

IGNORE = -100


@dataclass
class Sample:
    """One conversation, tokenised exactly as transformers' processor + chat template does.

    ``labels[t]`` is ``input_ids[t]`` where the token belongs to an assistant turn (trained on) and
    ``IGNORE`` elsewhere (system, user, image tokens, ``<start_of_image>``/``<end_of_image>``). Labels are
    *not* shifted: position t's target is ``labels[t + 1]``, worked out when batching.
    ``pixel_values`` holds the images (and pan & scan crops) in the order their blocks appear.
    """

    input_ids: torch.Tensor  # [T] long
    labels: torch.Tensor  # [T] long
    pixel_values: torch.Tensor | None = None  # [N, 3, S, S] float32
    source: str = ""  # "file:line" for messages

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


@dataclass
class Batch:
    """Rows of one or more packed conversations.

    ``targets[b, t]`` is the token position t must predict (the next token of the same conversation when
    that token is trained on) or ``IGNORE``; so the loss never crosses a conversation boundary.
    ``info`` is the mask description (positions restart per conversation, segment ids, image blocks).
    ``pixel_values`` are all images of the batch in row-major order of their blocks.
    """

    input_ids: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T]
    info: TokenInfo
    pixel_values: torch.Tensor | None = None
    sources: list[list[str]] = field(default_factory=list)  # per row, the samples packed into it

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])

    @property
    def num_target_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    @property
    def num_tokens(self) -> int:
        return int((self.info.segment_ids != 0).sum())

    def to(self, device: torch.device) -> "Batch":
        return Batch(
            input_ids=self.input_ids.to(device),
            targets=self.targets.to(device),
            info=TokenInfo(
                positions=self.info.positions.to(device),
                segment_ids=self.info.segment_ids.to(device),
                image_block_ids=self.info.image_block_ids.to(device),
            ),
            pixel_values=None if self.pixel_values is None else self.pixel_values.to(device),
            sources=self.sources,
        )
