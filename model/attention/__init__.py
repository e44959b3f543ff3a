"""Attention variants as megatron-core core-attention modules, plus their pure math."""

from model.attention.backend import attend, flash_available, repeat_kv
from model.attention.core import CoreAttention, SoftmaxCoreAttention, TwicingCoreAttention
from model.attention.layers import select_layers
from model.attention.twicing import twicing_attention

#: name -> core-attention class; a new variant is a CoreAttention subclass registered here.
CORE_ATTENTION: dict[str, type[CoreAttention]] = {
    "softmax": SoftmaxCoreAttention,
    "twicing": TwicingCoreAttention,
}

__all__ = [
    "CORE_ATTENTION",
    "CoreAttention",
    "SoftmaxCoreAttention",
    "TwicingCoreAttention",
    "attend",
    "flash_available",
    "repeat_kv",
    "select_layers",
    "twicing_attention",
]
