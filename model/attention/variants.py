"""The math of the related attention mechanisms, on ``[batch, seq, heads, head_dim]`` tensors.

- NeuTRENO (Nguyen et al., NeurIPS 2023): ``u_l = A_l V_l + λ (V⁰ − V_l)`` in layers ``l ≥ 1``,
  ``V⁰`` the first layer's values, added per head after ``A·V`` (reference λ = 0.4 for LMs).
- ResFormer (value residual, ACL 2025): layers ``≥ 1`` attend with ``λ₁·V₁ + λ₂·V_n`` (0.5/0.5);
  SVFormer: ``V_n = V₁``.
- Neural Attention (arXiv 2502.17206): per head, queries and keys are projected to ``d′`` and each
  pair ``[q′_i; k′_j]`` is scored by an MLP ``2d′ → d′ → d′/2 → 1`` (ReLU), causal mask,
  softmax, ``·V``; no ``1/√d``. It materialises ``[b, h, s, s, d′]``: O(n²·d′) memory, no flash.

Values may carry fewer heads than queries (GQA); they are expanded to the query heads where a
formula mixes them with per-query-head quantities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.attention.backend import Backend, attend, repeat_kv


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
):
    """``A V + λ (V⁰ − V)`` per head (``v_first`` has ``v``'s shape)."""
    out = attend(q, k, v, causal=causal, scale=softmax_scale, backend=backend)
    heads = q.size(2)
    return out + lam * (repeat_kv(v_first, heads) - repeat_kv(v, heads))


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
):
    """ResFormer: ``A (λ₁ V₁ + λ₂ V)``; SVFormer is ``lam_first=1, lam_own=0``."""
    mixed = v_first * lam_first if lam_own == 0 else lam_first * v_first + lam_own * v
    return attend(q, k, mixed, causal=causal, scale=softmax_scale, backend=backend)


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


def neural_attention(q, k, v, w: NeuralScorer, *, causal: bool = True):
    """Pairwise-MLP attention scores, softmax, ``·V`` (no flash kernel, no ``1/√d``)."""
    v = repeat_kv(v, q.size(2))
    scores = neural_scores(q, k, w)
    if causal:
        s = q.size(1)
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    probs = scores.float().softmax(dim=-1).to(v.dtype)
    return torch.einsum("bhij,bjhd->bihd", probs, v)
