"""One table of tensor correspondences per architecture, read in both directions.

An adapter lists :class:`Pair` s: our tensor ``ours`` is ``join(theirs…)`` of the Hugging Face
tensors ``theirs``, and ``split`` is the exact inverse. Export reads the table ours → theirs
(:func:`to_hf`); import reads it theirs → ours (:func:`from_hf`), lazily, one of our tensors at a
time, so a model larger than memory streams through. The name mapping exists once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

Take = Callable[[str], torch.Tensor]
#: our name -> a function computing that tensor from the HF tensors (read when called)
Recipes = dict[str, Callable[[], torch.Tensor]]


def _one(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def _listed(tensor: torch.Tensor) -> list[torch.Tensor]:
    return [tensor]


@dataclass(frozen=True)
class Pair:
    """Our tensor ``ours`` is ``join([theirs...])``; ``split(ours)`` gives them back."""

    ours: str
    theirs: tuple[str, ...]
    join: Callable[[Sequence[torch.Tensor]], torch.Tensor] = _one
    split: Callable[[torch.Tensor], Sequence[torch.Tensor]] = _listed


def rename(ours: str, theirs: str) -> Pair:
    """The same tensor under two names."""
    return Pair(ours, (theirs,))


def transposed(ours: str, theirs: str) -> Pair:
    """Our ``nn.Linear`` weight as a ``Conv1D`` weight (GPT-2: ``x @ W`` with ``W [in, out]``)."""
    return Pair(ours, (theirs,), lambda ts: ts[0].t(), lambda t: [t.t()])


def concatenated(ours: str, theirs: tuple[str, ...]) -> Pair:
    """Ours is the row-wise concatenation of equally sized ``theirs`` (SwiGLU's gate and up)."""
    return Pair(ours, theirs, lambda ts: torch.cat(list(ts), dim=0), lambda t: t.chunk(len(theirs)))


def to_hf(pairs: list[Pair], take: Take) -> dict[str, torch.Tensor]:
    """The HF tensors from ours (``take(name)`` returns one of ours)."""
    out: dict[str, torch.Tensor] = {}
    for pair in pairs:
        out |= dict(zip(pair.theirs, pair.split(take(pair.ours)), strict=True))
    return out


def from_hf(pairs: list[Pair], take: Take) -> Recipes:
    """Our tensors from the HF ones, as recipes: ``recipes[name]()`` reads and joins ``theirs``
    (``take(name)`` returns one HF tensor)."""
    return {pair.ours: partial(_join, pair, take) for pair in pairs}


def _join(pair: Pair, take: Take) -> torch.Tensor:
    return pair.join([take(name) for name in pair.theirs])
