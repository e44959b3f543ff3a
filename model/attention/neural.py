"""Neural Attention (arXiv 2502.17206): pairwise-MLP scores per head, its math and its module.

Per head, queries and keys are projected to ``d′`` and each pair ``[q′_i; k′_j]`` is scored by an
MLP ``2d′ → d′ → d′/2 → 1`` (ReLU), causal mask, softmax, ``·V``; no ``1/√d``. It materialises
``[b, h, s, s, d′]``: O(n²·d′) memory, no flash kernel.

Its weights are per head (``[heads, ...]``), so tensor parallelism splits them with the heads
(``partition_dim=0``) and no TP communication is needed. They are drawn for all heads from the
global RNG and sliced, so every TP size builds the same model. Memory is O(b·h·s²·d′): use it in
few layers (the reference: layer 0 only).

Decoding: megatron caches K and V; each step scores the new queries against every cached key
(O(n·d′) per token and layer), with bottom-right causal masking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from model.attention.backend import repeat_kv
from model.attention.base import CoreAttention


@dataclass
class NeuralScorer:
    """Per-head weights of Neural Attention's pairwise scorer (``h`` = heads of this rank)."""

    wq: torch.Tensor  # [h, d, d′]
    wk: torch.Tensor  # [h, d, d′]
    w1q: torch.Tensor  # [h, d′, d′]  (first MLP layer, query half of its 2d′ inputs)
    w1k: torch.Tensor  # [h, d′, d′]  (key half)
    b1: torch.Tensor  # [h, d′]
    w2: torch.Tensor  # [h, d′, d′/2]
    b2: torch.Tensor  # [h, d′/2]
    w3: torch.Tensor  # [h, d′/2]  (the last layer's bias adds a constant to every score of a
    #                                 row, which softmax cancels: it is left out)


def neural_scores(q, k, w: NeuralScorer) -> torch.Tensor:
    """Unmasked pairwise-MLP scores ``[b, h, s_q, s_k]`` (the softmax's input)."""
    k = repeat_kv(k, q.size(2))
    qp = torch.einsum("bshd,hde->bhse", q, w.wq)  # [b, h, s, d′]
    kp = torch.einsum("bshd,hde->bhse", k, w.wk)
    a = torch.einsum("bhse,hef->bhsf", qp, w.w1q)  # query half of the first MLP layer
    c = torch.einsum("bhse,hef->bhsf", kp, w.w1k)  # key half
    hidden = F.relu(a.unsqueeze(3) + c.unsqueeze(2) + w.b1[None, :, None, None, :])  # [b,h,s,s,d′]
    hidden = F.relu(torch.einsum("bhijf,hfg->bhijg", hidden, w.w2) + w.b2[None, :, None, None, :])
    return torch.einsum("bhijg,hg->bhij", hidden, w.w3)


def neural_attention(q, k, v, w: NeuralScorer, *, causal: bool = True, mask=None):
    """Pairwise-MLP attention scores, softmax, ``·V`` (no flash kernel, no ``1/√d``).

    Queries are the last ``seq_q`` of the ``seq_k`` positions; ``mask`` (bool, True = may
    attend) hides padding keys."""
    v = repeat_kv(v, q.size(2))
    scores = neural_scores(q, k, w)
    if causal:
        s_q, s_k = q.size(1), k.size(1)
        future = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).triu(s_k - s_q + 1)
        scores = scores.masked_fill(future, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # softmax in at least fp32 (bf16 is upcast; float64 is not cut down to fp32)
    probs = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(-1).to(v.dtype)
    return torch.einsum("bhij,bjhd->bihd", probs, v)


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


class NeuralCoreAttention(CoreAttention, name="neural"):
    """Scores ``MLP([W_q q_i; W_k k_j])`` (ReLU, 2d′ → d′ → d′/2 → 1), causal softmax, ``·V``."""

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

    def _scorer(self) -> NeuralScorer:
        """The weights of the heads this forward runs (Ulysses: this context rank's slice)."""
        heads = self.heads or slice(None)
        return NeuralScorer(**{name: getattr(self, name)[heads] for name in _SHAPES})

    def attention(self, q, k, v, causal, *extra, mask=None):
        return neural_attention(q, k, v, self._scorer(), causal=causal, mask=mask)

    def attention_logits(self, q, k):
        return neural_scores(q, k, self._scorer())
