"""Twicing attention (Abdullaev & Nguyen, ICLR 2025): ``(2A − A²)V = AV + A(V − AV)``.

Computed as two passes of the same attention kernel, ``o1 = attend(q, k, v)`` and
``out = 2·o1 − attend(q, k, o1)``: the same A (scores, scale, mask) in both products, never an
explicit ``A @ A``. A causal A is lower-triangular, so A² is causal too. This module is the
single seam where a fused kernel (one softmax-gradient for both passes) can later replace the
two-pass composition without touching the model.
"""

from __future__ import annotations

import torch

from model.attention import backend as kernels
from model.attention.backend import Backend, attend, repeat_kv
from model.attention.base import CoreAttention


def twicing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """``(2A − A²)V`` on ``[batch, seq, heads, head_dim]``; ``k``/``v`` may have fewer heads (GQA).

    Rows of ``2A − A²`` sum to one but may hold negative weights: nothing is clamped.
    """
    if kernels.cpu_kernel_applies(backend, q):
        kernels.check_qkv(q, k, v, causal)
        out = _TwoPassCPU.apply(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, softmax_scale
        )
        return out.transpose(1, 2)
    o1 = attend(q, k, v, causal=causal, scale=softmax_scale, backend=backend)
    # The second pass uses o1 (query-head width) as values, so keys must be at that width too.
    o2 = attend(q, repeat_kv(k, q.size(2)), o1, causal=causal, scale=softmax_scale, backend=backend)
    return torch.lerp(o2, o1, 2.0)  # o2 + 2·(o1 − o2) = 2·o1 − o2, one kernel


class _TwoPassCPU(torch.autograd.Function):
    """Both passes on torch's CPU flash primitives with hand-written bookkeeping (``[b, h, s, d]``).

    Same kernels and FLOPs as autograd through two SDPA calls, but the sign of the second pass is
    folded into its backward (``A`` is linear in its output gradient), so backward needs three
    in-place elementwise ops instead of about seven allocating ones.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float | None):
        o1, lse1 = kernels.cpu_forward(q, k, v, causal, scale)
        k_full = k.repeat_interleave(q.size(1) // k.size(1), dim=1) if k.size(1) != q.size(1) else k
        o2, lse2 = kernels.cpu_forward(q, k_full, o1, causal, scale)
        ctx.save_for_backward(q, k, v, o1, o2, lse1, lse2)
        ctx.causal, ctx.scale = causal, scale
        return torch.lerp(o2, o1, 2.0)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, o1, o2, lse1, lse2 = ctx.saved_tensors
        causal, scale = ctx.causal, ctx.scale
        groups, heads = k.size(1), q.size(1)
        k_full = k.repeat_interleave(heads // groups, dim=1) if groups != heads else k
        # out = 2·o1 − o2: run pass 2's backward with +dout and subtract what it returns.
        dq2, dk2, do1 = kernels.cpu_backward(dout, q, k_full, o1, o2, lse2, causal, scale)
        do1 = do1.lerp_(dout, 2.0)  # 2·dout − Aᵀ·dout
        dq, dk, dv = kernels.cpu_backward(do1, q, k, v, o1, lse1, causal, scale)
        if groups != heads:
            b, _, s, d = dk2.shape
            dk2 = dk2.view(b, groups, heads // groups, s, d).sum(2)
        return dq.sub_(dq2), dk.sub_(dk2), dv, None, None


class TwicingCoreAttention(CoreAttention, name="twicing"):
    """Twicing attention ``(2A − A²)V`` as two passes of the same kernel (no dropout)."""

    def attention(self, q, k, v, causal, *extra):
        return twicing_attention(
            q, k, v, causal=causal, softmax_scale=self.softmax_scale, backend=self.backend
        )
