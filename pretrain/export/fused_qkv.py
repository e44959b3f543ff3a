"""megatron-core's fused QKV projection: split for architectures with separate Q, K, V, fused
back on import."""

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


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The inverse of :func:`split_qkv`: Q ``[heads·d, …]``, K and V ``[groups·d, …]`` into
    megatron-core's fused rows ``[q_g (r heads), k_g, v_g]`` per query group."""
    g, d = cfg.query_groups, cfg.head_dim
    r = cfg.num_attention_heads // g
    rest = q.shape[1:]
    grouped = (q.reshape(g, r * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest))
    return torch.cat(grouped, dim=1).reshape(-1, *rest)
