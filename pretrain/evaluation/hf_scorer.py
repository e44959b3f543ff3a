"""Scoring a Hugging Face export (``pretrain.export_hf``) with the evaluation's protocol."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from data_prep.base.errors import CheckpointError, ConfigError
from pretrain.checkpoint.unsafe_pickle import refused_global, unsafe_pickle_error
from pretrain.evaluation.scorer import TokenNLL


def hf_token_nll(model) -> TokenNLL:
    """Per-token NLL ``[b, s]`` of a ``transformers`` causal LM (as megatron's with ``labels``)."""
    import torch.nn.functional as F

    def fn(tokens, positions, labels):
        logits = model(input_ids=tokens, position_ids=positions).logits
        return F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")

    return fn


class HFExport:
    """A Hugging Face export as the evaluation needs it: tokenizer, config, model, metadata."""

    def __init__(self, path: Path, tokenizer: str | None):
        from data_prep.base.errors import DataPrepError
        from data_prep.tokenizer_kinds import load_tokenizer
        from pretrain.export.hf_export import METADATA

        self.tag_dir = Path(path)
        sp_model = self.tag_dir / "tokenizer.model"
        if not sp_model.is_file():  # a Hugging Face tokenizer's export: its own files
            sp_model = self.tag_dir / "tokenizer.json"
        if not (self.tag_dir / "config.json").is_file() or not sp_model.is_file():
            raise CheckpointError(
                f"{self.tag_dir} is not a Hugging Face export with a tokenizer "
                "(python -m pretrain.export_hf writes one)"
            )
        meta_file = self.tag_dir / METADATA
        self.meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        try:
            self.tokenizer = load_tokenizer(sp_model)
            given = load_tokenizer(tokenizer).sha256 if tokenizer is not None else None
        except DataPrepError as e:
            raise CheckpointError(str(e)) from None
        if given is not None and given != self.tokenizer.sha256:
            raise CheckpointError(
                f"tokenizer {tokenizer} does not match the export's {sp_model}: token ids would "
                "mean different things"
            )
        from transformers import AutoConfig

        # a custom-code export (every non-softmax variant) names its modeling files in auto_map
        raw = json.loads((self.tag_dir / "config.json").read_text())
        self.remote_code = "auto_map" in raw
        self.config = AutoConfig.from_pretrained(
            str(self.tag_dir), local_files_only=True, trust_remote_code=self.remote_code
        )
        self.step = self.meta.get("step")
        self.seq_length = self.meta.get("model", {}).get("seq_length") or getattr(
            self.config, "max_position_embeddings", None
        )
        self.learned_positions = self.config.model_type == "gpt2" or (
            getattr(self.config, "position_embedding", None) == "learned_absolute"
        )

    def load(self):
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(self.tag_dir),
                local_files_only=True,
                dtype=torch.float32,
                trust_remote_code=self.remote_code,
            )
        except Exception as e:
            called = refused_global(e)
            if called is None:
                raise
            weights = sorted(p.name for p in self.tag_dir.glob("*.bin")) or ["its weights"]
            raise unsafe_pickle_error(self.tag_dir / weights[0], called) from None
        return model.eval()


class HFScorer:
    """A Hugging Face export on one process (no tensor parallelism, no probes)."""

    rank = 0

    def __init__(self, args: argparse.Namespace):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--hf-model evaluates on one process (no tensor parallelism)")
        if args.attention_entropy:
            raise ConfigError("--attention-entropy needs a twicing-lm checkpoint, not --hf-model")
        self.hf = HFExport(args.hf_model, args.tokenizer)
        self.tokenizer = self.hf.tokenizer
        self.seq_length = self.hf.seq_length
        positions = getattr(self.hf.config, "n_positions", None) or getattr(
            self.hf.config, "max_position_embeddings", None
        )
        self.max_positions = positions if self.hf.learned_positions else None

    def load(self) -> None:
        self.model = self.hf.load()

    def token_nll(self) -> TokenNLL:
        return hf_token_nll(self.model)

    def probes(self, args: argparse.Namespace) -> tuple[Any, Any]:
        return None, None

    def describe(self) -> dict[str, Any]:
        meta = self.hf.meta.get("model", {})
        return {
            "checkpoint": str(self.hf.tag_dir),
            "hf_model": self.hf.meta.get("architecture") or type(self.model).__name__,
            "step": self.hf.step,
            "model": {
                "attention": meta.get("attention", "softmax"),
                "attention_layers": meta.get("attention_layers"),
                "num_layers": self.hf.config.num_hidden_layers,
                "hidden_size": self.hf.config.hidden_size,
            },
            "tokenizer_sha256": self.tokenizer.sha256,
            "tensor_parallel": 1,
        }
