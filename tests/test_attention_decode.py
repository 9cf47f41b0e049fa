"""A decode step's attention (one query row, ``attend_one_query``) against PyTorch's SDPA on the same inputs.

The oracle here is ``torch.nn.functional.scaled_dot_product_attention`` itself; the whole decode path is checked
against transformers in test_generate*.py.
"""

import pytest
import torch
import torch.nn.functional as F

from gemma3vl.model.attention import attend, attend_one_query


def inputs(batch=3, kv_heads=2, groups=4, length=37, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, 1, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    mask = torch.rand(batch, 1, 1, length, generator=g) < 0.6  # holes: left padding, windows, unfilled slots
    mask[..., -1] = True  # a decode row always sees itself
    return q, k, v, mask


def sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale,
                                          enable_gqa=True)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_one_query_equals_sdpa_with_gqa_and_holes(traced):
    q, k, v, mask = inputs()
    # traced: dynamo sees is_compiling() and takes the reduction form that inductor fuses on a GPU
    fn = torch.compile(attend_one_query, backend="eager", fullgraph=True) if traced else attend_one_query
    torch.testing.assert_close(fn(q, k, v, mask, 0.3), sdpa(q, k, v, mask, 0.3), atol=1e-5, rtol=1e-5)


def test_one_query_mask_broadcast_and_none():
    q, k, v, mask = inputs()
    shared = mask[:1]
    torch.testing.assert_close(attend_one_query(q, k, v, shared, 0.5),
                               sdpa(q, k, v, shared.expand_as(mask), 0.5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend_one_query(q, k, v, None, 0.5), sdpa(q, k, v, None, 0.5), atol=1e-5, rtol=1e-5)


def test_attend_routes_one_query_rows_and_keeps_dtype():
    q, k, v, mask = inputs(dtype=torch.bfloat16)
    out = attend(q, k, v, mask, 0.25)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    # float32 inside, rounded once: within bf16 rounding of the float32 reference
    torch.testing.assert_close(out.float(), sdpa(q, k, v, mask, 0.25), atol=1e-2, rtol=1e-2)
    longer = torch.cat([q, q], dim=2)  # two query rows still take SDPA
    torch.testing.assert_close(attend(longer, k, v, mask.expand(-1, -1, 2, -1), 0.25)[:, :, :1], out,
                               atol=1e-2, rtol=1e-2)
