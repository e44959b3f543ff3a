"""Context parallelism outside attention (which lives in ``model.attention.context_parallel``):
the tokens of a batch a rank keeps, and the loss whose gradients add up to the full sequence's.

Each context-parallel rank keeps its two chunks of every sequence (``ChunkLayout``: chunks
``r`` and ``2C−1−r`` of ``2C``), with their labels, loss mask and positions. Its share of a
micro-batch's mean loss is ``Σ_own(loss·mask) / Σ_all(mask)`` (the token count all-reduced over
the context group); the shares of the C ranks add up to the C = 1 loss. The loss a rank
back-propagates is ``C`` times its share: DeepSpeed averages gradients over data × context
ranks, and the C ranks' gradients together are the gradient of the sum of the back-propagated
losses, so the average is the gradient of the C = 1 loss (megatron's pipeline schedule applies
that factor ``C`` itself).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from model.attention.context_parallel import ChunkLayout


def context_size() -> int:
    return ps.get_context_parallel_world_size()


def keep_local_tokens(t: torch.Tensor) -> torch.Tensor:
    """This rank's two chunks of ``t`` (``[b, s, …]``); ``t`` itself without context
    parallelism."""
    size = context_size()
    if size == 1:
        return t
    layout = ChunkLayout(size, ps.get_context_parallel_rank(), t.size(1) // (2 * size))
    return layout.local_of_natural(t, 1)


def token_share(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """This rank's share of a micro-batch's mean loss: ``total / count`` at C = 1, else
    ``total / Σ count`` over the context group."""
    if context_size() == 1:
        return total / count
    count = count.detach().clone()
    dist.all_reduce(count, group=ps.get_context_parallel_group())
    return total / count
