"""Import a Hugging Face model as a twicing-lm checkpoint at step 0, to start runs from.

``python -m pretrain.import_hf --hf-model DIR --out RUN_DIR [dotted.key=value ...]``

``DIR`` is a local ``transformers`` model directory: ``config.json``, the weights
(``model.safetensors``, sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``,
loaded ``weights_only``) and the tokenizer (``tokenizer.json``, else a sentencepiece
``tokenizer.model``). Architectures, mapped exactly or refused naming the ``config.json`` key:

* ``llama`` (``LlamaForCausalLM``; GQA, RoPE incl. ``linear`` and ``llama3`` scaling, RMSNorm,
  SwiGLU, tied or untied, biases on every linear layer or none) and ``mistral`` (a
  ``sliding_window`` shorter than ``seq_length`` is refused: import with a shorter
  ``model.seq_length``);
* ``qwen2`` (``Qwen2ForCausalLM``: Llama with Q/K/V biases);
* ``gpt2`` (``GPT2LMHeadModel``; ``gelu_new`` is our ``gelu_tanh``);
* ``twicing_lm`` (our own custom-code export).

``RUN_DIR/checkpoints/step_00000000`` then holds the weights in DeepSpeed's per-rank model-states
layout (TP=1/PP=1, or the ``parallel.tensor`` / ``parallel.pipeline`` given), the tokenizer and a
``trainer_state.json`` (``origin: import``) whose model config is the Hugging Face model's; every
checkpoint reader (``evaluate``, ``generate``, ``export_hf``, ``consolidate``) opens it. Train
from it with ``python -m pretrain.train --config X run_dir=NEW checkpoint.init_from=RUN_DIR``
(a new run: fresh optimizer, LR schedule and data order, at any layout); ``RUN_DIR/train.yaml``
is such a preset with the imported model (add ``run_dir`` and ``data.manifest``).

Overrides (``dotted.key=value``): ``model.attention``, ``model.attention_layers``,
``model.attention_options`` retrofit an attention variant (twicing, NeuTRENO, ResFormer and
SVFormer add no parameters; Neural Attention's scorer weights are drawn from ``training.seed``,
and the command says which); ``model.seq_length``, dropout, ``model.recompute``, the layout
``parallel.tensor`` / ``parallel.pipeline``. Any other model key comes from ``config.json``.

The weights stream tensor by tensor (safetensors memory-mapped), one rank's shard at a time.
Exit codes: 0 done, 2 bad arguments or an unsupported model (nothing written), 4 missing,
damaged or unsafe weights (nothing written).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from data_prep.base.output_guard import guard_outputs, output_option
from data_prep.base.run_command import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.import_hf",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hf-model", required=True, type=Path, help="a local transformers model dir")
    output_option(p, "--out", kind="dir", required=True, type=Path,
                  help="the run directory to create (an earlier import is replaced)")  # fmt: skip
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="dotted.key=value",
        help="model.* retrofit keys, parallel.tensor, parallel.pipeline, training.seed",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def body() -> int:
        from data_prep.base.errors import ConfigError
        from pretrain.export.import_dir import check_import_dir, is_earlier_import

        if not is_earlier_import(args.out):
            guard_outputs(parser, args, ConfigError)
        check_import_dir(args.out)  # before anything loads or is written
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("pretrain.import_hf runs as one process (not under a launcher)")
        from pretrain.export.hf_import import plan_import

        t0 = time.monotonic()
        try:
            plan = plan_import(args.hf_model, args.overrides)
            record = _write(plan, args.out)
        except ImportError as e:
            raise ConfigError(f"{e}; install the hf extra: pip install -e '.[hf]'") from None
        _report(plan, record, args.out, time.monotonic() - t0)
        return 0

    return run_cli("import_hf", body)


def _write(plan, out: Path) -> dict:
    """Write the import under a private one-rank gloo group (the model is built on the meta
    device for its names, shapes and TP layout; DeepSpeed is not needed)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from model import megatron_compat
    from pretrain.export.import_writer import write_import
    from pretrain.parallel.launch_env import free_port
    from pretrain.training.versions import library_versions

    megatron_compat.install()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        parallel_state.initialize_model_parallel()
        return write_import(plan, out, library_versions())
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _report(plan, record: dict, out: Path, seconds: float) -> None:
    new = record["new_parameters"]
    if new:
        print(
            f"[import] {len(new)} parameters not in {plan.source} are initialised from the run "
            f"seed (training.seed={plan.seed}): {', '.join(new)}"
        )
    layout = f"TP{plan.tensor}" + (f"×PP{plan.pipeline}" if plan.pipeline > 1 else "")
    print(
        f"imported {plan.source} ({plan.hf.get('model_type')}, {record['parameters']:,} "
        f"parameters, tokenizer {record['tokenizer']}) -> {out}/checkpoints/step_00000000 at "
        f"{layout} in {seconds:.1f}s; start a run from it: python -m pretrain.train --config "
        f"{out}/train.yaml run_dir=NEW data.manifest=MANIFEST (or any preset with "
        f"checkpoint.init_from={out})"
    )


if __name__ == "__main__":
    sys.exit(main())
