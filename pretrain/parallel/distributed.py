"""Process groups: torch.distributed via DeepSpeed, then megatron-core's TP × DP × PP groups."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pretrain.parallel.launch_env import LaunchEnv
from pretrain.train_config import ParallelConfig


def backend() -> str:
    """NCCL on GPUs, gloo (with DeepSpeed's CPU accelerator) otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(env: LaunchEnv, parallel: ParallelConfig, timeout_minutes: float) -> None:
    """Initialise the default group (finite timeout) and megatron's parallel state for the
    layout of the ``parallel`` config section."""
    import deepspeed

    from model import megatron_compat

    megatron_compat.install()  # process start-up: the CPU patches (no-op with CUDA)
    env.export()
    if torch.cuda.is_available():  # modulo: sites that give each task a single visible GPU
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    deepspeed.init_distributed(
        dist_backend=backend(), auto_mpi_discovery=False, timeout=timeout, verbose=False
    )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        context_parallel_size=parallel.context,
        distributed_timeout_minutes=max(1, round(timeout_minutes)),
    )


def init_for_inference() -> tuple[int, int]:
    """Process groups for evaluation and generation: one process gets a private 1-rank group;
    under a launcher, TP = the world size. Returns ``(rank, tensor-parallel size)``."""
    from pretrain.parallel.launch_env import free_port, launch_env

    env = launch_env()
    if env.world_size == 1 and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
        env = launch_env()
    init(env, ParallelConfig(tensor=env.world_size), timeout_minutes=30)
    return env.rank, env.world_size


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def device() -> torch.device:
    """Where this rank's tensors live."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
