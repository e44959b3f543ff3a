"""Core attention that mixes in the first layer's values: NeuTRENO, ResFormer, SVFormer.

In layer 0 they behave as softmax attention (and layer 0 provides ``V¹``); from layer 1 on they
apply their formula (``model.attention.variants``).
"""

from __future__ import annotations

from model.attention.backend import attend
from model.attention.core import CoreAttention
from model.attention.variants import neutreno_attention, value_residual_attention


class _FirstValueAttention(CoreAttention):
    supports_dropout = False
    uses_first_values = True

    def extra_inputs(self, value):
        return () if self.is_first_layer else (self.first_values.get(),)

    def attention(self, q, k, v, causal, *extra):
        if not extra:  # layer 0: plain attention, it is the source of V¹
            return attend(q, k, v, causal=causal, scale=self.softmax_scale, backend=self.backend)
        return self.mix(q, k, v, extra[0], causal)

    def mix(self, q, k, v, v_first, causal):
        raise NotImplementedError


class NeuTRENOCoreAttention(_FirstValueAttention):
    """``A V + λ (V¹ − V)`` (NeuTRENO; λ = 0.4 in the reference LM)."""

    OPTIONS = {"lambda": 0.4}

    def mix(self, q, k, v, v_first, causal):
        return neutreno_attention(
            q,
            k,
            v,
            v_first,
            lam=self.options["lambda"],
            causal=causal,
            softmax_scale=self.softmax_scale,
            backend=self.backend,
        )


class ResFormerCoreAttention(_FirstValueAttention):
    """Value residual: attend over ``λ₁ V¹ + λ₂ V`` (ResFormer; 0.5/0.5)."""

    OPTIONS = {"lambda_first": 0.5, "lambda_own": 0.5}

    def mix(self, q, k, v, v_first, causal):
        return value_residual_attention(
            q,
            k,
            v,
            v_first,
            lam_first=self.options["lambda_first"],
            lam_own=self.options["lambda_own"],
            causal=causal,
            softmax_scale=self.softmax_scale,
            backend=self.backend,
        )


class SVFormerCoreAttention(_FirstValueAttention):
    """Single value: every layer attends over ``V¹`` (SVFormer). Layers ≥ 1 still compute their own
    value projection inside megatron's fused QKV; it is unused (zero gradient)."""

    def mix(self, q, k, v, v_first, causal):
        return value_residual_attention(
            q,
            k,
            v,
            v_first,
            lam_first=1.0,
            lam_own=0.0,
            causal=causal,
            softmax_scale=self.softmax_scale,
            backend=self.backend,
        )
