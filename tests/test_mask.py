"""The one mask description against the rule of reference §5.2 (itself taken from transformers)."""

import torch

from gemma3vl.model.attention import TokenInfo, dense_mask, image_block_ids

IMG = 9
# tokens: t t t I I I I t t J J t  (reference §5.2 example, W=3)
IDS = torch.tensor([[1, 1, 1, IMG, IMG, IMG, IMG, 1, 1, IMG, IMG, 1]])
FULL_ROWS = [
    "■...........", "■■..........", "■■■.........", "■■■■■■■.....", "■■■■■■■.....", "■■■■■■■.....",
    "■■■■■■■.....", "■■■■■■■■....", "■■■■■■■■■...", "■■■■■■■■■■■.", "■■■■■■■■■■■.", "■■■■■■■■■■■■",
]
SLIDING_ROWS = [
    "■...........", "■■..........", "■■■.........", ".■■■■■■.....", "..■■■■■.....", "...■■■■.....",
    "....■■■.....", ".....■■■....", "......■■■...", ".......■■■■.", "........■■■.", ".........■■■",
]


def render(mask: torch.Tensor) -> list[str]:
    return ["".join("■" if v else "." for v in row) for row in mask[0, 0].tolist()]


def test_reference_example_full_and_sliding():
    info = TokenInfo.for_tokens(IDS, image_token_id=IMG)
    assert image_block_ids(IDS, IMG).tolist() == [[-1, -1, -1, 0, 0, 0, 0, -1, -1, 1, 1, -1]]
    assert render(dense_mask(info, info, None)) == FULL_ROWS
    assert render(dense_mask(info, info, 3)) == SLIDING_ROWS


def test_packing_and_padding():
    # two packed conversations and one padding token: no attention across segments, positions restart
    info = TokenInfo(
        positions=torch.tensor([[0, 1, 2, 0, 1, 0]]),
        segment_ids=torch.tensor([[1, 1, 1, 2, 2, 0]]),
        image_block_ids=torch.tensor([[-1, 0, 0, -1, -1, -1]]),
    )
    mask = dense_mask(info, info, None)[0, 0]
    assert mask[1, 2]  # bidirectional inside the image
    assert not mask[3, :3].any()  # second conversation cannot see the first
    assert mask[4, 3] and mask[4, 4]
    assert mask[5].all()  # a padding query row is opened (finite softmax), never used
    assert not mask[:5, 5].any()  # nobody attends to padding
