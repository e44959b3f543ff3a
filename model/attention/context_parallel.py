"""Context parallelism (CP) for every attention variant: a sample's sequence is split over ``C``
ranks, and core attention communicates so that each rank's queries see every earlier key.

**Layout** (both modes, and the data split in ``pretrain.parallel.context_split``): the sequence
is cut into ``2C`` equal chunks and rank ``r`` holds chunks ``r`` and ``2C−1−r`` (megatron's
causal load balance: every rank does the same attention work; megatron-core's RoPE slices its
positions the same way). Gathered along the sequence in rank order, the chunks arrive as
``[0, 2C−1, 1, 2C−2, …]``; :meth:`ChunkLayout.to_natural` reorders them.

**Ulysses** (``cp_comm_type="a2a"``): an all-to-all turns ``[s/C, heads]`` into ``[s, heads/C]``
(queries, keys, values, and layer 0's values V¹ for the value-residual variants), the variant
runs its own full-sequence math unchanged on its ``heads/C`` heads (twicing's two passes never
send O1 anywhere; Neural Attention scores with its weights of those heads), and an all-to-all
brings ``[s/C, heads]`` back. Communication per layer as softmax's: forward and backward each
move q, k, v and the output once; a rank sends the ``(C−1)/C`` of its ``s/C`` rows that other
ranks' heads need, ``(2H + 2G)·(s/C)·d·(C−1)/C`` elements each way for ``H`` query heads and
``G`` key/value groups (plus ``G`` for V¹). Needs this rank's heads and groups divisible by ``C``.

**All-gather** (``cp_comm_type="all_gather"``; any head count): keys and values (``G`` groups)
are all-gathered; each local chunk's queries attend over the keys up to the end of that chunk
with bottom-right causal alignment (the queries are the last positions: the decoding
convention every variant already implements), so softmax, NeuTRENO, ResFormer/SVFormer (the mix
is per token: V¹ is gathered beside V) and Neural Attention run their own math on
``(q_chunk, K[:end], V[:end])``. Twicing needs more: pass 2 is ``A·O1`` over *every* key, and
row ``j`` of ``O1 = A·V`` depends only on keys ``≤ j`` and lives on the rank that owns token
``j``, exactly like ``v_j``. So pass 1 runs per local chunk, O1 (``H`` heads) is all-gathered,
and pass 2 attends over ``(K, O1)`` with the same causal offsets (a per-layer barrier between
the passes). Backward is autograd through the collectives: an all-gather's gradient is a
reduce-scatter (sum) of dK, dV and dO1, exact. Elements sent per rank per layer, forward and
backward, in units of ``s·d·(C−1)/C``: softmax ``4G`` (gather K, V; reduce-scatter dK, dV);
twicing ``4G + 2H`` (plus O1 and dO1). Memory: full-sequence K, V (and O1) per layer while the
layer runs. Attention dropout stays per query row on its own rank (softmax keeps it; the
multi-pass and value-residual variants require 0 anyway).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import all_to_all, gather_from_sequence_parallel_region

#: megatron's ``cp_comm_type`` names of our two modes
COMM_TYPES = {"allgather": "all_gather", "ulysses": "a2a"}


@dataclass(frozen=True)
class ChunkLayout:
    """Where this rank's tokens sit: ``size`` ranks, two chunks of ``chunk`` tokens each."""

    size: int
    rank: int
    chunk: int  #: tokens per chunk (the local sequence is two chunks)

    @property
    def chunks(self) -> tuple[int, int]:
        """The global indices of this rank's two chunks (first, second)."""
        return self.rank, 2 * self.size - 1 - self.rank

    def ends(self) -> tuple[int, int]:
        """Exclusive end positions (in tokens) of this rank's two chunks."""
        a, b = self.chunks
        return (a + 1) * self.chunk, (b + 1) * self.chunk

    def order(self, device: torch.device) -> torch.Tensor:
        """Indices that reorder a rank-order gather (``[s, …]``) into the natural order."""
        return _natural_order(self.size, self.chunk, device)

    def to_natural(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.index_select(dim, self.order(x.device))

    def to_rank_order(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        inverse = torch.argsort(self.order(x.device))
        return x.index_select(dim, inverse)

    def local_of_natural(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's two chunks of a natural-order tensor."""
        parts = [x.narrow(dim, c * self.chunk, self.chunk) for c in self.chunks]
        return torch.cat(parts, dim=dim)


@functools.cache
def _natural_order(size: int, chunk: int, device: torch.device) -> torch.Tensor:
    rank_order = [c for r in range(size) for c in (r, 2 * size - 1 - r)]
    position = {c: i for i, c in enumerate(rank_order)}
    idx = [position[c] * chunk + t for c in range(2 * size) for t in range(chunk)]
    return torch.tensor(idx, device=device)


def layout_for(group, local_len: int) -> ChunkLayout:
    size = dist.get_world_size(group)
    return ChunkLayout(size, dist.get_rank(group), local_len // 2)


# --------------------------------------------------------------------------- all-gather mode
def gather_sequence(x: torch.Tensor, group, layout: ChunkLayout) -> torch.Tensor:
    """``[b, s/C, …]`` on every rank → ``[b, s, …]`` in natural order (gradient: the
    reduce-scatter of the natural-order gradient back to the owners)."""
    seq_first = x.transpose(0, 1).contiguous()
    gathered = gather_from_sequence_parallel_region(seq_first, True, group)
    return layout.to_natural(gathered, 0).transpose(0, 1)


def per_chunk(layout: ChunkLayout, q: torch.Tensor, attend) -> torch.Tensor:
    """``attend(q_chunk, end)`` for this rank's two query chunks (``end``: exclusive key end),
    concatenated back into the local layout ``[b, s/C, …]``."""
    m = layout.chunk
    outs = [attend(q[:, i * m : (i + 1) * m], end) for i, end in enumerate(layout.ends())]
    return torch.cat(outs, dim=1)


# --------------------------------------------------------------------------- ulysses mode
def seq_to_heads(x: torch.Tensor, group, layout: ChunkLayout) -> torch.Tensor:
    """``[b, s/C, h, d]`` (this rank's tokens, all its heads) → ``[b, s, h/C, d]`` (every token
    in natural order, this rank's slice of the heads)."""
    c = layout.size
    b, s_local, h, d = x.shape
    blocks = x.reshape(b, s_local, c, h // c, d).permute(2, 1, 0, 3, 4)  # [C, s/C, b, h/C, d]
    received = all_to_all(group, blocks.reshape(c * s_local, b, h // c, d))
    return layout.to_natural(received, 0).transpose(0, 1)  # [b, s, h/C, d]


def heads_to_seq(x: torch.Tensor, group, layout: ChunkLayout) -> torch.Tensor:
    """The inverse of :func:`seq_to_heads`: ``[b, s, h/C, d]`` → ``[b, s/C, h, d]``."""
    c = layout.size
    b, s, hc, d = x.shape
    rank_order = layout.to_rank_order(x.transpose(0, 1), 0)  # [s, b, h/C, d]
    received = all_to_all(group, rank_order.contiguous())  # block j: my tokens, head slice j
    blocks = received.reshape(c, s // c, b, hc, d).permute(2, 1, 0, 3, 4)  # [b, s/C, C, h/C, d]
    return blocks.reshape(b, s // c, c * hc, d)


def head_slice(layout: ChunkLayout, heads: int) -> slice:
    """The heads (of this TP rank's ``heads``) that Ulysses gives this context rank."""
    per = heads // layout.size
    return slice(layout.rank * per, (layout.rank + 1) * per)
