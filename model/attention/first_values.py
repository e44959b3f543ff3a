"""The first layer's attention values, handed to later layers within one forward pass.

NeuTRENO and ResFormer/SVFormer mix layer 0's values ``V¹`` into later layers. One
``FirstLayerValues`` object is shared by all core-attention modules of a model: layer 0 puts its
values (this rank's heads: tensor parallelism needs nothing more), later layers read them. The
model resets it at the start of every forward (``attach``), so nothing leaks between passes;
within a pass it keeps the forward's tensor, which is what activation recompute replays against.
On a later pipeline stage V¹ arrives with the stage's input (``arrive``) instead.
"""

from __future__ import annotations

import torch


class FirstLayerValues:
    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self._arrived: torch.Tensor | None = None

    def clear(self) -> None:
        self.value = None

    def put(self, value: torch.Tensor) -> None:
        self.value = value

    def arrive(self, value: torch.Tensor) -> None:
        """V¹ received from the previous pipeline stage, for this stage's next forward."""
        self._arrived = value

    def get(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError(
                "the first layer's values are not available: layer 0 has not run in this forward "
                "pass and no earlier pipeline stage sent them"
            )
        return self.value

    def _begin_forward(self, *_) -> None:
        self.value, self._arrived = self._arrived, None

    def attach(self, model: torch.nn.Module) -> None:
        """Reset at the start of every forward of ``model`` (to V¹ that arrived, if any)."""
        model.register_forward_pre_hook(self._begin_forward)
