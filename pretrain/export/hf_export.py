"""Export a twicing-lm checkpoint as a Hugging Face ``transformers`` model (the usage, the
architectures and the output layout are in ``pretrain.export_hf``): pick the architecture,
convert the TP=1 weights through its adapter, write the model, tokenizer and metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from data_prep.base.errors import ConfigError
from model import ModelConfig
from pretrain.export import gpt2, llama, qwen2, remote
from pretrain.export.output import METADATA, check_export_dir
from pretrain.export.tokenizer_files import PROBES, write_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: architecture name -> its adapter (both directions: ``config_to_hf``/``config_from_hf``,
#: ``to_hf_weights``/``from_hf_weights``, ``model_class``); ``twicing`` is custom modeling code
#: written into the export (``trust_remote_code=True``)
ADAPTERS = {"llama": llama, "qwen2": qwen2, "gpt2": gpt2, "twicing": remote}
#: what ``export(arch=...)`` / ``--arch`` takes: ``auto`` picks a stock architecture when one fits
ARCHS = ("auto", *ADAPTERS)


class ExportError(ConfigError):
    """The model has no standard ``transformers`` architecture; the message says why."""


# ---------------------------------------------------------------------------- architecture
def architecture(cfg: ModelConfig, arch: str = "auto") -> str:
    """The adapter for ``cfg``: ``"llama"``, ``"qwen2"`` or ``"gpt2"`` (stock ``transformers``)
    when every layer is softmax and the rest fits, else ``"twicing"`` (custom code). ``arch``
    forces one; ``ExportError`` names what does not fit."""
    if arch not in ARCHS:
        raise ExportError(f"unknown export architecture {arch!r}; known: {', '.join(ARCHS)}")
    if arch in ("auto", "twicing"):
        why = remote.unsupported(cfg)
        if why is not None:
            raise ExportError(f"cannot export with custom modeling code: {why}")
    if arch == "twicing":
        return arch
    try:
        stock = _stock_architecture(cfg)
    except ExportError:
        if arch == "auto":
            return "twicing"
        raise
    if arch not in ("auto", stock):
        raise ExportError(
            f"--arch {arch} does not fit this model (it matches {stock}): use --arch {stock}, "
            "auto or twicing"
        )
    return stock


def _stock_architecture(cfg: ModelConfig) -> str:
    other = [i for i in range(cfg.num_layers) if cfg.variant_of_layer(i) != "softmax"]
    if other:
        variants = sorted({cfg.variant_of_layer(i) for i in other})
        raise ExportError(
            f"layers {other} use {'/'.join(variants)} attention: no standard transformers "
            "architecture computes it (twicing is (2A − A²)V, not softmax(QKᵀ)V); export with "
            "--arch auto or twicing (custom modeling code, loaded with trust_remote_code=True)"
        )
    key = (cfg.position_embedding, cfg.normalization, cfg.activation)
    if key == ("rope", "RMSNorm", "swiglu"):
        return "qwen2" if cfg.qkv_bias and not cfg.add_bias_linear else "llama"
    gpt2_like = key[:2] == ("learned_absolute", "LayerNorm") and key[2] in gpt2.ACTIVATIONS.values()
    if gpt2_like and not cfg.qkv_bias:
        return "gpt2"
    raise ExportError(
        f"no standard transformers architecture matches position_embedding="
        f"{cfg.position_embedding}, normalization={cfg.normalization}, activation="
        f"{cfg.activation}{', qkv_bias' * cfg.qkv_bias}; exportable to stock code: rope + "
        "RMSNorm + swiglu (Llama; Qwen2 with qkv_bias) or learned_absolute + LayerNorm + "
        "gelu|gelu_tanh|relu (GPT-2); any model exports with --arch auto or twicing (custom "
        "modeling code)"
    )


def hf_config(cfg: ModelConfig, tokenizer, dtype: torch.dtype, arch: str = "auto"):
    """The ``transformers`` config of ``cfg``'s architecture."""
    special = {
        "bos_token_id": tokenizer.bos if tokenizer.bos >= 0 else None,
        "eos_token_id": tokenizer.eod,
        "pad_token_id": tokenizer.pad if tokenizer.pad >= 0 else None,
    }
    return ADAPTERS[architecture(cfg, arch)].config_to_hf(cfg, special, dtype)


def convert_state_dict(
    cfg: ModelConfig, sd: dict[str, torch.Tensor], arch: str = "auto"
) -> dict[str, torch.Tensor]:
    """Our TP=1 megatron-core weights → the HF architecture's parameter names and layouts."""
    arch = architecture(cfg, arch)
    sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    out = ADAPTERS[arch].to_hf_weights(cfg, sd.pop)
    if sd:
        raise ExportError(f"weights with no place in the {arch} model: {sorted(sd)[:5]}")
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------- export
def export(
    source,
    out: str | Path,
    dtype: str = "fp32",
    probes: list[str] | None = None,
    arch: str = "auto",
) -> dict[str, Any]:
    """Export ``source`` (an opened ``Checkpoint`` or any path ``open_checkpoint`` takes) to
    ``out`` as ``arch`` (see :func:`architecture`); returns the metadata written to
    ``twicing_export.json``."""
    out = check_export_dir(out)
    import transformers

    from pretrain.checkpoint.reader import Checkpoint, full_state_dict, open_checkpoint

    ck = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    arch = architecture(ck.model, arch)  # refuse before reading any weights
    config = hf_config(ck.model, ck.tokenizer, DTYPES[dtype], arch)
    weights = convert_state_dict(ck.model, full_state_dict(ck), arch)
    model = ADAPTERS[arch].model_class()(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if ck.model.tied_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ExportError(
            f"{arch} weights do not fit: missing {missing[:3]}, extra {unexpected[:3]}"
        )
    if ck.model.tied_embeddings:
        model.tie_weights()
    model = model.to(DTYPES[dtype]).eval()
    if out.exists():  # an earlier export (check_export_dir refused anything else)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # the tokenizer first: its check loads AutoTokenizer, which reads config.json when present
    # (and would ask whether to trust the custom code)
    tokenizer_note = write_tokenizer(ck.tokenizer, out, PROBES + list(probes or []))
    if arch == "twicing":
        # the padded embedding rows are no tokens: generate() never picks them (as ours)
        padding = list(range(ck.tokenizer.vocab_size, ck.model.padded_vocab_size))
        model.generation_config.suppress_tokens = padding or None
    model.save_pretrained(str(out), safe_serialization=True)
    if arch == "twicing":
        remote.write_code(out)
    meta = {
        "architecture": config.architectures[0],
        "source": str(ck.tag_dir),
        "step": ck.step,
        "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
        "model": ck.state.model_config,
        "vocab_size": ck.tokenizer.vocab_size,
        "padded_vocab_size": ck.model.padded_vocab_size,
        "tokenizer": {
            "file": "tokenizer.model",
            "sha256": ck.tokenizer.sha256,
            "eod": ck.tokenizer.eod,
            "note": tokenizer_note,
        },
        "transformers": transformers.__version__,
        "trust_remote_code": arch == "twicing",
    }
    (out / METADATA).write_text(json.dumps(meta, indent=1))
    return meta
