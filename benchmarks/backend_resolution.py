"""What resolving the attention backend costs per call, and what resolving it once per module
saves (issue 21): both sides in one run, alternating, medians.

Resolution (``model.attention.backend.resolve_backend``) used to run inside every ``attend``
call, twice per twicing layer per micro-batch. On CUDA, ``auto`` and every pinned SDPA kernel ask
torch whether the kernel takes the inputs (``SDPAParams`` + ``can_use_*`` under
``warnings.catch_warnings``); that check cannot run on a CPU-only machine, so the closest CPU
proxy (the same calls on CPU tensors) is timed beside the real CPU resolution. ``CoreAttention``
now resolves once per module and kind of input (``resolve_kernel``).

    python benchmarks/backend_resolution.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.attention import backend as kernels  # noqa: E402


def per_call_us(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=20000)
    args = p.parse_args()
    torch.set_num_threads(1)
    q = torch.randn(2, 256, 12, 64)
    qt = q.transpose(1, 2)
    resolved = kernels.ResolvedBackend(kernels.resolve_backend("auto", q))

    def cuda_check_proxy() -> None:
        params = torch.backends.cuda.SDPAParams(qt, qt, qt, None, 0.0, True, False)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            torch.backends.cuda.can_use_efficient_attention(params, False)

    sides = {
        "resolve 'auto' (CPU)": lambda: kernels.resolve_backend("auto", q),
        "resolve 'sdpa-flash' (CPU)": lambda: kernels.resolve_backend("sdpa-flash", q),
        "one CUDA kernel check (CPU proxy)": cuda_check_proxy,
        "already resolved (isinstance)": lambda: isinstance(resolved, kernels.ResolvedBackend),
    }
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            times[name].append(per_call_us(fn, args.calls))
    n = args.calls
    kernel_ms = statistics.median(
        per_call_us(lambda: kernels.attend(q, q, q, backend=resolved), 20) / 1e3 for _ in range(3)
    )
    print(f"median of {args.rounds} rounds × {n} calls, 1 thread, q = {list(q.shape)}:")
    for name, values in times.items():
        print(f"  {name:<36} {statistics.median(values):8.3f} µs per call")
    print(f"  one attention pass on these inputs      {kernel_ms:8.3f} ms (CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
