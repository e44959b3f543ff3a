"""Attention entropy per layer: how spread each query's attention distribution is.

For query ``i`` with causal weights ``A_i·`` over keys ``0..i`` the entropy is
``H_i = −Σ_j A_ij log A_ij`` (nats); its ceiling is ``log(i+1)`` (uniform attention), so the
normalised entropy ``H_i / log(i+1)`` (queries with ≥ 2 keys) compares positions and lengths.
Both are averaged over sequences, heads and positions ``≥ skip``. ``A`` is the variant's softmax
map (for twicing the ``A`` inside ``2A − A²``; for Neural Attention its MLP-scored map).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from model.attention.base import CoreAttention


def causal_entropy(logits: torch.Tensor, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and normalised entropy of causal softmax rows of ``logits`` (``[..., s, s]``).

    Returns two float64 tensors ``[..., s − skip]``; the normalised value of a query with one key
    (position 0) is NaN.
    """
    s = logits.size(-1)
    future = torch.ones(s, s, dtype=torch.bool, device=logits.device).triu(1)
    probs = logits.float().masked_fill(future, float("-inf")).softmax(dim=-1)
    entropy = torch.special.entr(probs).sum(-1, dtype=torch.float64)[..., skip:]
    ceiling = torch.arange(1, s + 1, dtype=torch.float64, device=logits.device).log()[skip:]
    return entropy, entropy / ceiling


class AttentionEntropyProbe:
    """Hooks every core-attention module of a megatron-core ``GPTModel`` and averages ``H``.

    Under tensor parallelism each rank sees its own heads; ``result`` sums over the TP group.
    """

    def __init__(self, model, skip: int = 0):
        self.skip = skip
        layers = model.decoder.layers
        self.sums = torch.zeros(len(layers), 2, dtype=torch.float64)
        self.counts = torch.zeros(len(layers), 2, dtype=torch.float64)
        self.handles = []
        for i, layer in enumerate(layers):
            core = layer.self_attention.core_attention
            if not isinstance(core, CoreAttention):
                raise TypeError(f"layer {i + 1}: {type(core).__name__} has no attention logits")
            self.handles.append(core.register_forward_pre_hook(self._hook(i), with_kwargs=True))

    def _hook(self, index: int):
        def hook(module: CoreAttention, args, kwargs):
            query = kwargs["query"] if "query" in kwargs else args[0]
            key = kwargs["key"] if "key" in kwargs else args[1]
            with torch.no_grad():
                q, k = query.transpose(0, 1), key.transpose(0, 1)  # [b, s, h, d]
                for b in range(q.size(0)):  # one sequence at a time bounds the s² memory
                    logits = module.attention_logits(q[b : b + 1], k[b : b + 1])
                    entropy, normalised = causal_entropy(logits, self.skip)
                    normalised = normalised[~normalised.isnan()]
                    self.sums[index, 0] += entropy.sum()
                    self.counts[index, 0] += entropy.numel()
                    self.sums[index, 1] += normalised.sum()
                    self.counts[index, 1] += normalised.numel()

        return hook

    def result(self) -> dict[str, list[float]]:
        """Per-layer means (layer 1..L): ``entropy`` in nats and ``normalized`` in [0, 1]."""
        sums, counts = self.sums.clone(), self.counts.clone()
        group = (
            parallel_state.get_tensor_model_parallel_group()
            if parallel_state.model_parallel_is_initialized()
            else None
        )
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
            dist.all_reduce(counts, group=group)
        means = sums / counts.clamp(min=1)
        return {"entropy": means[:, 0].tolist(), "normalized": means[:, 1].tolist()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
