"""The evaluation driver behind ``python -m pretrain.evaluate`` (see that module for usage).

One path for a twicing-lm checkpoint and for a Hugging Face export: the text, the windows, the
swap runs and the report are the same; only the scorer differs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from data_prep.base.errors import ConfigError
from pretrain.evaluation.checks import check_args
from pretrain.evaluation.scorer import token_nll


def evaluate_text(
    model,
    tokenizer,
    text,
    *,
    length,
    stride,
    batch_size,
    probe=None,
    progress=False,
    token_nll_fn=None,
):
    from pretrain.evaluation.perplexity import score

    stream = text.token_stream(tokenizer)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(stream) - 1, unit="tok", desc=text.name[:40], file=sys.stderr)

    def on_batch(group, mask):
        if probe is not None:
            probe.collect()

    totals = score(
        stream,
        token_nll_fn or token_nll(model),
        length=length,
        stride=stride,
        batch_size=batch_size,
        on_batch=on_batch,
        progress=bar,
    )
    if bar is not None:
        bar.close()
    return {
        "token_ppl": totals.token_ppl,
        "word_ppl": math.exp(totals.nll / text.words),
        "word_ppl_eol": math.exp(totals.nll / (text.words + text.line_ends)),
        "bits_per_byte": totals.nll / math.log(2) / text.bytes,
        "nll_sum": totals.nll,
        "tokens": totals.targets,
        "words": text.words,
        "words_eol": text.words + text.line_ends,
        "bytes": text.bytes,
        "documents": len(text.documents),
    }


def _load_text(args: argparse.Namespace):
    from pretrain.evaluation.texts import load_text

    return load_text(
        args.data,
        wikitext_source=args.wikitext,
        text_field=args.text_field,
        text_unit=args.text_unit,
        max_documents=args.max_documents,
    )


def _stride(args: argparse.Namespace, length: int) -> int:
    """The window stride of the chosen protocol (validated against ``length``)."""
    default = max(1, length // 2) if args.stride is None else args.stride
    stride = length if args.protocol == "segments" else default
    if not 1 <= stride <= length:
        raise ConfigError(f"--stride {stride} must be between 1 and the window length {length}")
    return stride


def _clean_and_swapped(text, args, *, evaluate, probe=None) -> tuple[list[dict], dict]:
    """Results on the clean text (with ``probe``) and at each ``--swap-rates`` p; swap logs."""
    from pretrain.evaluation.texts import swap_words

    results = [{"swap_rate": 0.0, **evaluate(text, probe)}]
    swap_logs = {}
    for rate in args.swap_rates:
        corrupted = swap_words(text, rate, args.swap_seed)
        r = evaluate(corrupted, None)
        results.append({"swap_rate": rate, "swapped_words": len(corrupted.swaps), **r})
        swap_logs[rate] = corrupted.swaps
    return results, swap_logs


def _report(args, text, *, length, stride, results, swap_logs, t0, **source) -> dict[str, Any]:
    """The JSON report: ``source`` (checkpoint, step, model, tokenizer, TP, probes) + metrics."""
    clean = results[0]
    return {
        **source,
        "data": {
            "spec": args.data,
            "documents": len(text.documents),
            "words": text.words,
            "words_eol": text.words + text.line_ends,
            "bytes": text.bytes,
            "lines": text.lines,
        },
        "protocol": {"name": args.protocol, "length": length, "stride": stride},
        **{
            k: clean[k]
            for k in ("token_ppl", "word_ppl", "word_ppl_eol", "bits_per_byte", "tokens", "words")
        },
        "results": results,
        "swap_seed": args.swap_seed,
        "elapsed_s": time.monotonic() - t0,
        "_swap_logs": swap_logs,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Score the text of ``args`` with the checkpoint or export it names; the report."""
    from pretrain.evaluation.hf_scorer import HFScorer
    from pretrain.evaluation.scorer import CheckpointScorer

    t0 = time.monotonic()
    check_args(args)
    scorer = HFScorer(args) if args.hf_model is not None else CheckpointScorer(args)
    text = _load_text(args)
    length = args.length or scorer.seq_length
    if not length:
        raise ConfigError("--length is needed: the export records no training sequence length")
    if scorer.max_positions and length > scorer.max_positions:
        raise ConfigError(
            f"--length {length} exceeds the learned positions ({scorer.max_positions})"
        )
    stride = _stride(args, length)
    scorer.load()
    probe, entropy = scorer.probes(args)
    nll = scorer.token_nll()

    def evaluate(t, p):
        return evaluate_text(
            None,
            scorer.tokenizer,
            t,
            length=length,
            stride=stride,
            batch_size=args.batch_size,
            probe=p,
            progress=args.progress and scorer.rank == 0,
            token_nll_fn=nll,
        )

    results, swap_logs = _clean_and_swapped(text, args, evaluate=evaluate, probe=probe)
    for hooks in (probe, entropy):
        if hooks is not None:
            hooks.remove()
    skip = args.skip_positions
    return _report(
        args,
        text,
        length=length,
        stride=stride,
        results=results,
        swap_logs=swap_logs,
        t0=t0,
        **scorer.describe(),
        oversmoothing={"skip_positions": skip, "layers": probe.result()} if probe else None,
        attention_entropy={"skip_positions": skip, **entropy.result()} if entropy else None,
        _rank=scorer.rank,
    )


