"""Context parallelism's layout and math on one process: the 2C load-balanced chunks round-trip,
and per-chunk bottom-right causal attention over the gathered keys (with twicing's O1 gathered
between its passes) is the full sequence's attention, against an explicit-matrix reference."""

from __future__ import annotations

import pytest
import torch

from model.attention.context_parallel import ChunkLayout, head_slice, per_chunk


def _bottom_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention with the queries as the last ``len(q)`` positions ([b, s, h, d])."""
    sq, sk = q.size(1), k.size(1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.size(-1) ** 0.5
    allowed = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    a = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", a, v)


def _full_matrix(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    s = q.size(1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.size(-1) ** 0.5
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    return logits.masked_fill(~mask, float("-inf")).softmax(-1)


def _gather(layouts: list[ChunkLayout], locals_: list[torch.Tensor]) -> torch.Tensor:
    """What an all-gather along the sequence gives, put back in natural order."""
    return layouts[0].to_natural(torch.cat(locals_, dim=1), 1)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_chunks_round_trip_and_balance(size):
    chunk = 3
    x = torch.arange(2 * size * chunk).view(1, -1)
    layouts = [ChunkLayout(size, r, chunk) for r in range(size)]
    locals_ = [lay.local_of_natural(x, 1) for lay in layouts]
    assert torch.equal(_gather(layouts, locals_), x)
    assert torch.equal(layouts[0].to_rank_order(x, 1), torch.cat(locals_, dim=1))
    # every rank holds chunk r and 2C-1-r: the same causal work (sum of its chunk ends)
    work = {sum(lay.ends()) for lay in layouts}
    assert len(work) == 1
    assert sorted(c for lay in layouts for c in lay.chunks) == list(range(2 * size))


@pytest.mark.parametrize("size", [2, 4])
def test_per_chunk_attention_is_the_full_sequences_for_softmax_and_twicing(size):
    torch.manual_seed(0)
    b, s, h, d = 2, 8 * size, 3, 4
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float64) for _ in range(3))
    a = _full_matrix(q, k)
    softmax_ref = torch.einsum("bhqk,bkhd->bqhd", a, v)
    twicing_ref = torch.einsum("bhqk,bkhd->bqhd", 2 * a - a @ a, v)
    layouts = [ChunkLayout(size, r, s // (2 * size)) for r in range(size)]

    out = [per_chunk(lay, lay.local_of_natural(q, 1), lambda qc, end: _bottom_right(
        qc, k[:, :end], v[:, :end])) for lay in layouts]  # fmt: skip
    torch.testing.assert_close(_gather(layouts, out), softmax_ref, rtol=0, atol=1e-12)

    # twicing: pass 1 per chunk, O1 gathered, pass 2 over (K, O1) with the same causal offsets
    o1 = _gather(layouts, out)
    two = [per_chunk(lay, lay.local_of_natural(q, 1), lambda qc, end: _bottom_right(
        qc, k[:, :end], o1[:, :end])) for lay in layouts]  # fmt: skip
    twice = [2 * lay.local_of_natural(o1, 1) - t for lay, t in zip(layouts, two, strict=True)]
    torch.testing.assert_close(_gather(layouts, twice), twicing_ref, rtol=0, atol=1e-12)


def test_ulysses_head_slices_partition_the_heads():
    heads, size = 8, 4
    got = [head_slice(ChunkLayout(size, r, 1), heads) for r in range(size)]
    assert [i for sl in got for i in range(heads)[sl]] == list(range(heads))
