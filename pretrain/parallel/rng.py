"""Seeding and per-rank RNG state capture/restore (what makes resume bit-exact with dropout)."""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel

from model import megatron_compat

#: megatron-core's offset for the per-TP-rank model-parallel stream
_TP_SEED_OFFSET = 2718


def seed_everything(seed: int) -> None:
    """Seed python/numpy/torch identically on every rank (so every TP size builds the same master
    weights) and a per-TP-rank stream for dropout inside sequence-parallel regions."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tp_seed = seed + _TP_SEED_OFFSET + parallel_state.get_tensor_model_parallel_rank()
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        megatron_compat.install_cpu_rng_tracker().add("model-parallel-rng", tp_seed)


def capture() -> dict:
    """This rank's RNG states as tensors/ints only (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict) -> None:
    """Inverse of :func:`capture`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
