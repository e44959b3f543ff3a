"""Tokens/s of ``python -m data_prep tokenize`` (read + encode + write) on the 9-corpus mix.

The mix: from each of the nine ``shared/data/corpora/*.jsonl.xz``, its leading documents up to
the same fraction of its text, ``--mix-mb`` MB of UTF-8 text in all (default 50), written as nine
plain JSONL files (untimed). A 32k BPE is trained on the mix (untimed, cached); by default with
SentencePiece's own default normalisation (``nmt_nfkc``), i.e. the tokenizer of the reference run
(≈4.4 bytes/token). Each timed run is a fresh ``python -m data_prep tokenize --workers 2``
process, start-up included, writing nine ``{name}_text_document`` datasets.

Reference (same machine type, NOTES.md): Megatron-LM ``tools/preprocess_data.py``, 2 workers, a
50 MB mix of these corpora, 11.3M tokens: 24.8 s wall (0.456M tok/s overall). After timing, the
outputs are compared byte for byte with an independent writer of ``sp.encode(doc) + [eos]``
in the MMIDIDX layout (what ``preprocess_data.py --append-eod`` writes).

    python benchmarks/data_prep_throughput.py [--repeats 3] [--mix-mb 50] [--compare-plain]
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data_prep.sources import Corpus  # noqa: E402
from data_prep.train_tokenizer import TokenizerOptions, train_tokenizer  # noqa: E402

REFERENCE_S, REFERENCE_TOKENS = 24.8, 11.3e6


def shared_corpora() -> Path:
    base = os.environ.get("TWICING_SHARED", ROOT.parent / "shared")
    path = Path(base) / "data" / "corpora"
    if not path.is_dir():
        sys.exit(f"{path} not found (set TWICING_SHARED)")
    return path


def build_mix(work: Path, mix_bytes: int) -> dict[str, Path]:
    """Nine JSONL files: the leading documents of each corpus, the same fraction of each."""
    sources = sorted(shared_corpora().glob("*.jsonl.xz"))
    docs = {}
    for src in sources:
        with lzma.open(src, "rt", encoding="utf-8") as f:
            docs[src.name.split(".")[0]] = [json.loads(line)["text"] for line in f]
    sizes = {n: sum(len(d.encode()) for d in ds) for n, ds in docs.items()}
    fraction = min(1.0, mix_bytes / sum(sizes.values()))
    files = {}
    for name, ds in docs.items():
        path = work / "mix" / f"{name}.jsonl"
        files[name] = path
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        taken, size = [], 0
        for d in ds:
            if size >= fraction * sizes[name]:
                break
            taken.append(d)
            size += len(d.encode())
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in taken)
        tmp.replace(path)
    return files


def tokenize_run(files: dict[str, Path], model: Path, out: Path, workers: int, fast: bool):
    """(wall seconds, CPU seconds of the process tree) of one ``tokenize`` process."""
    cmd = [
        sys.executable,
        "-m",
        "data_prep",
        "tokenize",
        "--tokenizer",
        str(model),
        "--out-dir",
        str(out),
        "--workers",
        str(workers),
        "--no-progress",
    ]
    for name, path in files.items():
        cmd += ["--corpus", f"{name}={path}"]
    if not fast:
        cmd.append("--no-fast")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def reference_files(docs: list[str], sp: spm.SentencePieceProcessor) -> tuple[bytes, bytes]:
    """``.bin``/``.idx`` of ``sp.encode(doc) + [eos]`` per document, packed from the spec."""
    dtype, code = (np.uint16, 8) if sp.get_piece_size() < 65500 else (np.int32, 4)
    encoded = sp.encode(docs, num_threads=2)
    seqs = [ids + [sp.eos_id()] for ids in encoded if ids]
    lens = np.array([len(s) for s in seqs], dtype=np.int32)
    doc_idx = np.concatenate(([0], np.cumsum([bool(ids) for ids in encoded]))).astype(np.int64)
    ptrs = np.concatenate(([0], np.cumsum(lens[:-1], dtype=np.int64))) * np.dtype(dtype).itemsize
    head = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(lens), len(doc_idx))
    idx = head + lens.tobytes() + ptrs[: len(lens)].astype(np.int64).tobytes() + doc_idx.tobytes()
    return np.array([t for s in seqs for t in s], dtype=dtype).tobytes(), idx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mix-mb", type=float, default=50.0, help="MB of text in the mix")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--normalization", default="nmt_nfkc", help="nmt_nfkc (reference) or identity")
    ap.add_argument(
        "--compare-plain",
        action="store_true",
        help="also time --no-fast (whole documents through sp.encode)",
    )
    ap.add_argument("--work-dir", default=Path(tempfile.gettempdir()) / "data_prep_bench")
    args = ap.parse_args()

    work = Path(args.work_dir)
    files = build_mix(work, int(args.mix_mb * 1e6))
    corpora = [Corpus(n, paths=[str(p)]) for n, p in files.items()]
    options = TokenizerOptions(
        vocab_size=args.vocab_size,
        normalization=args.normalization,
        byte_fallback=args.normalization == "identity",
    )
    tag = f"bpe{args.vocab_size}_{args.normalization}_{args.mix_mb:g}mb"
    model = train_tokenizer(corpora, work / "tokenizer" / tag, options)
    mix_mb = sum(p.stat().st_size for p in files.values()) / 1e6

    modes = [("segment-cache", True)] + ([("plain sp.encode", False)] if args.compare_plain else [])
    runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode, _ in modes}
    for _ in range(args.repeats):  # round-robin, so machine noise hits every mode alike
        for mode, fast in modes:
            out = work / f"out-{fast}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            runs[mode].append(tokenize_run(files, model, out, args.workers, fast))
    results = {}
    for mode, fast in modes:
        out = work / f"out-{fast}"
        stats = [json.loads((out / f"{n}_text_document.stats.json").read_text()) for n in files]
        results[mode] = (runs[mode], stats, out)

    sp = spm.SentencePieceProcessor(model_file=str(model))
    identical = True
    for name, path in files.items():
        with open(path, encoding="utf-8") as f:
            docs = [json.loads(line)["text"] for line in f]
        ref_bin, ref_idx = reference_files(docs, sp)
        for _, _, out in results.values():
            prefix = out / f"{name}_text_document"
            same = (
                Path(f"{prefix}.bin").read_bytes() == ref_bin
                and Path(f"{prefix}.idx").read_bytes() == ref_idx
            )
            identical &= same

    print(f"input: 9 JSONL files, {mix_mb:.1f} MB ({work / 'mix'}); tokenizer {model.name}")
    for mode, (runs, stats, _) in results.items():
        tokens = sum(s["tokens"] for s in stats)
        text_bytes = sum(s["text_bytes"] for s in stats)
        walls = sorted(w for w, _ in runs)
        best, median = walls[0], statistics.median(walls)
        cpu = min(c for _, c in runs)
        ref_rate = REFERENCE_TOKENS / REFERENCE_S
        print(
            f"{mode:>16}: {tokens / 1e6:.2f}M tokens ({text_bytes / tokens:.2f} bytes/token), "
            f"wall best {best:.2f} s / median {median:.2f} s over {len(runs)} runs, "
            f"CPU {cpu:.1f} s; {tokens / best / 1e6:.2f}M tok/s best, "
            f"{tokens / median / 1e6:.2f}M tok/s median; vs preprocess_data.py "
            f"({ref_rate / 1e6:.3f}M tok/s): {tokens / best / ref_rate:.2f}x best, "
            f"{tokens / median / ref_rate:.2f}x median"
        )
        print(f"{'':>16}  runs (wall s): {', '.join(f'{w:.2f}' for w, _ in runs)}")
    print(f"byte-identical to sp.encode(doc) + [eos] in MMIDIDX: {identical}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
