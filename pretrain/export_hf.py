"""Export a checkpoint as a Hugging Face ``transformers`` model.

``python -m pretrain.export_hf --checkpoint RUN_DIR|step_dir|model.pt --out DIR [--dtype bf16]
[--arch auto|llama|qwen2|gpt2|twicing]``

The architecture follows the model config (``--arch auto``, the default). A model whose every
layer is softmax attention exports to stock code:

* **Llama** (``LlamaForCausalLM``): RoPE (non-interleaved, rotate-half — megatron-core's default
  and HF's), RMSNorm, SwiGLU, with or without linear biases (``attention_bias``/``mlp_bias``),
  GQA as ``num_key_value_heads``, RoPE scaling (``linear``, ``llama3``) as ``rope_parameters``;
* **Qwen2** (``Qwen2ForCausalLM``): the same with biases on Q, K, V only (``model.qkv_bias``);
* **GPT-2** (``GPT2LMHeadModel``): learned absolute positions, LayerNorm, GELU (exact erf,
  ``activation_function="gelu"``; ``gelu_tanh`` as ``gelu_new``) or ReLU; a model without linear
  biases gets zero biases and a GQA model has its key/value heads repeated (both exact).

The adapters (``pretrain/export/{llama,qwen2,gpt2,remote}.py``) hold both directions:
``pretrain.import_hf`` reads the same name mapping back.

Any other model — twicing (all or some layers), NeuTRENO, ResFormer, SVFormer, Neural Attention,
GQA included, or a softmax model no stock architecture matches — exports as **custom modeling
code** (``--arch twicing``): ``configuration_twicing.py`` and ``modeling_twicing.py`` are copied
into ``DIR`` and ``config.json``'s ``auto_map`` names them, so
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads it offline without
twicing-lm installed. The per-layer variants (``layer_variants``) and their options
(``attention_options``: λ, d′) are in the config; ``generate()`` decodes with transformers' cache
(twicing layers also cache their first-pass output O1, first-value variants read layer 0's V
cache); the padded vocabulary rows are ``suppress_tokens`` in ``generation_config.json``.
``--arch llama|qwen2|gpt2`` refuses a model that stock architecture cannot compute.

Weights are the TP=1 merge of the checkpoint; the vocabulary keeps megatron's padded size
(``model.padded_vocab_size``) so logits and the softmax normaliser are those of the trained
model; embeddings stay tied when they were.

``DIR`` then holds ``config.json``, ``generation_config.json``, ``model.safetensors``, the run's
sentencepiece model ``tokenizer.model`` (token ids are exactly ``sp.encode(text)``), and —
when the sentencepiece model is a BPE with identity normalisation (what ``data_prep`` trains) —
``tokenizer.json`` + ``tokenizer_config.json`` reproducing those ids, verified at export time, so
``AutoTokenizer.from_pretrained(DIR)`` works; ``twicing_export.json`` records the source
checkpoint. Load offline with ``AutoModelForCausalLM.from_pretrained(DIR)`` (plus
``trust_remote_code=True`` for custom code).

Exit codes: 0 done, 2 not exportable / bad arguments, 4 missing or damaged checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.base.output_guard import guard_outputs, output_option
from data_prep.base.run_command import run_cli

DTYPE_NAMES = ("bf16", "fp32")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.export_hf",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", required=True, help="run dir, checkpoint root, step_* dir or model.pt"
    )
    p.add_argument("--tag", help="checkpoint tag (default: the latest complete one)")
    output_option(p, "--out", kind="dir", required=True, type=Path,
                  help="output directory (an earlier export there is replaced)")  # fmt: skip
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    p.add_argument(
        "--arch",
        default="auto",
        help="auto (stock Llama/Qwen2/GPT-2 when it fits, else custom code), llama, qwen2, gpt2 "
        "or twicing",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def body() -> int:
        from data_prep.base.errors import ConfigError
        from pretrain.export.output import check_export_dir

        guard_outputs(parser, args, ConfigError)
        check_export_dir(args.out)  # before anything loads or is written
        from pretrain.checkpoint.reader import open_checkpoint
        from pretrain.export.hf_export import export

        try:
            ck = open_checkpoint(args.checkpoint, args.tag)
            meta = export(ck, args.out, args.dtype, arch=args.arch)
        except ImportError as e:
            raise ConfigError(f"{e}; install the hf extra: pip install -e '.[hf]'") from None
        print(
            f"exported {meta['source']} (step {meta['step']}) as {meta['architecture']} "
            f"({meta['dtype']}{', custom code: trust_remote_code=True' * meta['trust_remote_code']}"
            f") to {args.out}; {meta['tokenizer']['note']}"
        )
        return 0

    return run_cli("export_hf", body)


if __name__ == "__main__":
    sys.exit(main())
