"""Neural Attention as a megatron-core core attention: pairwise-MLP scores per head.

Its weights are per head (``[heads, ...]``), so tensor parallelism splits them with the heads
(``partition_dim=0``) and no TP communication is needed. They are drawn for all heads from the
global RNG and sliced, so every TP size builds the same model. Memory is O(b·h·s²·d′): use it in
few layers (the reference: layer 0 only).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from model.attention.core import CoreAttention
from model.attention.variants import NeuralScorer, neural_attention, neural_scores

_SHAPES = {  # name -> shape after the head dimension, in terms of (d, d′)
    "wq": lambda d, e: (d, e),
    "wk": lambda d, e: (d, e),
    "w1q": lambda d, e: (e, e),
    "w1k": lambda d, e: (e, e),
    "b1": lambda d, e: (e,),
    "w2": lambda d, e: (e, e // 2),
    "b2": lambda d, e: (e // 2,),
    "w3": lambda d, e: (e // 2,),
}


class NeuralCoreAttention(CoreAttention):
    """Scores ``MLP([W_q q_i; W_k k_j])`` (ReLU, 2d′ → d′ → d′/2 → 1), causal softmax, ``·V``."""

    supports_dropout = False
    supports_flash = False
    OPTIONS = {"dim": 0.0}  # d′; 0 means max(2, head_dim // 32)

    def __init__(self, config, layer_number, attn_mask_type, *args, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, *args, **kwargs)
        if self.backend == "flash":
            raise ValueError(
                "neural attention cannot use the flash backend: its scores come from an MLP"
            )
        head_dim = config.kv_channels
        dim = int(self.options["dim"]) or max(2, head_dim // 32)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        heads = config.num_attention_heads
        local = heads // tp
        for name, shape in _SHAPES.items():
            full = torch.empty(heads, *shape(head_dim, dim), dtype=torch.float32)
            if name.startswith("b"):
                full.zero_()
            else:
                torch.nn.init.normal_(full, std=config.init_method_std)
            param = torch.nn.Parameter(
                full[rank * local : (rank + 1) * local].clone().to(config.params_dtype)
            )
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
            self.register_parameter(name, param)

    @classmethod
    def check_options(cls, options):
        out = super().check_options(options)
        dim = out["dim"]
        if dim and (dim != int(dim) or dim < 2 or int(dim) % 2):
            raise ValueError(
                f"neural attention option 'dim' (d′) must be an even integer >= 2, got {dim}"
            )
        return out

    def _scorer(self) -> NeuralScorer:
        return NeuralScorer(**{name: getattr(self, name) for name in _SHAPES})

    def attention(self, q, k, v, causal, *extra):
        return neural_attention(q, k, v, self._scorer(), causal=causal)

    def attention_logits(self, q, k):
        return neural_scores(q, k, self._scorer())
