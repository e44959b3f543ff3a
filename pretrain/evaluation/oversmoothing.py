"""Over-smoothing diagnostic: how alike a sequence's token representations become, per layer.

For one sequence's hidden states ``H`` (``s × d``) the metric is the mean cosine similarity over
ordered pairs ``i ≠ j``; with unit rows ``u_i``, ``Σ_ij cos_ij = ‖Σ_i u_i‖²``, so it costs
``O(s·d)``. Layer 0 is the embedding output, layer ``l`` the output of transformer layer ``l``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_offdiag_cosine(hidden: torch.Tensor, skip: int = 0) -> float:
    """Mean off-diagonal cosine similarity of the rows of ``hidden[skip:]`` (``[s, d]``)."""
    return float(batched_offdiag_cosine(hidden.unsqueeze(1), skip)[0])


def batched_offdiag_cosine(hidden: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """The metric for every sequence of ``hidden`` (``[s, b, d]``): a ``[b]`` float64 tensor."""
    u = F.normalize(hidden[skip:].double(), dim=-1)
    n = u.size(0)
    if n < 2:
        raise ValueError(f"need at least 2 positions after skipping {skip}, got {n}")
    total = u.sum(0).square().sum(-1) - u.square().sum((0, 2))  # drop the diagonal (zero rows: 0)
    return total / (n * (n - 1))


class HiddenStateProbe:
    """Records every layer's output on a megatron-core ``GPTModel`` and averages the metric."""

    def __init__(self, model, skip: int = 0):
        self.skip = skip
        self.sums: list[float] = []
        self.count = 0
        self._current: list[torch.Tensor | None] = []
        layers = model.decoder.layers
        self._current = [None] * (len(layers) + 1)
        self.handles = [
            model.decoder.register_forward_pre_hook(self._embedding_hook, with_kwargs=True)
        ]
        for i, layer in enumerate(layers, start=1):
            self.handles.append(layer.register_forward_hook(self._layer_hook(i)))

    def _embedding_hook(self, _module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self._current[0] = hidden.detach()

    def _layer_hook(self, index: int):
        def hook(_module, _args, output):
            self._current[index] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    def collect(self) -> None:
        """Fold the last forward pass in (``[s, b, h]`` states, every sequence of the batch)."""
        values = [batched_offdiag_cosine(h, self.skip) for h in self._current]
        if not self.sums:
            self.sums = [0.0] * len(values)
        for layer, v in enumerate(values):
            self.sums[layer] += float(v.sum())
        self.count += values[0].numel()

    def result(self) -> list[float]:
        return [s / self.count for s in self.sums] if self.count else []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
