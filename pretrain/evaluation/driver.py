"""The evaluation driver behind ``python -m pretrain.evaluate`` (see that module for usage).

One path for a twicing-lm checkpoint and for a Hugging Face export: the text, the windows, the
swap runs and the report are the same; only the scorer differs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pretrain.errors import CheckpointError, ConfigError


def _init_parallel() -> tuple[int, int]:
    """One process: a private 1-rank group. Under a launcher: TP = world size."""
    from pretrain.parallel.distributed import init
    from pretrain.parallel.launch_env import launch_env

    env = launch_env()
    if env.world_size == 1 and "MASTER_PORT" not in os.environ:
        from pretrain.local_launch import free_port

        os.environ["MASTER_PORT"] = str(free_port())
        env = launch_env()
    init(env, env.world_size, timeout_minutes=30)
    return env.rank, env.world_size


def build_model(ck, rank: int, tp: int):
    """The checkpoint's GPT at TP=``tp`` with this rank's weights, in eval mode."""
    from model import build_gpt
    from pretrain.checkpoint.reader import state_dict_for_rank

    torch.manual_seed(0)
    model = build_gpt(ck.model)
    missing, unexpected = model.load_state_dict(state_dict_for_rank(ck, rank, tp), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(
            f"{ck.tag_dir}: weights do not fit the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    return model.eval()


def token_nll(model):
    def fn(tokens, positions, labels):
        return model(tokens, positions, None, labels=labels)

    return fn


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
        "bits_per_byte": totals.nll / math.log(2) / text.bytes,
        "nll_sum": totals.nll,
        "tokens": totals.targets,
        "words": text.words,
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
    stride = length if args.protocol == "segments" else (args.stride or max(1, length // 2))
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
            "bytes": text.bytes,
            "lines": text.lines,
        },
        "protocol": {"name": args.protocol, "length": length, "stride": stride},
        **{k: clean[k] for k in ("token_ppl", "word_ppl", "bits_per_byte", "tokens", "words")},
        "results": results,
        "swap_seed": args.swap_seed,
        "elapsed_s": time.monotonic() - t0,
        "_swap_logs": swap_logs,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.hf_model is not None:
        return run_hf(args)
    from pretrain.checkpoint.reader import open_checkpoint
    from pretrain.evaluation.attention_entropy import AttentionEntropyProbe
    from pretrain.evaluation.oversmoothing import HiddenStateProbe

    t0 = time.monotonic()
    ck = open_checkpoint(args.checkpoint, args.tag, args.tokenizer)
    text = _load_text(args)
    length = args.length or ck.model.seq_length
    if length > ck.model.seq_length and ck.model.position_embedding == "learned_absolute":
        raise ConfigError(
            f"--length {length} exceeds the learned positions ({ck.model.seq_length})"
        )
    stride = _stride(args, length)

    rank, tp = _init_parallel()
    model = build_model(ck, rank, tp)
    probe = HiddenStateProbe(model, args.skip_positions) if args.oversmoothing else None
    entropy = AttentionEntropyProbe(model, args.skip_positions) if args.attention_entropy else None

    def evaluate(t, p):
        return evaluate_text(
            model,
            ck.tokenizer,
            t,
            length=length,
            stride=stride,
            batch_size=args.batch_size,
            probe=p,
            progress=args.progress and rank == 0,
        )

    results, swap_logs = _clean_and_swapped(text, args, evaluate=evaluate, probe=probe)
    for hooks in (probe, entropy):
        if hooks is not None:
            hooks.remove()
    return _report(
        args,
        text,
        length=length,
        stride=stride,
        results=results,
        swap_logs=swap_logs,
        t0=t0,
        checkpoint=str(ck.tag_dir),
        step=ck.step,
        model={
            "attention": ck.model.attention,
            "attention_layers": ck.model.attention_layers,
            "num_layers": ck.model.num_layers,
            "hidden_size": ck.model.hidden_size,
        },
        tokenizer_sha256=ck.tokenizer.sha256,
        tensor_parallel=tp,
        oversmoothing=(
            {"skip_positions": args.skip_positions, "layers": probe.result()} if probe else None
        ),
        attention_entropy=(
            {"skip_positions": args.skip_positions, **entropy.result()} if entropy else None
        ),
        _rank=rank,
    )


def run_hf(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation of a Hugging Face export: same text, token ids, windows and metrics."""
    from pretrain.evaluation.hf import HFExport, hf_token_nll

    t0 = time.monotonic()
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        raise ConfigError("--hf-model evaluates on one process (no tensor parallelism)")
    if args.attention_entropy:
        raise ConfigError("--attention-entropy needs a twicing-lm checkpoint, not --hf-model")
    hf = HFExport(args.hf_model, args.tokenizer)
    text = _load_text(args)
    length = args.length or hf.seq_length
    if not length:
        raise ConfigError("--length is needed: the export records no training sequence length")
    if hf.learned_positions and length > hf.config.n_positions:
        raise ConfigError(
            f"--length {length} exceeds the learned positions ({hf.config.n_positions})"
        )
    stride = _stride(args, length)
    model = hf.load()

    def evaluate(t, _probe):
        return evaluate_text(
            model,
            hf.tokenizer,
            t,
            length=length,
            stride=stride,
            batch_size=args.batch_size,
            progress=args.progress,
            token_nll_fn=hf_token_nll(model),
        )

    results, swap_logs = _clean_and_swapped(text, args, evaluate=evaluate)
    model_meta = hf.meta.get("model", {})
    return _report(
        args,
        text,
        length=length,
        stride=stride,
        results=results,
        swap_logs=swap_logs,
        t0=t0,
        checkpoint=str(hf.tag_dir),
        hf_model=hf.meta.get("architecture") or type(model).__name__,
        step=hf.step,
        model={
            "attention": model_meta.get("attention", "softmax"),
            "attention_layers": model_meta.get("attention_layers"),
            "num_layers": hf.config.num_hidden_layers,
            "hidden_size": hf.config.hidden_size,
        },
        tokenizer_sha256=hf.tokenizer.sha256,
        tensor_parallel=1,
        oversmoothing=None,
        attention_entropy=None,
        _rank=0,
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
    from pretrain import atomic
    from pretrain.evaluation.plot import plot_curves

    out = args.out or default_out(report, args)
    swap_logs = report.pop("_swap_logs")
    report.pop("_rank")
    for rate, swaps in swap_logs.items():
        log = out.with_name(f"{out.stem}.swaps-p{rate}.jsonl")
        atomic.write_text(log, "".join(json.dumps(s) + "\n" for s in swaps))
    if report["oversmoothing"]:
        png = args.png or out.with_suffix(".png")
        label = f"{report['model']['attention']} step {report['step']}"
        report["oversmoothing"]["png"] = str(
            plot_curves({label: report["oversmoothing"]["layers"]}, png)
        )
    atomic.write_text(out, json.dumps(report, indent=1))
    tb = args.tensorboard or _output_base(report) / "tensorboard" / "eval"
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tb)) as w:
        for r in report["results"]:
            suffix = "" if r["swap_rate"] == 0 else f"_swap{r['swap_rate']}"
            for key in ("token_ppl", "word_ppl", "bits_per_byte"):
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
        f"{'swap p':>7} {'tokens':>10} {'token ppl':>10} {'word ppl':>10} {'bits/byte':>10}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['swap_rate']:>7.3f} {r['tokens']:>10,} {r['token_ppl']:>10.3f} "
            f"{r['word_ppl']:>10.3f} {r['bits_per_byte']:>10.4f}"
        )
    if report["oversmoothing"]:
        curve = " ".join(f"{v:.3f}" for v in report["oversmoothing"]["layers"])
        lines.append(f"over-smoothing (layer 0..L): {curve}")
    if report.get("attention_entropy"):
        curve = " ".join(f"{v:.3f}" for v in report["attention_entropy"]["entropy"])
        lines.append(f"attention entropy, nats (layer 1..L): {curve}")
    lines.append(f"results: {out}")
    return "\n".join(lines)
