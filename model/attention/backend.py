"""The one attention kernel everything calls: flash-attn when it can run, else torch SDPA.

All tensors are ``[batch, seq, heads, head_dim]`` (flash-attn's layout). ``k``/``v`` may carry
fewer heads than ``q`` (grouped-query attention); query head ``h`` reads key/value group
``h // (heads // groups)``, megatron-core's and flash-attn's convention.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from model.attention.registry import BACKENDS, Backend  # names: torch-free, in the registry

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_available() -> bool:
    """True when the flash-attn package is importable and CUDA is present."""
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def _flash_fits(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in _FLASH_DTYPES and flash_available()


def resolve_backend(backend: Backend, q: torch.Tensor) -> str:
    """Pick the concrete kernel for ``q``; a forced ``flash`` that cannot run is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend == "flash":
        if not _flash_fits(q):
            raise RuntimeError(
                "attention backend 'flash' needs CUDA fp16/bf16 tensors and the flash-attn "
                f"package (got device={q.device}, dtype={q.dtype}, "
                f"flash-attn installed={importlib.util.find_spec('flash_attn') is not None})"
            )
        return "flash"
    if backend == "auto" and _flash_fits(q):
        return "flash"
    return "sdpa"


_CPU_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def cpu_kernel_applies(backend: Backend, q: torch.Tensor) -> bool:
    """Whether torch's CPU flash-attention primitives (forward + backward) can serve ``q``."""
    return (
        backend in ("auto", "sdpa")
        and q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and _CPU_FWD is not None
        and _CPU_BWD is not None
    )


def cpu_forward(q, k, v, causal: bool, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU flash-attention forward on ``[b, h, s, d]``: ``(out, logsumexp)``, GQA ok."""
    return _CPU_FWD(q, k, v, 0.0, causal, scale=scale)


def cpu_backward(dout, q, k, v, out, lse, causal: bool, scale: float | None):
    """Gradients ``(dq, dk, dv)`` of :func:`cpu_forward` for the output gradient ``dout``."""
    return _CPU_BWD(dout, q, k, v, out, lse, 0.0, causal, scale=scale)


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Expand ``[b, s, groups, d]`` to ``[b, s, heads, d]`` (one group per heads/groups queries)."""
    groups = x.size(2)
    if groups == heads:
        return x
    return x.repeat_interleave(heads // groups, dim=2)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    """Raise ``ValueError`` unless ``[b, s, h, d]`` shapes fit together (GQA allowed)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects 4-D [b, s, h, d] tensors, got {q.shape}, {k.shape}, {v.shape}"
        )
    if k.size(2) != v.size(2) or q.size(2) % k.size(2):
        raise ValueError(
            f"query heads ({q.size(2)}) must be a multiple of key/value heads "
            f"({k.size(2)}, {v.size(2)}), and keys and values need the same head count"
        )
    if causal and q.size(1) != k.size(1):
        raise ValueError(f"causal attention needs seq_q == seq_k, got {q.size(1)} and {k.size(1)}")


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    backend: Backend = "auto",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``softmax(q kᵀ · scale + mask) v`` per head; returns ``[batch, seq, heads, head_dim]``.

    ``scale`` defaults to ``1/sqrt(head_dim)``. ``causal`` masks keys after each query (queries
    and keys are the same positions, so ``seq_q == seq_k`` is required when causal).
    ``dropout_p`` drops attention weights (single-pass callers only).
    """
    check_qkv(q, k, v, causal)
    if resolve_backend(backend, q) == "flash":
        return _flash(q, k, v, causal, scale, dropout_p)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=causal,
        scale=scale,
        dropout_p=dropout_p,
        enable_gqa=q.size(2) != k.size(2),
    )
    return out.transpose(1, 2)


def _flash(q, k, v, causal: bool, scale: float | None, dropout_p: float) -> torch.Tensor:
    from flash_attn import flash_attn_func  # optional GPU extra

    return flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal)
