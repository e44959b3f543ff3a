"""torch's private CPU flash-attention primitives, the one place they are named.

``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` (forward: output and log-sum-exp)
and ``..._for_cpu_backward`` are what ``F.scaled_dot_product_attention`` itself runs on CPU. We
call them directly where SDPA cannot express the computation without materialising more: twicing's
two passes fused into one autograd function, and bottom-right causal chunks merged by log-sum-exp.
Both are looked up, not imported: where a torch build lacks them, :func:`available` is false and
callers fall back to SDPA. ``tests/unit/test_torch_compat.py`` pins the names and the call
signatures, so an upstream rename fails loudly instead of silently taking the slower path.
"""

from __future__ import annotations

import torch

_FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def available() -> bool:
    """Whether this torch has both primitives."""
    return _FORWARD is not None and _BACKWARD is not None


def cpu_forward(q, k, v, causal: bool, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU flash-attention forward on ``[b, h, s, d]``: ``(out, logsumexp)``, GQA ok."""
    return _FORWARD(q, k, v, 0.0, causal, scale=scale)


def cpu_backward(dout, q, k, v, out, lse, causal: bool, scale: float | None):
    """Gradients ``(dq, dk, dv)`` of :func:`cpu_forward` for the output gradient ``dout``."""
    return _BACKWARD(dout, q, k, v, out, lse, 0.0, causal, scale=scale)
