"""twicing-lm model: megatron-core GPT with pluggable (Twicing) core attention.

``ModelConfig`` imports nothing heavy; ``build_gpt`` / ``transformer_config`` load megatron-core
on first use.
"""

from __future__ import annotations

from typing import Any

from model.model_config import ModelConfig

__all__ = ["ModelConfig", "build_gpt", "transformer_config"]


def __getattr__(name: str) -> Any:
    if name in ("build_gpt", "transformer_config"):
        from model import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
