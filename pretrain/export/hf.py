"""Export a softmax-attention checkpoint as a Hugging Face ``transformers`` model.

``python -m pretrain.export_hf --checkpoint RUN_DIR|step_dir|model.pt --out DIR [--dtype bf16]``

The architecture follows the model config (every layer must use softmax attention):

* **Llama** (``LlamaForCausalLM``): RoPE (non-interleaved, rotate-half — megatron-core's default
  and HF's), RMSNorm, SwiGLU, with or without linear biases (``attention_bias``/``mlp_bias``),
  GQA as ``num_key_value_heads``;
* **GPT-2** (``GPT2LMHeadModel``): learned absolute positions, LayerNorm, GELU (exact erf,
  ``activation_function="gelu"``) or ReLU; a model without linear biases gets zero biases and a
  GQA model has its key/value heads repeated (both exact).

Other combinations, and any model with a twicing (or other non-softmax) layer, are refused: no
standard architecture computes them. Weights are the TP=1 merge of the checkpoint; the
vocabulary keeps megatron's padded size (``model.padded_vocab_size``) so logits and the softmax
normaliser are those of the trained model; embeddings stay tied when they were.

``DIR`` then holds ``config.json``, ``generation_config.json``, ``model.safetensors``, the run's
sentencepiece model ``tokenizer.model`` (token ids are exactly ``sp.encode(text)``), and —
when the sentencepiece model is a BPE with identity normalisation (what ``data_prep`` trains) —
``tokenizer.json`` + ``tokenizer_config.json`` reproducing those ids, verified at export time, so
``AutoTokenizer.from_pretrained(DIR)`` works; ``twicing_export.json`` records the source
checkpoint. Load offline with ``AutoModelForCausalLM.from_pretrained(DIR)``.

Exit codes: 0 done, 2 not exportable / bad arguments, 4 missing or damaged checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from model import ModelConfig
from pretrain.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METADATA = "twicing_export.json"


class ExportError(ConfigError):
    """The model has no standard ``transformers`` architecture; the message says why."""


# ---------------------------------------------------------------------------- architecture
def architecture(cfg: ModelConfig) -> str:
    """``"llama"`` or ``"gpt2"`` for ``cfg``; raises ``ExportError`` naming what does not fit."""
    other = [i for i in range(cfg.num_layers) if cfg.variant_of_layer(i) != "softmax"]
    if other:
        variants = sorted({cfg.variant_of_layer(i) for i in other})
        raise ExportError(
            f"layers {other} use {'/'.join(variants)} attention: no standard transformers "
            "architecture computes it (twicing is (2A − A²)V, not softmax(QKᵀ)V), so the model "
            "cannot be exported to Hugging Face. Only softmax-attention models export "
            "(model.attention=softmax or model.attention_layers=none)"
        )
    key = (cfg.position_embedding, cfg.normalization, cfg.activation)
    if key == ("rope", "RMSNorm", "swiglu"):
        return "llama"
    if key in (
        ("learned_absolute", "LayerNorm", "gelu"),
        ("learned_absolute", "LayerNorm", "relu"),
    ):
        return "gpt2"
    raise ExportError(
        f"no standard transformers architecture matches position_embedding="
        f"{cfg.position_embedding}, normalization={cfg.normalization}, activation="
        f"{cfg.activation}; exportable: rope + RMSNorm + swiglu (Llama) or learned_absolute + "
        "LayerNorm + gelu|relu (GPT-2)"
    )


def hf_config(cfg: ModelConfig, tokenizer, dtype: torch.dtype):
    """The ``transformers`` config of ``cfg``'s architecture."""
    import transformers

    arch = architecture(cfg)
    ffn = cfg.ffn_hidden_size or 4 * cfg.hidden_size
    special = {
        "bos_token_id": tokenizer.bos if tokenizer.bos >= 0 else None,
        "eos_token_id": tokenizer.eod,
        "pad_token_id": tokenizer.pad if tokenizer.pad >= 0 else None,
    }
    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=cfg.padded_vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=ffn,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.query_groups,
            head_dim=cfg.head_dim,
            hidden_act="silu",
            max_position_embeddings=cfg.seq_length,
            rms_norm_eps=cfg.layernorm_epsilon,
            tie_word_embeddings=cfg.tied_embeddings,
            attention_bias=cfg.add_bias_linear,
            mlp_bias=cfg.add_bias_linear,
            attention_dropout=0.0,
            architectures=["LlamaForCausalLM"],
            dtype=dtype,
            rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_base)},
            **special,
        )
    return transformers.GPT2Config(
        vocab_size=cfg.padded_vocab_size,
        n_positions=cfg.seq_length,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_attention_heads,
        n_inner=ffn,
        activation_function=cfg.activation,  # "gelu" is exact (erf) GELU, as megatron's F.gelu
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=cfg.layernorm_epsilon,
        scale_attn_weights=True,
        tie_word_embeddings=cfg.tied_embeddings,
        architectures=["GPT2LMHeadModel"],
        dtype=dtype,
        **special,
    )


