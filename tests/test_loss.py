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


def chunk_inputs(rows: int, vocab: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=generator) * 4).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    return logits, targets


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunk_softmax_part_is_the_gradient_of_the_plain_loss(softcap):
    """``chunk_loss_and_grad`` against autograd through ``F.cross_entropy`` of the (capped) logits, float64."""
    from gemma3vl.model.loss import chunk_loss_and_grad

    logits, targets = chunk_inputs(6, 40, torch.float64)
    total, grad = chunk_loss_and_grad(logits, targets, softcap, with_grad=True)
    leaf = logits.clone().requires_grad_(True)
    capped = torch.tanh(leaf / softcap) * softcap if softcap is not None else leaf
    expected = F.cross_entropy(capped, targets, reduction="sum")
    expected.backward()
    torch.testing.assert_close(total, expected.detach())
    torch.testing.assert_close(grad, leaf.grad)
    assert grad.dtype == torch.float64
    assert chunk_loss_and_grad(logits, targets, softcap, with_grad=False)[1] is None


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_compiled_chunk_softmax_part_equals_eager(softcap):
    """What ``parallel.compile`` trains with: the softmax part compiled by inductor (here its CPU code), on two chunk
    lengths (the second compiles a dynamic-shape graph), in float32 and bf16, equals the eager function."""
    from gemma3vl.model.loss import chunk_loss_and_grad, compiled_chunk_loss_and_grad

    compiled = compiled_chunk_loss_and_grad("inductor")
    for rows, dtype in ((7, torch.float32), (5, torch.float32), (9, torch.bfloat16)):
        logits, targets = chunk_inputs(rows, 300, dtype, seed=rows)
        expected_total, expected_grad = chunk_loss_and_grad(logits, targets, softcap, with_grad=True)
        total, grad = compiled(logits, targets, softcap, True)
        assert grad.dtype == dtype and total.dtype == torch.float32
        torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-4)
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-5}
        torch.testing.assert_close(grad, expected_grad, **tolerance)


@pytest.mark.parametrize("chunk_size", [64, 5])
def test_bf16_gradients_one_chunk_and_several(chunk_size):
    """bf16 hidden states and weights (``model.dtype=bfloat16``): one chunk keeps the output matrix's gradient in
    bf16, several sum it in float32; both match float64 autograd to bf16 precision, and the gradients come back in
    the parameters' dtype."""
    torch.manual_seed(1)
    hidden64 = torch.randn(2, 11, 32, dtype=torch.float64)
    weight64 = torch.randn(90, 32, dtype=torch.float64) / 4
    targets = torch.randint(0, 90, (2, 11))
    targets[0, :2] = IGNORE
    hidden = hidden64.to(torch.bfloat16).requires_grad_(True)
    weight = weight64.to(torch.bfloat16).requires_grad_(True)
    total, count = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    (total / count).backward()
    leaf_h = hidden.detach().double().requires_grad_(True)
    leaf_w = weight.detach().double().requires_grad_(True)
    expected = F.cross_entropy((leaf_h @ leaf_w.T).reshape(-1, 90), targets.reshape(-1), ignore_index=IGNORE)
    expected.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(float(total.detach() / count), float(expected), rtol=1e-2, atol=0)
    torch.testing.assert_close(hidden.grad.double(), leaf_h.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(weight.grad.double(), leaf_w.grad, rtol=2e-2, atol=2e-3)


def test_no_gradient_is_computed_under_no_grad(monkeypatch):
    """The held-out loss runs under ``torch.no_grad``, where ``needs_input_grad`` still says True: the chunks'
    gradients (and a ``[vocab, hidden]`` buffer) were computed for nothing. The loss is the same either way."""
    import gemma3vl.model.loss as loss_module

    asked = []
    plain = loss_module.chunk_loss_and_grad

    def recording(logits, targets, softcap, with_grad):
        asked.append(with_grad)
        return plain(logits, targets, softcap, with_grad)

    monkeypatch.setattr(loss_module, "chunk_loss_and_grad", recording)
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(0, 13, (2, 5))
    with torch.no_grad():
        evaluated, count = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    assert asked == [False] * 3 and count == 10
    trained, _ = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    assert asked[3:] == [True] * 3
    assert torch.equal(evaluated, trained.detach())
    trained.backward()
    assert hidden.grad is not None and weight.grad is not None
