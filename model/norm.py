"""Layer norms that also work with sequence parallelism.

megatron-core's torch fallback norm refuses ``sequence_parallel``. This one builds the plain torch
module and tags its parameters ``sequence_parallel=True`` when the config asks, so the training
side knows their gradients are partial per TP rank and must be summed across TP.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

_NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class Norm:
    """``build_module``-compatible factory returning ``torch.nn.LayerNorm`` or ``RMSNorm``."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_ignored):
        if config.normalization not in _NORMS:
            raise ValueError(f"normalization {config.normalization!r} is not one of {list(_NORMS)}")
        norm = _NORMS[config.normalization](hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm
