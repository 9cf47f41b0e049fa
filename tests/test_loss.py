"""The chunked linear cross-entropy equals the plain computation: loss and both gradients."""

import pytest
import torch
import torch.nn.functional as F

from gemma3vl.model.loss import IGNORE, linear_cross_entropy


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk_size", [3, 7, 1000])
def test_matches_plain_cross_entropy(softcap, chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9))
    targets[0, :3] = IGNORE
    targets[1, -1] = IGNORE

    total, count = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size, softcap=softcap)
    (total / count * 3.0).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    logits = hidden @ weight.T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    expected = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), ignore_index=IGNORE)
    (expected * 3.0).backward()
    assert count == int((targets != IGNORE).sum())
    torch.testing.assert_close(total / count, expected)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


def test_frozen_weight_and_no_targets():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(11, 8)  # frozen (LoRA): no gradient is computed for it
    total, count = linear_cross_entropy(hidden, weight, torch.tensor([1, 2, IGNORE, 3]))
    total.backward()
    assert count == 3 and hidden.grad is not None and hidden.grad[2].abs().sum() == 0
    empty, zero = linear_cross_entropy(hidden, weight, torch.full((4,), IGNORE))
    assert zero == 0 and float(empty.detach()) == 0.0
