"""twicing-lm model: megatron-core GPT with pluggable (Twicing) core attention."""

from model.config import ModelConfig
from model.gpt import build_gpt, transformer_config

__all__ = ["ModelConfig", "build_gpt", "transformer_config"]
