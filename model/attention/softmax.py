"""Softmax attention ``softmax(QKᵀ·scale + mask)V``: one pass of the shared kernel.

Decoding needs only megatron's K/V cache: the new queries attend over the cached keys."""

from __future__ import annotations

from model.attention.backend import attend
from model.attention.base import CoreAttention


class SoftmaxCoreAttention(CoreAttention, name="softmax"):
    """Standard scaled-dot-product attention (flash-attn or torch SDPA, dropout allowed)."""

    def attention(self, q, k, v, causal, *extra, mask=None):
        return attend(
            q,
            k,
            v,
            causal=causal,
            scale=self.softmax_scale,
            backend=self.kernel,
            dropout_p=self.dropout if self.training else 0.0,
            mask=mask,
        )
