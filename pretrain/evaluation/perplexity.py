"""Perplexity protocols over one token stream.

A stream of N tokens has targets 1..N-1 (target t is predicted from tokens < t). A window reads
input tokens ``[b, e)`` and predicts targets ``[b+1, e+1)``; it *scores* only targets not scored
by an earlier window.

- ``segments``: non-overlapping windows of ``length`` tokens, every target scored once with the
  context since its segment start.
- ``sliding``: windows of ``length`` starting every ``stride`` tokens; each scores only its new
  targets, so all but the first ``length`` targets see at least ``length - stride`` tokens of
  context. ``stride == length`` is exactly the segment protocol.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Window:
    begin: int  # first input token
    end: int  # one past the last input token
    first_scored: int  # first target (stream index) this window scores

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def skip(self) -> int:
        """Leading positions of this window whose targets were scored earlier."""
        return self.first_scored - self.begin - 1


def windows(n_tokens: int, length: int, stride: int) -> list[Window]:
    if length < 1 or not 1 <= stride <= length:
        raise ValueError(f"need length >= 1 and 1 <= stride <= length, got {length}, {stride}")
    out, next_target, begin = [], 1, 0
    while next_target < n_tokens:
        end = min(begin + length, n_tokens - 1)
        out.append(Window(begin, end, max(next_target, begin + 1)))
        next_target = end + 1
        begin += stride
    return out


@dataclass
class Totals:
    nll: float = 0.0  # nats, float64 sum
    targets: int = 0

    def add(self, nll: float, targets: int) -> None:
        self.nll += nll
        self.targets += targets

    @property
    def token_ppl(self) -> float:
        return math.exp(self.nll / self.targets)


#: (tokens [b, s], position_ids [b, s], labels [b, s]) -> per-token NLL [b, s]
TokenNLL = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def batches(ws: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of equal length, at most ``batch_size`` at a time."""
    group: list[Window] = []
    for w in ws:
        if group and (len(group) == batch_size or w.length != group[0].length):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


@torch.no_grad()
def score(
    stream: list[int] | torch.Tensor,
    token_nll: TokenNLL,
    *,
    length: int,
    stride: int,
    batch_size: int = 8,
    on_batch: Callable[[list[Window], torch.Tensor], None] | None = None,
    progress=None,
) -> Totals:
    """Sum of the NLL of every scored target (float64) under the chosen protocol."""
    tokens = torch.as_tensor(stream, dtype=torch.long)
    ws = windows(len(tokens), length, stride)
    totals = Totals()
    for group in batches(ws, batch_size):
        n = group[0].length
        inputs = torch.stack([tokens[w.begin : w.end] for w in group])
        labels = torch.stack([tokens[w.begin + 1 : w.end + 1] for w in group])
        positions = torch.arange(n).expand(len(group), n)
        nll = token_nll(inputs, positions, labels).double()
        mask = torch.stack([torch.arange(n) >= w.skip for w in group])
        totals.add(float((nll * mask).sum()), int(mask.sum()))
        if on_batch is not None:
            on_batch(group, mask)
        if progress is not None:
            progress.update(int(mask.sum()))
    assert totals.targets == len(tokens) - 1, (totals.targets, len(tokens))
    return totals
