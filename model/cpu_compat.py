"""Make megatron-core's few hard CUDA calls land on the CPU when torch has no CUDA.

megatron-core 0.16 allocates some buffers with ``device=torch.cuda.current_device()`` (RoPE
frequencies, sequence-parallel gather/scatter buffers). On a CPU-only torch that call raises.
``install()`` points it at the CPU device; it is a no-op when CUDA is available. This is the
only process-wide patch in the project.
"""

from __future__ import annotations

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
    _installed = True
