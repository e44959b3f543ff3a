"""Tiny Hugging Face models made here with ``transformers`` (no hub), one per architecture
``pretrain.import_hf`` maps, with every weight perturbed (norm weights ≠ 1, biases ≠ 0) so a
misplaced tensor shows, and the WikiText manifest's sentencepiece tokenizer (1024 pieces)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

COMMON = dict(vocab_size=1024, hidden_size=64, num_attention_heads=4, intermediate_size=96,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2)  # fmt: skip
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip

#: name -> (transformers config class, model class, config kwargs)
ARCHS = {
    # GQA, untied, Llama 3.1 RoPE scaling, 4 layers (the retrofit keeps 0..1, changes 2..3)
    "llama-gqa-untied": ("LlamaConfig", "LlamaForCausalLM", dict(
        COMMON, num_hidden_layers=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters=LLAMA3)),
    # tied, biases on every linear layer, linear RoPE scaling
    "llama-tied-bias": ("LlamaConfig", "LlamaForCausalLM", dict(
        COMMON, num_hidden_layers=2, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                        "factor": 2.0})),
    # a window longer than the sequences: full attention, exactly
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        COMMON, num_hidden_layers=2, num_key_value_heads=2, sliding_window=4096)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        COMMON, num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # GPT-2's own activation (gelu_new, our gelu_tanh), tied
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=1024, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
        eos_token_id=2)),
}  # fmt: skip


def tokenizer_model(manifest: Path) -> Path:
    return (manifest.parent / json.loads(manifest.read_text())["tokenizer"]["model"]).resolve()


def make(name: str, out: Path, tokenizer: Path, seed: int = 0) -> Path:
    """Save HF model ``name`` (see :data:`ARCHS`) with perturbed weights and ``tokenizer``."""
    import transformers

    config_class, model_class, kwargs = ARCHS[name]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    shutil.copy(tokenizer, out / "tokenizer.model")
    return out


def load(hf_dir: Path, **kwargs):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, local_files_only=True, dtype=torch.float32, **kwargs
    ).eval()


def logits(hf_dir: Path, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return load(hf_dir, **kwargs)(input_ids=ids).logits


def random_ids(batch: int = 2, length: int = 64, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, 1024, (batch, length), generator=torch.Generator().manual_seed(seed))


def our_logits(ck, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a checkpoint's model at TP=1 (needs a one-rank ``parallel_state``)."""
    from pretrain.checkpoint.load_model import load_model

    with torch.no_grad():
        return load_model(ck, 0, 1)(ids, torch.arange(ids.shape[1]).expand_as(ids), None)


def import_here(hf_dir: Path, out: Path, *overrides: str) -> Path:
    """``pretrain.import_hf`` in this process (needs a one-rank ``parallel_state`` at TP=1)."""
    from pretrain.export.hf_import import plan_import
    from pretrain.export.import_writer import write_import

    write_import(plan_import(hf_dir, list(overrides)), out, {})
    return out