def _output_base(report: dict) -> Path:
    """Where results go by default: the run dir of a step dir, else beside the file/export."""
    source = Path(report["checkpoint"])
    if source.is_file():
        return source.parent
    if report.get("hf_model"):
        return source
    return source.parent.parent


def default_out(report: dict, args) -> Path:
    tag_dir = Path(report["checkpoint"])
    run_dir = _output_base(report)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in args.data)[:60]
    return run_dir / "eval" / f"{tag_dir.name}-{safe}-{args.protocol}.json"


def write_outputs(report: dict, args) -> Path:
    from data_prep.base import atomic_write
    from pretrain.evaluation.plot import plot_curves

    out = args.out or default_out(report, args)
    swap_logs = report.pop("_swap_logs")
    report.pop("_rank")
    for rate, swaps in swap_logs.items():
        log = out.with_name(f"{out.stem}.swaps-p{rate}.jsonl")
        atomic_write.write_text(log, "".join(json.dumps(s) + "\n" for s in swaps))
    if report["oversmoothing"]:
        png = args.png or out.with_suffix(".png")
        label = f"{report['model']['attention']} step {report['step']}"
        report["oversmoothing"]["png"] = str(
            plot_curves({label: report["oversmoothing"]["layers"]}, png)
        )
    atomic_write.write_text(out, json.dumps(report, indent=1))
    tb = args.tensorboard or _output_base(report) / "tensorboard" / "eval"
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tb)) as w:
        for r in report["results"]:
            suffix = "" if r["swap_rate"] == 0 else f"_swap{r['swap_rate']}"
            for key in ("token_ppl", "word_ppl", "word_ppl_eol", "bits_per_byte"):
                w.add_scalar(f"eval/{key}{suffix}", r[key], report["step"] or 0)
        if report["oversmoothing"]:
            for i, v in enumerate(report["oversmoothing"]["layers"]):
                w.add_scalar(f"eval/oversmoothing/layer_{i:02d}", v, report["step"])
        if report.get("attention_entropy"):
            for i, v in enumerate(report["attention_entropy"]["entropy"], start=1):
                w.add_scalar(f"eval/attention_entropy/layer_{i:02d}", v, report["step"])
    return out


def summary(report: dict, out: Path) -> str:
    p = report["protocol"]
    lines = [
        f"checkpoint {report['checkpoint']} (step {report['step']}, "
        f"{report['model']['attention']})",
        f"data {report['data']['spec']}: {report['data']['documents']} docs, "
        f"{report['data']['words']:,} words; protocol {p['name']} length {p['length']} "
        f"stride {p['stride']}; TP {report['tensor_parallel']}",
        f"{'swap p':>7} {'tokens':>10} {'token ppl':>10} {'word ppl':>10} "
        f"{'word+eol ppl':>12} {'bits/byte':>10}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['swap_rate']:>7.3f} {r['tokens']:>10,} {r['token_ppl']:>10.3f} "
            f"{r['word_ppl']:>10.3f} {r['word_ppl_eol']:>12.3f} {r['bits_per_byte']:>10.4f}"
        )
    lines.append(
        "word ppl: whitespace words (Megatron's adjusted ppl); word+eol ppl: words + one "
        "end-of-line per line (Transformer-XL / lmtool WikiText-103 numbers)"
    )
    if report["oversmoothing"]:
        curve = " ".join(f"{v:.3f}" for v in report["oversmoothing"]["layers"])
        lines.append(f"over-smoothing (layer 0..L): {curve}")
    if report.get("attention_entropy"):
        curve = " ".join(f"{v:.3f}" for v in report["attention_entropy"]["entropy"])
        lines.append(f"attention entropy, nats (layer 1..L): {curve}")
    lines.append(f"results: {out}")
    return "\n".join(lines)
