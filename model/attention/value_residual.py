"""Variants that mix the first layer's values into later layers: NeuTRENO, ResFormer, SVFormer.

Math, on ``[batch, seq, heads, head_dim]`` tensors:

- NeuTRENO (Nguyen et al., NeurIPS 2023): ``u_l = A_l V_l + λ (V⁰ − V_l)`` in layers ``l ≥ 1``,
  ``V⁰`` the first layer's values, added per head after ``A·V`` (reference λ = 0.4 for LMs).
- ResFormer (value residual, ACL 2025): layers ``≥ 1`` attend with ``λ₁·V₁ + λ₂·V_n`` (0.5/0.5);
  SVFormer: ``V_n = V₁``.

Values may carry fewer heads than queries (GQA); they are expanded to the query heads where a
formula mixes them with per-query-head quantities. In layer 0 the modules behave as softmax
attention (and layer 0 provides ``V¹`` through the model's ``FirstLayerValues``).

Decoding: layer 0's V cache (megatron's) *is* the ``V¹`` cache. Each step layer 0 puts its whole
cached V into ``FirstLayerValues`` and later layers read it beside their own cached V, so the
functions below see ``seq_q <= seq_k``: NeuTRENO's residual uses the rows of the new positions
(the last ``seq_q``), ResFormer/SVFormer attend over the mixed values of the whole cache.
"""

from __future__ import annotations

from model.attention.backend import Backend, attend, repeat_kv
from model.attention.base import CoreAttention


def neutreno_attention(
    q,
    k,
    v,
    v_first,
    *,
    lam: float,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: Backend = "auto",
    mask=None,
):
    """``A V + λ (V⁰ − V)`` per head (``v_first`` has ``v``'s shape; queries are the last
    ``seq_q`` of its positions)."""
    out = attend(q, k, v, causal=causal, scale=softmax_scale, backend=backend, mask=mask)
    heads, s_q = q.size(2), q.size(1)
    own = v_first[:, -s_q:], v[:, -s_q:]
    return out + lam * (repeat_kv(own[0], heads) - repeat_kv(own[1], heads))


def value_residual_attention(
    q,
    k,
    v,
    v_first,
    *,
    lam_first: float,
    lam_own: float,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: Backend = "auto",
    mask=None,
):
    """ResFormer: ``A (λ₁ V₁ + λ₂ V)``; SVFormer is ``lam_first=1, lam_own=0``."""
    mixed = v_first * lam_first if lam_own == 0 else lam_first * v_first + lam_own * v
    return attend(q, k, mixed, causal=causal, scale=softmax_scale, backend=backend, mask=mask)


class _FirstValueAttention(CoreAttention):
    def extra_inputs(self, value):
        return () if self.is_first_layer else (self.first_values.get(),)

    def attention(self, q, k, v, causal, *extra, mask=None):
        if not extra:  # layer 0: plain attention, it is the source of V¹
            return attend(
                q, k, v, causal=causal, scale=self.softmax_scale, backend=self.kernel, mask=mask
            )
        return self.mix(q, k, v, extra[0], causal, mask)

    def mix(self, q, k, v, v_first, causal, mask=None):
        raise NotImplementedError


class NeuTRENOCoreAttention(_FirstValueAttention, name="neutreno"):
    """``A V + λ (V¹ − V)`` (NeuTRENO; λ = 0.4 in the reference LM)."""

    def mix(self, q, k, v, v_first, causal, mask=None):
        return neutreno_attention(
            q,
            k,
            v,
            v_first,
            lam=self.options["lambda"],
            causal=causal,
            softmax_scale=self.softmax_scale,
            backend=self.kernel,
            mask=mask,
        )


class ResFormerCoreAttention(_FirstValueAttention, name="resformer"):
    """Value residual: attend over ``λ₁ V¹ + λ₂ V`` (ResFormer; 0.5/0.5)."""

    def mix(self, q, k, v, v_first, causal, mask=None):
        return value_residual_attention(
            q,
            k,
            v,
            v_first,
            lam_first=self.options["lambda_first"],
            lam_own=self.options["lambda_own"],
            causal=causal,
            softmax_scale=self.softmax_scale,
            backend=self.kernel,
            mask=mask,
        )


class SVFormerCoreAttention(_FirstValueAttention, name="svformer"):
    """Single value: every layer attends over ``V¹`` (SVFormer). Layers ≥ 1 still compute their own
    value projection inside megatron's fused QKV; it is unused (zero gradient)."""

    def mix(self, q, k, v, v_first, causal, mask=None):
        return value_residual_attention(
            q,
            k,
            v,
            v_first,
            lam_first=1.0,
            lam_own=0.0,
            causal=causal,
            softmax_scale=self.softmax_scale,
            backend=self.kernel,
            mask=mask,
        )
