"""The ``mpu`` object DeepSpeed expects, answered from megatron-core's ``parallel_state``.

megatron-core 0.16 lacks the ``get_model_parallel_*`` and ``get_data_parallel_group_ranks``
names DeepSpeed calls. Without an mpu DeepSpeed would treat TP shards as data-parallel replicas
and silently average them. Sequence-parallel names are deliberately absent: DeepSpeed would read
them as its own (Ulysses) sequence parallelism.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps


class MegatronMPU:
    """Model parallel = tensor × pipeline (megatron's model-parallel group; the TP group at
    pipeline size 1, so checkpoint names ``mp_rank_XX`` stay as they were); data parallel =
    megatron's data × context group: context-parallel ranks hold the same parameters, so
    DeepSpeed averages their gradients and partitions ZeRO state over them too."""

    def get_model_parallel_group(self):
        if ps.get_pipeline_model_parallel_world_size() == 1:
            return ps.get_tensor_model_parallel_group()
        return ps.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.get_model_parallel_group())

    def get_tensor_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return ps.get_pipeline_model_parallel_world_size()

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
