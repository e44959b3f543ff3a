"""Benchmark helpers: one-process (or launched) training engines with synthetic batches."""

from __future__ import annotations

import os

import torch

from pretrain.train_config import TrainConfig, load_config

_ready = False


def init_once(tensor_parallel: int = 1, parallel=None) -> None:
    """torch.distributed + megatron parallel state for this process (1 rank unless launched);
    ``parallel`` (a ``ParallelConfig``) overrides the TP-only layout."""
    global _ready
    if _ready:
        return
    if "RANK" not in os.environ:
        from pretrain.parallel.launch_env import free_port

        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
        )
    from pretrain.parallel.distributed import init
    from pretrain.parallel.launch_env import launch_env
    from pretrain.train_config import ParallelConfig

    init(launch_env(), parallel or ParallelConfig(tensor=tensor_parallel), 10)
    _ready = True


def config(overrides: list[str]) -> TrainConfig:
    return load_config(None, ["run_dir=/tmp/twicing-bench", "data.manifest=unused", *overrides])


def engine_for(cfg: TrainConfig, seed: int = 0):
    from pretrain.parallel.engine import build_engine

    torch.manual_seed(seed)
    return build_engine(cfg, int(os.environ.get("WORLD_SIZE", "1"))).engine


def synthetic_batch(cfg: TrainConfig, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    b, s = cfg.training.micro_batch_size, cfg.model.seq_length
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=g)
    return (
        tokens[:, :-1].contiguous(),
        torch.arange(s).expand(b, s),
        tokens[:, 1:].contiguous(),
        torch.ones(b, s),
    )


def train_step(engine, cfg: TrainConfig, batch) -> float:
    """One optimizer step as the trainer does it (GA = 1)."""
    from megatron.core import parallel_state

    from pretrain.parallel.engine import lm_loss
    from pretrain.parallel.optimizer import zero0_prepare_step

    loss = lm_loss(engine, *batch)
    engine.backward(loss)
    if cfg.parallel.zero_stage == 0:
        zero0_prepare_step(
            engine, parallel_state.get_tensor_model_parallel_group(), cfg.optimizer.grad_clip, False
        )
    engine.step()
    return loss.item()
