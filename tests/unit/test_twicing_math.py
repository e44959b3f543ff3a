"""Twicing attention against an independent float64 reference ``(2A − A²)V``."""

from __future__ import annotations

import pytest
import torch

from model.attention.backend import attend
from model.attention.twicing import twicing_attention

# fresh random inputs each run; the seed is printed on failure for reproduction
SEED = torch.seed()


def reference(q, k, v, *, causal: bool, scale: float | None, twice: bool) -> torch.Tensor:
    """Explicit float64 attention on [b, s, h, d]; GQA by mapping query head h -> group h // r."""
    q, k, v = (t.double() for t in (q, k, v))
    b, s, h, d = q.shape
    r = h // k.shape[2]
    kk = torch.stack([k[:, :, i // r] for i in range(h)], dim=2)
    vv = torch.stack([v[:, :, i // r] for i in range(h)], dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) * (scale if scale is not None else d**-0.5)
    if causal:
        allowed = torch.ones(s, s, dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    a = scores.softmax(dim=-1)
    if twice:
        a = 2 * a - a @ a
    return torch.einsum("bhqk,bkhd->bqhd", a, vv)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


CASES = [
    # (batch, seq, heads, groups, head_dim, scale, causal)
    (2, 1, 4, 4, 16, None, True),
    (2, 7, 4, 4, 16, None, True),
    (1, 33, 6, 6, 8, None, True),
    (2, 64, 8, 2, 16, None, True),  # GQA 4:1
    (2, 31, 4, 1, 32, None, True),  # MQA
    (2, 20, 4, 2, 16, 0.37, True),  # non-default scale
    (2, 17, 4, 4, 16, None, False),
]


@pytest.mark.parametrize("b,s,h,g,d,scale,causal", CASES)
def test_twicing_matches_float64_reference(b, s, h, g, d, scale, causal):
    gen = torch.Generator().manual_seed(SEED + s * 131 + h)
    q = torch.randn(b, s, h, d, generator=gen, requires_grad=True)
    k = torch.randn(b, s, g, d, generator=gen, requires_grad=True)
    v = torch.randn(b, s, g, d, generator=gen, requires_grad=True)
    out = twicing_attention(q, k, v, causal=causal, softmax_scale=scale)
    assert out.shape == q.shape

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, causal=causal, scale=scale, twice=True)
    assert rel_err(out, ref) <= 1e-6, f"seed {SEED}"

    grad_out = torch.randn(out.shape, generator=gen)
    out.backward(grad_out)
    ref.backward(grad_out.double())
    for name, ours, theirs in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
        assert rel_err(ours.grad, theirs.grad) <= 1e-5, f"d{name}, seed {SEED}"


@pytest.mark.parametrize("g", [4, 2])
def test_generic_two_pass_path_matches_reference(g):
    """float64 takes the autograd composition of two ``attend`` calls (the non-CPU-kernel path)."""
    gen = torch.Generator().manual_seed(SEED + 17 * g)
    q = torch.randn(2, 23, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (
        torch.randn(2, 23, g, 8, generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in range(2)
    )
    out = twicing_attention(q, k, v)
    ref = reference(q, k, v, causal=True, scale=None, twice=True)
    assert rel_err(out, ref) <= 1e-12
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad(out, (q, k, v), g_out)
    theirs = torch.autograd.grad(ref, (q, k, v), g_out)
    for a, b in zip(ours, theirs, strict=True):
        assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("g", [4, 2])
def test_softmax_backend_matches_reference(g):
    gen = torch.Generator().manual_seed(SEED + g)
    q = torch.randn(2, 19, 4, 16, generator=gen)
    k, v = (torch.randn(2, 19, g, 16, generator=gen) for _ in range(2))
    out = attend(q, k, v, causal=True)
    assert rel_err(out, reference(q, k, v, causal=True, scale=None, twice=False)) <= 1e-6


def test_twicing_is_not_softmax_and_keeps_negative_weights():
    """2A − A² differs from A, and its rows still sum to one (a constant V passes through)."""
    gen = torch.Generator().manual_seed(SEED)
    q, k = (torch.randn(1, 12, 2, 8, generator=gen) * 3 for _ in range(2))
    v = torch.randn(1, 12, 2, 8, generator=gen)
    assert (twicing_attention(q, k, v) - attend(q, k, v)).abs().max() > 1e-3
    ones = torch.ones(1, 12, 2, 8)
    torch.testing.assert_close(twicing_attention(q, k, ones), ones, rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", [0, 5, 14])
def test_causality(t):
    """Changing tokens after position t leaves outputs at positions <= t unchanged."""
    gen = torch.Generator().manual_seed(SEED + t)
    q, k, v = (torch.randn(2, 16, 4, 8, generator=gen) for _ in range(3))
    base = twicing_attention(q, k, v)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, t + 1 :] = torch.randn(x[:, t + 1 :].shape, generator=gen) * 10
    out = twicing_attention(q2, k2, v2)
    assert torch.equal(out[:, : t + 1], base[:, : t + 1])
    if t + 1 < 16:
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


def test_attend_rejects_bad_shapes():
    q = torch.randn(1, 4, 6, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attend(q, torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8))
    # causal queries are the last seq_q of seq_k positions: more queries than keys is an error
    with pytest.raises(ValueError, match="seq_q <= seq_k"):
        attend(q, torch.randn(1, 3, 6, 8), torch.randn(1, 3, 6, 8))
