"""CPU-scale reproduction study: softmax vs Twicing vs NeuTRENO vs ResFormer on WikiText.

Trains the same small GPT (``configs/study_wt2.yaml``) on WikiText-2 for each variant and seed
(equal steps and tokens), evaluates every final checkpoint on WikiText-103 valid with
``python -m pretrain.evaluate`` (token- and word-level perplexity, over-smoothing, attention
entropy), and writes:

- ``results/wikitext_cpu_study.md``: mean ± std table, time per step, the exact command;
- ``results/wikitext_cpu_study.png``: mean over-smoothing curve per variant;
- ``results/wikitext_cpu_study.json``: every run's numbers.

Finished runs are reused, so an interrupted study continues where it stopped. Each run's
evaluation goes to ``RUN/eval/<data>.json`` (a run's ``eval/`` is where ``pretrain.evaluate`` may
write inside it).

    python benchmarks/reproduce_wikitext.py [--seeds 1 2 3] [--steps 400] [--work runs/study]

``--set key=value`` changes the training config of every run and ``--max-documents N`` limits
the evaluation text (both for quick checks, e.g. the test that runs the study at a tiny size).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "softmax": ["model.attention=softmax"],
    "twicing (all)": ["model.attention=twicing", "model.attention_layers=all"],
    "twicing (last 2)": ["model.attention=twicing", "model.attention_layers=last:2"],
    "NeuTRENO (λ=0.4)": ["model.attention=neutreno"],
    "ResFormer (0.5/0.5)": ["model.attention=resformer"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {shlex.join(cmd)}; see {log}")


def one(variant: str, seed: int, args, manifest: Path) -> dict:
    run_dir = args.work / slug(variant) / f"seed{seed}"
    out = run_dir / "eval" / f"{slug(args.eval_data)}.json"
    report = json.loads(out.read_text()) if out.exists() else None
    if report is None:
        overrides = [
            *VARIANTS[variant],
            f"run_dir={run_dir}",
            f"data.manifest={manifest}",
            f"training.seed={seed}",
            f"data.seed={seed}",
            f"training.train_steps={args.steps}",
            f"checkpoint.interval={args.steps}",
            *args.set,
        ]
        run(
            ["-m", "pretrain.train", "--config", str(args.config), *overrides],
            run_dir / "train.log",
        )
    if report is None or report.get("attention_entropy") is None:
        evaluate = [
            "-m",
            "pretrain.evaluate",
            "--checkpoint",
            str(run_dir),
            "--data",
            args.eval_data,
            "--out",
            str(out),
            "--batch-size",
            "16",
            "--no-progress",
            "--attention-entropy",
        ]
        if args.wikitext:
            evaluate += ["--wikitext", args.wikitext]
        if args.max_documents:
            evaluate += ["--max-documents", str(args.max_documents)]
        run(evaluate, run_dir / "eval.log")
        report = json.loads(out.read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [s["seconds"] for s in steps if "seconds" in s and s["step"] > min(5, args.steps - 1)]
    return {
        "variant": variant,
        "seed": seed,
        "token_ppl": report["token_ppl"],
        "word_ppl": report["word_ppl"],
        "tokens": report["tokens"],
        "words": report["words"],
        "seconds_per_step": statistics.median(seconds),
        "train_seconds": sum(s["seconds"] for s in steps if "seconds" in s),
        "eval_seconds": report["elapsed_s"],
        "final_train_loss": steps[-1]["loss"],
        "oversmoothing": report["oversmoothing"]["layers"],
        "attention_entropy": report["attention_entropy"]["entropy"],
        "attention_entropy_normalized": report["attention_entropy"]["normalized"],
    }


def mean_std(values: list[float]) -> str:
    return (
        f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
        if len(values) > 1
        else f"{values[0]:.2f}"
    )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=Path, default=ROOT / "configs/study_wt2.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--work", type=Path, default=ROOT / "runs/study")
    p.add_argument("--eval-data", default="wikitext-103:valid")
    p.add_argument("--wikitext", help="local WikiText copy (default: hub, then ../shared)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--results", type=Path, default=ROOT / "results")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a training config override for every run (repeatable)",
    )
    p.add_argument("--max-documents", type=int, help="evaluate on the first N documents only")
    args = p.parse_args()
    t0 = time.monotonic()

    from data_prep.prepare_wikitext import prepare_wikitext
    from pretrain.train_config import load_config

    cfg = load_config(args.config, args.set)
    manifest = prepare_wikitext(
        args.work / "data",
        name="wikitext-2",
        source=args.wikitext,
        vocab_size=cfg.model.vocab_size,
        progress=False,
    )
    rows = []
    for variant in args.variants:
        for seed in args.seeds:
            r = one(variant, seed, args, manifest)
            rows.append(r)
            print(
                f"{variant:<22} seed {seed}: token ppl {r['token_ppl']:.2f}, word ppl "
                f"{r['word_ppl']:.2f}, {r['seconds_per_step'] * 1e3:.0f} ms/step",
                flush=True,
            )

    from pretrain.evaluation.plot import plot_curves

    args.results.mkdir(parents=True, exist_ok=True)
    by_variant = {v: [r for r in rows if r["variant"] == v] for v in args.variants}
    curves = {
        v: [statistics.mean(c) for c in zip(*(r["oversmoothing"] for r in rs), strict=True)]
        for v, rs in by_variant.items()
    }
    variants = list(by_variant)
    entropy = {
        v: tuple(
            [statistics.mean(c) for c in zip(*(r[key] for r in rs), strict=True)]
            for key in ("attention_entropy", "attention_entropy_normalized")
        )
        for v, rs in by_variant.items()
    }
    png = plot_curves(
        curves,
        args.results / "wikitext_cpu_study.png",
        title="over-smoothing on WikiText-103 valid (mean over seeds)",
    )
    train_min = sum(r["train_seconds"] for r in rows) / 60
    eval_min = sum(r["eval_seconds"] for r in rows) / 60
    m, gbs = cfg.model, cfg.training.global_batch_size
    command = shlex.join(["python", "benchmarks/reproduce_wikitext.py", *sys.argv[1:]])
    lines = [
        "# CPU-scale attention study on WikiText",
        "",
        f"Model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, "
        f"SwiGLU FFN {m.ffn_hidden_size}, RoPE, RMSNorm, BPE {m.vocab_size}, seq {m.seq_length}, "
        f"dropout {m.hidden_dropout}. Trained on WikiText-2 train for {args.steps} steps × "
        f"{gbs} sequences ({args.steps * gbs * m.seq_length:,} tokens) per run, seeds "
        f"{args.seeds}; evaluated on `{args.eval_data}` ({rows[0]['tokens']:,} tokens, "
        f"{rows[0]['words']:,} words, non-overlapping {m.seq_length}-token segments). Time per "
        "step: median wall time of one training step (1 process, 2 CPU threads).",
        "",
        "| variant | token ppl | word ppl | ms / step | final train loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for v, rs in by_variant.items():
        lines.append(
            f"| {v} | {mean_std([r['token_ppl'] for r in rs])} | "
            f"{mean_std([r['word_ppl'] for r in rs])} | "
            f"{mean_std([r['seconds_per_step'] * 1e3 for r in rs])} | "
            f"{mean_std([r['final_train_loss'] for r in rs])} |"
        )
    lines += [
        "",
        "Over-smoothing (mean pairwise cosine similarity of token states per layer, layer 0 = "
        f"embeddings; mean over seeds): see `{png.name}`.",
        "",
        "| variant | "
        + " | ".join(f"layer {i}" for i in range(len(next(iter(curves.values())))))
        + " |",
        "|---|" + "---:|" * len(next(iter(curves.values()))),
        *(f"| {v} | " + " | ".join(f"{x:.3f}" for x in c) + " |" for v, c in curves.items()),
        "",
        "Attention entropy (mean entropy in nats of each query's causal attention distribution "
        "`A` per transformer layer, over heads, positions and segments; for twicing the `A` of "
        "`2A − A²`; normalised by `log(i+1)` in brackets; mean over seeds):",
        "",
        "| variant | "
        + " | ".join(f"layer {i + 1}" for i in range(len(entropy[variants[0]][0])))
        + " |",
        "|---|" + "---:|" * len(entropy[variants[0]][0]),
        *(
            f"| {v} | "
            + " | ".join(f"{h:.3f} ({n:.3f})" for h, n in zip(*entropy[v], strict=True))
            + " |"
            for v in variants
        ),
        "",
        f"Command: `{command}`. Compute: {train_min:.0f} min of training steps and "
        f"{eval_min:.0f} min of evaluation over all runs; this invocation took "
        f"{(time.monotonic() - t0) / 60:.0f} min (finished runs are reused).",
    ]
    (args.results / "wikitext_cpu_study.md").write_text("\n".join(lines) + "\n")
    (args.results / "wikitext_cpu_study.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
