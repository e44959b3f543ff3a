"""Attention variants as megatron-core core-attention modules, plus their pure math."""

from model.attention.backend import attend, flash_available, repeat_kv
from model.attention.core import CoreAttention, SoftmaxCoreAttention, TwicingCoreAttention
from model.attention.cross_layer import (
    NeuTRENOCoreAttention,
    ResFormerCoreAttention,
    SVFormerCoreAttention,
)
from model.attention.first_values import FirstLayerValues
from model.attention.layers import select_layers
from model.attention.neural import NeuralCoreAttention
from model.attention.twicing import twicing_attention

#: name -> core-attention class; a new variant is a CoreAttention subclass registered here.
CORE_ATTENTION: dict[str, type[CoreAttention]] = {
    "softmax": SoftmaxCoreAttention,
    "twicing": TwicingCoreAttention,
    "neutreno": NeuTRENOCoreAttention,
    "resformer": ResFormerCoreAttention,
    "svformer": SVFormerCoreAttention,
    "neural": NeuralCoreAttention,
}

__all__ = [
    "CORE_ATTENTION",
    "CoreAttention",
    "FirstLayerValues",
    "NeuTRENOCoreAttention",
    "NeuralCoreAttention",
    "ResFormerCoreAttention",
    "SVFormerCoreAttention",
    "SoftmaxCoreAttention",
    "TwicingCoreAttention",
    "attend",
    "flash_available",
    "repeat_kv",
    "select_layers",
    "twicing_attention",
]