# ---------------------------------------------------------------------------- weights
def _split_qkv(w: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """megatron-core's fused QKV rows, grouped per query group as ``[q_g (r heads), k_g, v_g]``,
    into Q ``[heads·d, …]``, K and V ``[groups·d, …]`` (query head h belongs to group h // r,
    which is HF's ``repeat_kv`` order)."""
    g, d = cfg.query_groups, cfg.head_dim
    r = cfg.num_attention_heads // g
    grouped = w.reshape(g, (r + 2) * d, *w.shape[1:])
    q, k, v = grouped.split([r * d, d, d], dim=1)
    return tuple(x.reshape(-1, *w.shape[1:]) for x in (q, k, v))


def _repeat_kv(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    r = cfg.num_attention_heads // cfg.query_groups
    d = cfg.head_dim
    return (
        x.reshape(cfg.query_groups, 1, d, *x.shape[1:])
        .expand(-1, r, -1, *x.shape[1:])
        .reshape(-1, *x.shape[1:])
    )


def convert_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our TP=1 megatron-core weights → the HF architecture's parameter names and layouts."""
    arch = architecture(cfg)
    sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    out: dict[str, torch.Tensor] = {}
    ffn = cfg.ffn_hidden_size or 4 * cfg.hidden_size
    bias = cfg.add_bias_linear

    def take(name: str) -> torch.Tensor:
        return sd.pop(name)

    if arch == "llama":
        out["model.embed_tokens.weight"] = take("embedding.word_embeddings.weight")
        for i in range(cfg.num_layers):
            src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
            out[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
            out[dst + "post_attention_layernorm.weight"] = take(src + "pre_mlp_layernorm.weight")
            q, k, v = _split_qkv(take(src + "self_attention.linear_qkv.weight"), cfg)
            out |= {
                dst + f"self_attn.{n}_proj.weight": t for n, t in zip("qkv", (q, k, v), strict=True)
            }
            out[dst + "self_attn.o_proj.weight"] = take(src + "self_attention.linear_proj.weight")
            gate, up = take(src + "mlp.linear_fc1.weight").split([ffn, ffn], dim=0)
            out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
            out[dst + "mlp.down_proj.weight"] = take(src + "mlp.linear_fc2.weight")
            if bias:
                q, k, v = _split_qkv(take(src + "self_attention.linear_qkv.bias"), cfg)
                out |= {
                    dst + f"self_attn.{n}_proj.bias": t
                    for n, t in zip("qkv", (q, k, v), strict=True)
                }
                out[dst + "self_attn.o_proj.bias"] = take(src + "self_attention.linear_proj.bias")
                gate, up = take(src + "mlp.linear_fc1.bias").split([ffn, ffn], dim=0)
                out[dst + "mlp.gate_proj.bias"], out[dst + "mlp.up_proj.bias"] = gate, up
                out[dst + "mlp.down_proj.bias"] = take(src + "mlp.linear_fc2.bias")
        out["model.norm.weight"] = take("decoder.final_layernorm.weight")
    else:
        h = cfg.hidden_size
        out["transformer.wte.weight"] = take("embedding.word_embeddings.weight")
        out["transformer.wpe.weight"] = take("embedding.position_embeddings.weight")

        def linear(name: str, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
            w = take(name + ".weight")
            b = take(name + ".bias") if bias else torch.zeros(n_out, dtype=w.dtype)
            return w, b

        for i in range(cfg.num_layers):
            src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
                out[dst + theirs + ".weight"] = take(src + ours + ".weight")
                out[dst + theirs + ".bias"] = take(src + ours + ".bias")
            w, b = linear(
                src + "self_attention.linear_qkv",
                (cfg.num_attention_heads + 2 * cfg.query_groups) * cfg.head_dim,
            )
            q, k, v = _split_qkv(w, cfg)
            qb, kb, vb = _split_qkv(b, cfg)
            if cfg.query_groups != cfg.num_attention_heads:  # GPT-2 has no GQA: repeat K/V heads
                k, v, kb, vb = (_repeat_kv(x, cfg) for x in (k, v, kb, vb))
            # GPT-2's Conv1D computes x @ W + b with W [in, out]: transposed nn.Linear weights
            out[dst + "attn.c_attn.weight"] = torch.cat([q, k, v], dim=0).t()
            out[dst + "attn.c_attn.bias"] = torch.cat([qb, kb, vb], dim=0)
            w, b = linear(src + "self_attention.linear_proj", h)
            out[dst + "attn.c_proj.weight"], out[dst + "attn.c_proj.bias"] = w.t(), b
            w, b = linear(src + "mlp.linear_fc1", ffn)
            out[dst + "mlp.c_fc.weight"], out[dst + "mlp.c_fc.bias"] = w.t(), b
            w, b = linear(src + "mlp.linear_fc2", h)
            out[dst + "mlp.c_proj.weight"], out[dst + "mlp.c_proj.bias"] = w.t(), b
        out["transformer.ln_f.weight"] = take("decoder.final_layernorm.weight")
        out["transformer.ln_f.bias"] = take("decoder.final_layernorm.bias")
    if not cfg.tied_embeddings:
        out["lm_head.weight"] = take("output_layer.weight")
    if sd:
        raise ExportError(f"weights with no place in the {arch} model: {sorted(sd)[:5]}")
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------- tokenizer
def hf_tokenizer_json(model_path: Path) -> tuple[str | None, str]:
    """A ``tokenizers`` JSON reproducing ``sp.encode`` exactly, or ``(None, why not)``.

    Built for what ``data_prep`` trains: BPE, identity normalisation, whitespace kept, optional
    dummy prefix, single-character user-defined symbols. SentencePiece prepends the dummy ``▁``
    once per text and never merges across a ``▁``; HF's Llama conversion does neither exactly
    (it skips the prefix before a leading space and lets ``▁▁`` merge), hence this explicit
    normaliser (prepend, spaces → ``▁``) + ``Metaspace(split)`` pipeline. Control pieces are
    special tokens that text never produces (``split_special_tokens``), as in SentencePiece.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    ns, ts = proto.normalizer_spec, proto.trainer_spec
    if ts.model_type != ts.BPE:
        return None, "the sentencepiece model is not BPE"
    if ns.name != "identity" or ns.precompiled_charsmap or ns.remove_extra_whitespaces:
        return None, f"the sentencepiece normaliser ({ns.name}) is not the identity"
    if not ts.split_by_whitespace or ts.treat_whitespace_as_suffix:
        return None, "the sentencepiece model does not split at whitespace as a prefix"
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    user = [p.piece for p in proto.pieces if p.type == p.USER_DEFINED]
    if any(len(p) != 1 for p in user):
        return None, "multi-character user-defined symbols"
    vocab, _scores, merges = SentencePieceExtractor(str(model_path)).extract()
    bpe = models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None,
        fuse_unk=True,
        byte_fallback=ts.byte_fallback,
    )
    tok = Tokenizer(bpe)
    steps = [normalizers.Replace(" ", "▁")]
    if ns.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    strip = [decoders.Strip(" ", 1, 0)] if ns.add_dummy_prefix else []
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    control = [p.piece for p in proto.pieces if p.type in (p.CONTROL, p.UNKNOWN)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in control])
    tok.encode_special_tokens = True
    return tok.to_str(), ""


#: texts the exported HF tokenizer must encode exactly as sentencepiece does
_PROBES = [
    " = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : "
    "戦場のヴァルキュリア3 , lit . Valkyria of the Battlefield 3 ) , commonly referred to \n",
    "Hello  world\t tabs\n\nnew  ",
    "  leading spaces and trailing   ",
    "émoji 🙂 ok, ﬁ ligature, ① circled, non\u00a0breaking, Ω≈ç√∫ 日本語",
    "<s> literal </s> and <unk> and <pad> are text",
    "x",
    " ",
    "",
    "\n\nstart\n",
]


def write_tokenizer(tokenizer, out: Path, probes: list[str]) -> str:
    """``tokenizer.model`` always; the HF tokenizer files when they reproduce ``sp.encode`` on
    ``probes`` (else a note why not). Returns a one-line summary."""
    shutil.copy2(tokenizer.model_path, out / "tokenizer.model")
    text, why = hf_tokenizer_json(Path(tokenizer.model_path))
    if text is None:
        return f"tokenizer.model only ({why}): encode with sentencepiece"
    sp = tokenizer.sp
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    (out / "tokenizer.json").write_text(text)
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": piece(sp.bos_id()),
                "eos_token": piece(sp.eos_id()),
                "unk_token": piece(sp.unk_id()),
                "pad_token": piece(sp.pad_id()),
                "add_bos_token": False,
                "add_eos_token": False,
                "split_special_tokens": True,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 1_000_000_000,
            },
            indent=1,
        )
    )
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    bad = [t for t in probes if hf(t, add_special_tokens=False)["input_ids"] != sp.encode(t)]
    if bad:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out / name).unlink()
        return f"tokenizer.model only (the HF tokenizer differed from sentencepiece on {bad[0]!r})"
    return "tokenizer.model + tokenizer.json (AutoTokenizer, ids = sentencepiece's)"


# ---------------------------------------------------------------------------- export
def export(
    source, out: str | Path, dtype: str = "fp32", probes: list[str] | None = None
) -> dict[str, Any]:
    """Export ``source`` (an opened ``Checkpoint`` or any path ``open_checkpoint`` takes) to
    ``out``; returns the metadata written to ``twicing_export.json``."""
    import transformers

    from pretrain.checkpoint.reader import Checkpoint, full_state_dict, open_checkpoint

    ck = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    arch = architecture(ck.model)  # refuse before reading any weights
    config = hf_config(ck.model, ck.tokenizer, DTYPES[dtype])
    weights = convert_state_dict(ck.model, full_state_dict(ck))
    cls = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel}[arch]
    model = cls(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if ck.model.tied_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ExportError(
            f"{arch} weights do not fit: missing {missing[:3]}, extra {unexpected[:3]}"
        )
    if ck.model.tied_embeddings:
        model.tie_weights()
    model = model.to(DTYPES[dtype]).eval()
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer_note = write_tokenizer(ck.tokenizer, out, _PROBES + list(probes or []))
    meta = {
        "architecture": config.architectures[0],
        "source": str(ck.tag_dir),
        "step": ck.step,
        "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
        "model": ck.state["config"]["model"],
        "vocab_size": ck.tokenizer.vocab_size,
        "padded_vocab_size": ck.model.padded_vocab_size,
        "tokenizer": {
            "file": "tokenizer.model",
            "sha256": ck.tokenizer.sha256,
            "eod": ck.tokenizer.eod,
            "note": tokenizer_note,
        },
        "transformers": transformers.__version__,
    }
    (out / METADATA).write_text(json.dumps(meta, indent=1))
    return meta
