"""Sequence parallelism under DeepSpeed: sum the partial grads of sequence-parallel params.

With SP each TP rank runs the norms on its own slice of the sequence, so the grads of params
tagged ``sequence_parallel`` are partial sums. megatron-core all-reduces them across TP inside its
own DDP, which DeepSpeed replaces; without this hook training is silently wrong.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from model.megatron_compat import is_sequence_parallel


def allreduce_sequence_parallel_grads(model: torch.nn.Module) -> int:
    """Register TP all-reduce hooks on every SP param's gradient; returns how many."""
    group = parallel_state.get_tensor_model_parallel_group()

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    params = [p for p in model.parameters() if is_sequence_parallel(p)]
    for p in params:
        p.register_hook(hook)
    return len(params)
