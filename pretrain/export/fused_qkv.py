"""megatron-core's fused QKV projection, unfused for architectures with separate Q, K, V."""

from __future__ import annotations

import torch

from model import ModelConfig


def split_qkv(w: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """megatron-core's fused QKV rows, grouped per query group as ``[q_g (r heads), k_g, v_g]``,
    into Q ``[heads·d, …]``, K and V ``[groups·d, …]`` (query head h belongs to group h // r,
    which is HF's ``repeat_kv`` order)."""
    g, d = cfg.query_groups, cfg.head_dim
    r = cfg.num_attention_heads // g
    grouped = w.reshape(g, (r + 2) * d, *w.shape[1:])
    q, k, v = grouped.split([r * d, d, d], dim=1)
    return tuple(x.reshape(-1, *w.shape[1:]) for x in (q, k, v))


def repeat_kv_rows(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    r = cfg.num_attention_heads // cfg.query_groups
    d = cfg.head_dim
    return (
        x.reshape(cfg.query_groups, 1, d, *x.shape[1:])
        .expand(-1, r, -1, *x.shape[1:])
        .reshape(-1, *x.shape[1:])
    )
