"""Make megatron-core's few hard CUDA calls land on the CPU when torch has no CUDA.

megatron-core 0.16 allocates some buffers with ``device=torch.cuda.current_device()`` (RoPE
frequencies, sequence-parallel gather/scatter buffers). On a CPU-only torch that call raises.
``install()`` points it at the CPU device, and gives megatron's pipeline schedules (which
allocate a token counter with ``device="cuda"``) a ``torch`` whose ``zeros`` maps that device to
the CPU; both are no-ops when CUDA is available. These are the only process-wide patches in the
project; :func:`tensor_cuda_is_identity` is a scoped one.
"""

from __future__ import annotations

import contextlib
import types

import torch

_installed = False


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def install() -> None:
    """Route ``torch.cuda.current_device()`` to the CPU on machines without CUDA (idempotent)."""
    global _installed
    if _installed or torch.cuda.is_available():
        return
    torch.cuda.current_device = _cpu_device
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _torch_without_cuda_zeros()
    _installed = True


def _torch_without_cuda_zeros() -> types.ModuleType:
    """``torch`` as megatron's schedules see it: ``zeros(..., device="cuda")`` lands on the CPU."""
    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)

    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)

    proxy.zeros = zeros
    return proxy


@contextlib.contextmanager
def tensor_cuda_is_identity():
    """Within the block, ``Tensor.cuda()`` returns the tensor itself on a CPU-only torch
    (megatron's tied-embedding set-up at pipeline size > 1 moves the weight with it)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


class CpuRngTracker:
    """megatron-core's model-parallel RNG tracker, on the CPU generator.

    megatron forks a per-TP-rank RNG stream around dropout in sequence-parallel regions; its own
    tracker stores CUDA generator states. This one swaps the CPU default generator's state in and
    out instead, with the same ``add``/``fork``/``get_states``/``set_states``/``reset`` API.
    """

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_.clear()
        self.seeds_.clear()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise RuntimeError(f"RNG tracker state {name!r} (seed {seed}) already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"RNG tracker state {name!r} was never added")
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)


def install_cpu_rng_tracker() -> CpuRngTracker:
    """Make megatron-core's ``get_cuda_rng_tracker()`` return a :class:`CpuRngTracker`."""
    from megatron.core.tensor_parallel import random as mp_random

    tracker = CpuRngTracker()
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return tracker
