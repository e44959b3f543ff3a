"""Small helpers shared by the benchmark scripts: interleaved timing and memory probes."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

#: glibc malloc settings that keep freed large blocks instead of returning them to the OS, so
#: repeated big tensor allocations do not page-fault every time (PyTorch's CPU tuning guides
#: recommend a caching allocator for the same reason). Applied to every side of a comparison.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}


def with_malloc_tuning() -> None:
    """Re-execute this script once with :data:`MALLOC_ENV` set (glibc reads it at start-up)."""
    if os.environ.get("TWICING_NO_MALLOC_TUNING") or all(os.environ.get(k) for k in MALLOC_ENV):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, stat: str = "min"
) -> dict[str, float]:
    """Seconds per call of each function, run round-robin so machine noise hits all alike.

    ``stat="min"`` (default) is the usual estimator for a deterministic workload on a noisy
    machine (noise only ever adds time); ``"median"`` is also available.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    reduce = {"min": min, "median": statistics.median}[stat]
    return {name: reduce(s) for name, s in samples.items()}


def saved_activation_bytes(fn: Callable[..., torch.Tensor], *args) -> int:
    """Bytes of distinct tensors autograd keeps for backward while running ``fn(*args)``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(seen.values()) + out.untyped_storage().nbytes()
