"""Twicing attention (Abdullaev & Nguyen, ICLR 2025): ``(2A − A²)V = AV + A(V − AV)``.

Computed as two passes of the same attention kernel, ``o1 = attend(q, k, v)`` and
``out = 2·o1 − attend(q, k, o1)``: the same A (scores, scale, mask) in both products, never an
explicit ``A @ A``. A causal A is lower-triangular, so A² is causal too. This module is the
single seam where a fused kernel (one softmax-gradient for both passes) can later replace the
two-pass composition without touching the model.

Incremental decoding with a first-pass cache (exact, O(1) work per cached position and token).
With causal A (``A_tj = 0`` for ``j > t``) and ``o1 = AV``::

    out_t = ((2A − A²) V)_t = 2·(AV)_t − Σ_j A_tj (AV)_j = 2·o1_t − Σ_{j≤t} A_tj·o1_j

``o1_j = Σ_{i≤j} A_ji v_i`` depends only on positions ``≤ j``: once computed it never changes
as tokens are appended (row ``j`` of a causal softmax sees no later key). So each twicing layer
caches K, V (megatron's cache, at query-group width) and O1 (ours, at query-head width: the
values of the second pass are per query head, also under GQA). A step with new queries
``q_new`` at positions ``n..n+s−1`` is two reads of the cache with the same bottom-right causal
(and padding) mask::

    o1_new = attend(q_new, K[:n+s], V[:n+s]);  O1[n:n+s] = o1_new
    out    = 2·o1_new − attend(q_new, K[:n+s], O1[:n+s])

— the second pass is exactly ``Σ_{j≤t} A_tj·o1_j`` because it uses the same scores ``q·kᵀ``.
Prefill is the same step with ``n = 0``; a chunked prefill is several steps.
"""

from __future__ import annotations

import torch

from model.attention import backend as kernels
from model.attention import context_parallel as cp
from model.attention import torch_compat
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
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(2A − A²)V`` on ``[batch, seq, heads, head_dim]``; ``k``/``v`` may have fewer heads (GQA).

    Rows of ``2A − A²`` sum to one but may hold negative weights: nothing is clamped. ``mask``
    (bool, True = may attend) hides padding keys in both passes.
    """
    if mask is None and q.size(1) == k.size(1) and kernels.cpu_kernel_applies(backend, q):
        kernels.check_qkv(q, k, v, causal)
        out = _TwoPassCPU.apply(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, softmax_scale
        )
        return out.transpose(1, 2)
    o1 = attend(q, k, v, causal=causal, scale=softmax_scale, backend=backend, mask=mask)
    return _second_pass(q, k, o1, o1, causal, softmax_scale, backend, mask)


def _second_pass(q, k, o1_new, o1_all, causal, scale, backend, mask) -> torch.Tensor:
    """``2·o1_new − A·o1_all``. The values are o1 (query-head width), so keys must be too."""
    o2 = attend(
        q, repeat_kv(k, q.size(2)), o1_all, causal=causal, scale=scale, backend=backend, mask=mask
    )
    return torch.lerp(o2, o1_new, 2.0)  # o2 + 2·(o1 − o2) = 2·o1 − o2, one kernel


class _TwoPassCPU(torch.autograd.Function):
    """Both passes on torch's CPU flash primitives with hand-written bookkeeping (``[b, h, s, d]``).

    Same kernels and FLOPs as autograd through two SDPA calls, but the sign of the second pass is
    folded into its backward (``A`` is linear in its output gradient), so backward needs three
    in-place elementwise ops instead of about seven allocating ones.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float | None):
        o1, lse1 = torch_compat.cpu_forward(q, k, v, causal, scale)
        k_full = k.repeat_interleave(q.size(1) // k.size(1), dim=1) if k.size(1) != q.size(1) else k
        o2, lse2 = torch_compat.cpu_forward(q, k_full, o1, causal, scale)
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
        dq2, dk2, do1 = torch_compat.cpu_backward(dout, q, k_full, o1, o2, lse2, causal, scale)
        do1 = do1.lerp_(dout, 2.0)  # 2·dout − Aᵀ·dout
        dq, dk, dv = torch_compat.cpu_backward(do1, q, k, v, o1, lse1, causal, scale)
        if groups != heads:
            b, _, s, d = dk2.shape
            dk2 = dk2.view(b, groups, heads // groups, s, d).sum(2)
        return dq.sub_(dq2), dk.sub_(dk2), dv, None, None


class TwicingCoreAttention(CoreAttention, name="twicing"):
    """Twicing attention ``(2A − A²)V`` as two passes of the same kernel (no dropout)."""

    def attention(self, q, k, v, causal, *extra, mask=None):
        return twicing_attention(
            q,
            k,
            v,
            causal=causal,
            softmax_scale=self.softmax_scale,
            backend=self.kernel,
            mask=mask,
        )

    def chunked_attention(self, layout, q, k, v, *extra):
        """All-gather mode: pass 1 per local chunk, O1 all-gathered (pass 2 reads every earlier
        token's O1, which the rank owning that token computed), pass 2 per chunk over (K, O1)."""
        scale, backend = self.softmax_scale, self.kernel

        def first(q_chunk, end):
            return attend(
                q_chunk, k[:, :end], v[:, :end], causal=True, scale=scale, backend=backend
            )

        o1 = cp.per_chunk(layout, q, first)
        o1_all = cp.gather_sequence(o1, self.cp_group, layout)
        k_full = repeat_kv(k, q.size(2))

        def second(q_chunk, end):
            return attend(
                q_chunk, k_full[:, :end], o1_all[:, :end], causal=True, scale=scale, backend=backend
            )

        return torch.lerp(cp.per_chunk(layout, q, second), o1, 2.0)  # 2·o1 − A·O1

    def decode(self, q, k, v, ctx, mask, *extra):
        """One step over the cache: pass 1 on (K, V), append o1 to O1, pass 2 on (K, O1)."""
        scale, backend = self.softmax_scale, self.kernel
        o1 = attend(q, k, v, causal=True, scale=scale, backend=backend, mask=mask)
        o1_all = ctx.append(self.layer_number, "o1", o1)
        return _second_pass(q, k, o1, o1_all, True, scale, backend, mask)
