"""How megatron-core splits a parameter across tensor-parallel ranks, and how to undo it.

Every TP-split parameter carries ``tensor_model_parallel=True``, ``partition_dim`` and
``partition_stride``. With stride ``s`` the full tensor is cut into ``s·tp`` equal chunks along
``partition_dim`` and rank ``r`` holds chunks ``r, r+tp, …`` (SwiGLU's fc1 uses ``s = 2`` so each
rank holds a ``[gate_r; up_r]`` pair). Replicated parameters (norms, biases of row-parallel
layers) are identical on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    """How one parameter is laid out across TP ranks (``dim is None``: replicated)."""

    dim: int | None
    stride: int = 1

    def to_json(self) -> dict:
        return {"dim": self.dim, "stride": self.stride}

    @classmethod
    def from_json(cls, d: dict) -> Split:
        return cls(dim=d["dim"], stride=d["stride"])


def split_of(param: torch.Tensor) -> Split:
    """The TP layout megatron-core recorded on ``param``."""
    if getattr(param, "tensor_model_parallel", False):
        return Split(dim=param.partition_dim, stride=getattr(param, "partition_stride", 1))
    return Split(dim=None)


def layout_of(module: torch.nn.Module) -> dict[str, Split]:
    """``{parameter name: Split}`` for every parameter of ``module``."""
    return {name: split_of(p) for name, p in module.named_parameters()}


def merge(shards: list[torch.Tensor], split: Split) -> torch.Tensor:
    """Rebuild the full (TP=1) tensor from the shards of ranks ``0..tp-1``."""
    if split.dim is None:
        return shards[0]
    pieces = [s.chunk(split.stride, dim=split.dim) for s in shards]
    return torch.cat([p[j] for j in range(split.stride) for p in pieces], dim=split.dim)


def shard(full: torch.Tensor, split: Split, rank: int, tp: int) -> torch.Tensor:
    """The part of ``full`` that TP rank ``rank`` of ``tp`` holds."""
    if split.dim is None:
        return full
    chunks = full.chunk(split.stride * tp, dim=split.dim)
    return torch.cat(chunks[rank::tp], dim=split.dim)
