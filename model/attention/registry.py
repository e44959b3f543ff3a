"""The attention variants by name, with what config validation needs to know about each.

This module imports nothing heavy (no torch, no megatron-core): a YAML config is validated
against it before any library loads. Each variant's math and megatron-core module live side by
side in the file named by ``module``; :func:`core_attention_class` imports it on demand.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

#: the attention kernels ``model.attention_backend`` may name (``model.attention.backend``)
Backend = Literal["auto", "flash", "sdpa", "cudnn", "sdpa-flash", "efficient", "flash4"]
BACKENDS: tuple[str, ...] = get_args(Backend)


@dataclass(frozen=True)
class AttentionVariant:
    """Static facts about one variant; its class in ``module`` reads them from here."""

    name: str
    module: str  #: ``model.attention.<file>`` holding the math and the module
    cls: str  #: the ``CoreAttention`` subclass in that file
    #: attention products per layer (softmax 1, twicing 2): the FLOP count multiplies by it
    attention_passes: int = 1
    #: whether it tolerates attention dropout (multi-pass variants do not: masks would differ)
    supports_dropout: bool = True
    #: whether its scores are a softmax of q·kᵀ, i.e. it can run on the flash kernel
    supports_flash: bool = True
    #: whether layers >= 1 read layer 0's values (so layer 0 itself is plain softmax)
    uses_first_values: bool = False
    #: option name -> default (``model.attention_options``)
    options: dict[str, float] = field(default_factory=dict)
    #: extra check of the filled-in options (raises ``ValueError`` naming the bad one)
    check: Callable[[dict[str, float]], None] | None = None

    def check_options(self, given: dict[str, Any]) -> dict[str, float]:
        """Options with defaults filled in; ``ValueError`` naming an unknown or bad one."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise ValueError(f"unknown option {unknown[0]!r} for {self.name} (known: {known})")
        out = {**self.options, **given}
        if self.check is not None:
            self.check(out)
        return out


def _check_neural(options: dict[str, float]) -> None:
    dim = options["dim"]
    if dim and (dim != int(dim) or dim < 2 or int(dim) % 2):
        raise ValueError(
            f"neural attention option 'dim' (d′) must be an even integer >= 2, got {dim}"
        )


_FIRST_VALUES = dict(supports_dropout=False, uses_first_values=True)

VARIANTS: dict[str, AttentionVariant] = {
    v.name: v
    for v in (
        AttentionVariant("softmax", "model.attention.softmax", "SoftmaxCoreAttention"),
        AttentionVariant(
            "twicing",
            "model.attention.twicing",
            "TwicingCoreAttention",
            attention_passes=2,
            supports_dropout=False,
        ),
        AttentionVariant(
            "neutreno",
            "model.attention.value_residual",
            "NeuTRENOCoreAttention",
            options={"lambda": 0.4},
            **_FIRST_VALUES,
        ),
        AttentionVariant(
            "resformer",
            "model.attention.value_residual",
            "ResFormerCoreAttention",
            options={"lambda_first": 0.5, "lambda_own": 0.5},
            **_FIRST_VALUES,
        ),
        AttentionVariant(
            "svformer", "model.attention.value_residual", "SVFormerCoreAttention", **_FIRST_VALUES
        ),
        AttentionVariant(
            "neural",
            "model.attention.neural",
            "NeuralCoreAttention",
            supports_dropout=False,
            supports_flash=False,
            options={"dim": 0.0},  # d′; 0 means max(2, head_dim // 32)
            check=_check_neural,
        ),
    )
}


def variant(name: str) -> AttentionVariant:
    """The registered variant ``name``; ``KeyError`` listing the known ones."""
    if name not in VARIANTS:
        raise KeyError(f"unknown attention variant {name!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[name]


def core_attention_class(name: str) -> type:
    """The megatron-core core-attention class of variant ``name`` (imports its file)."""
    v = variant(name)
    return getattr(importlib.import_module(v.module), v.cls)
