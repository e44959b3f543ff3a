"""``python -m data_prep tokenize`` side by side with Megatron-LM's ``tools/preprocess_data.py``.

Both tokenize the same JSONL file with the same SentencePiece model and 2 workers (``--workers``),
each as a fresh process (start-up included), alternating Megatron, ours, Megatron, ours, ... for
``--rounds`` rounds, so machine noise hits both alike. Every round the outputs are compared byte for
byte (``.bin`` and ``.idx``, ours vs Megatron's ``--append-eod``), and a mismatch fails the run.
Printed: per round the wall and CPU seconds (the process tree's user + system time) of each and
the ratios Megatron / ours; their medians; the load average before and after.

Without ``--megatron-lm`` only ours is timed (tokens/s, MB/s, no ratio), and its output is checked
against an independent writer of ``sp.encode(doc) + [eos]`` per document in the MMIDIDX layout.

Input (``--input``, default: generated once under ``--work-dir``): the leading documents of each of
the nine ``shared/data/corpora/*.jsonl.xz`` (or of ``--corpora NAME,...``), the same fraction of
each, ``--mix-mb`` MB of text in all, their original JSON lines in one file, repeated ``--copies``
times; ``--hostile`` appends documents that stress tokenizers (empty, whitespace runs, control
characters, combining marks, emoji, a 20 kB line). Tokenizer (``--tokenizer``, default: trained
once on the mix): data_prep's default BPE 32k (identity normalisation, byte fallback); or
``--hf-tokenizer gpt2|llama3``: a Hugging Face byte-level BPE of that style (``data_prep
train-tokenizer --kind hf-bpe``, 32k), which Megatron reads with ``--tokenizer-type
HuggingFaceTokenizer``; ``--tokenizer DIR`` takes any Hugging Face tokenizer directory.
Megatron's environment needs ``six``, ``regex`` and an importable
``triton`` besides torch and megatron-core; ``--megatron-python`` picks its interpreter.

    python benchmarks/data_prep_vs_megatron.py --megatron-lm /tmp/megatron-lm [--rounds 3]
        [--megatron-python /tmp/megvenv/bin/python] [--mix-mb 50] [--copies 10]
        [--tokenizer M.model | --hf-tokenizer gpt2|llama3] [--corpora kjv,...] [--hostile]
        [--input F.jsonl]
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import lzma
import os
import resource
import shutil
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


def shared_corpora() -> Path:
    base = os.environ.get("TWICING_SHARED", ROOT.parent / "shared")
    path = Path(base) / "data" / "corpora"
    if not path.is_dir():
        sys.exit(f"{path} not found (set TWICING_SHARED)")
    return path


#: documents that stress tokenizers (both tools take them: no blank line, no lone surrogate)
HOSTILE = [
    "", " ", "\n\n", "a", " leading and trailing  ", "two  spaces and\ttab\nnew line",
    "\u2581 literal mark \u2581\u2581x", "ﬁ ½ Ⅻ \u3000 ideographic\u00a0nbsp", " \u0308a e\u0301 ",
    "\x00nul\x01 \r\n crlf \u2028 ls", "😀 😀😀 中文 字 \ufeffbom", "=" * 19 + "\n" + "-" * 33,
    "x" * 20000, " ".join(["word"] * 3000), "<|endoftext|> <|end_of_text|> <s> </s> as text",
]  # fmt: skip


def build_mix(
    path: Path, mix_bytes: int, corpora: list[str] | None = None, hostile: bool = False
) -> Path:
    """One JSONL file: the same leading fraction of each corpus' lines (original JSON text)."""
    if path.is_file():
        return path
    lines: list[bytes] = []
    per_corpus = []
    sources = sorted(shared_corpora().glob("*.jsonl.xz"))
    if corpora:
        sources = [s for s in sources if s.name.removesuffix(".jsonl.xz") in corpora]
        if len(sources) != len(corpora):
            sys.exit(f"--corpora {corpora}: not all found in {shared_corpora()}")
    for src in sources:
        with lzma.open(src, "rb") as f:
            raw = [line for line in f if line.strip()]
        sizes = [len(json.loads(line)["text"].encode("utf-8")) for line in raw]
        per_corpus.append((raw, sizes))
    total = sum(sum(s) for _, s in per_corpus)
    fraction = min(1.0, mix_bytes / total)
    for raw, sizes in per_corpus:
        size, budget = 0, fraction * sum(sizes)
        for line, n in zip(raw, sizes, strict=True):
            if size >= budget:
                break
            lines.append(line if line.endswith(b"\n") else line + b"\n")
            size += n
    if hostile:
        lines += [(json.dumps({"text": t}) + "\n").encode() for t in HOSTILE]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.writelines(lines)
    tmp.replace(path)
    return path


def repeat_file(base: Path, path: Path, copies: int) -> Path:
    """``base`` concatenated ``copies`` times (kept once written)."""
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            for _ in range(copies):
                with open(base, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        tmp.replace(path)
    return path


def default_tokenizer(work: Path, mix: Path) -> Path:
    """data_prep's default BPE 32k, trained on the mix (cached)."""
    corpus = Corpus("mix", paths=[str(mix)])
    return train_tokenizer([corpus], work / "tokenizer" / f"bpe32k_{mix.stem}", TokenizerOptions())


def timed(cmd: list[str], cwd: Path, log: Path) -> tuple[float, float]:
    """(wall s, CPU s of the whole process tree) of one command; fails loudly on exit != 0."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        rc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        sys.exit(f"{cmd[:3]} exited {rc}; see {log}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def hf_tokenizer(work: Path, mix: Path, style: str) -> Path:
    """A 32k Hugging Face byte-level BPE of ``style``, trained on the mix (cached)."""
    from data_prep.train_hf_tokenizer import train_hf_bpe

    out = work / "tokenizer" / f"hf-{style}-32k_{mix.stem}"
    if (out / "tokenizer.json").is_file():
        return out
    return train_hf_bpe([Corpus("mix", paths=[str(mix)])], out, 32000, style=style, progress=False)


def megatron_cmd(args, mix: Path, model: Path, prefix: Path) -> list[str]:
    kind = "HuggingFaceTokenizer" if model.is_dir() else "SentencePieceTokenizer"
    return [
        args.megatron_python,
        str(Path(args.megatron_lm) / "tools" / "preprocess_data.py"),
        "--input", str(mix),
        "--output-prefix", str(prefix),
        "--tokenizer-type", kind,
        "--tokenizer-model", str(model),
        "--workers", str(args.workers),
        "--append-eod",
        "--log-interval", "100000000",
    ]  # fmt: skip


def ours_cmd(args, mix: Path, model: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "data_prep", "tokenize",
        "--tokenizer", str(model),
        "--out-dir", str(out),
        "--workers", str(args.workers),
        "--no-progress",
        "--corpus", f"mix={mix}",
    ]  # fmt: skip


def same_files(a: Path, b: Path) -> bool:
    return all(Path(f"{p}.{ext}").is_file() for p in (a, b) for ext in ("bin", "idx")) and all(
        filecmp.cmp(f"{a}.{ext}", f"{b}.{ext}", shallow=False) for ext in ("bin", "idx")
    )


def reference_digests(mix: Path, model: Path) -> tuple[str, str]:
    """sha256 of ``.bin``/``.idx`` holding ``encode(doc) + [eos]`` per document (streamed):
    ``sp.encode``, or a Hugging Face tokenizer's ``encode(doc, add_special_tokens=False)`` and
    its config's EOS token."""
    if model.is_dir():
        from tokenizers import Tokenizer

        hf = Tokenizer.from_file(str(model / "tokenizer.json"))
        eos_token = json.loads((model / "tokenizer_config.json").read_text())["eos_token"]
        eos, size = hf.token_to_id(eos_token), hf.get_vocab_size(with_added_tokens=True)
        encode = lambda batch: [e.ids for e in hf.encode_batch(batch, add_special_tokens=False)]  # noqa: E731
    else:
        sp = spm.SentencePieceProcessor(model_file=str(model))
        eos, size = sp.eos_id(), sp.get_piece_size()
        encode = lambda batch: sp.encode(batch, num_threads=2)  # noqa: E731
    dtype, code = (np.uint16, 8) if size < 65500 else (np.int32, 4)
    bin_hash, lens, docs = hashlib.sha256(), [], [0]

    def flush(batch: list[str]) -> None:
        for ids in encode(batch):
            if ids:
                seq = np.array(ids + [eos], dtype=dtype)
                bin_hash.update(seq.tobytes())
                lens.append(len(seq))
            docs.append(len(lens))

    batch: list[str] = []
    with open(mix, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                batch.append(json.loads(line)["text"])
            if len(batch) == 4096:
                flush(batch)
                batch = []
    flush(batch)
    seq_lens = np.array(lens, dtype=np.int32)
    ptrs = np.zeros(len(seq_lens), np.int64)
    np.cumsum(seq_lens[:-1], dtype=np.int64, out=ptrs[1:])
    ptrs *= np.dtype(dtype).itemsize
    head = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(seq_lens), len(docs))
    idx = head + seq_lens.tobytes() + ptrs.tobytes() + np.array(docs, np.int64).tobytes()
    return bin_hash.hexdigest(), hashlib.sha256(idx).hexdigest()


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--megatron-lm", help="Megatron-LM checkout (tag core_v0.16.1)")
    ap.add_argument("--megatron-python", default=sys.executable, help="interpreter for Megatron")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--tokenizer",
        help="sentencepiece .model or Hugging Face tokenizer dir (default: BPE 32k on the mix)",
    )
    ap.add_argument(
        "--hf-tokenizer",
        choices=["gpt2", "llama3"],
        help="a Hugging Face byte-level BPE of this style, trained on the mix",
    )
    ap.add_argument("--corpora", help="comma-separated shared corpora for the mix (default: all)")
    ap.add_argument("--hostile", action="store_true", help="append hostile documents to the mix")
    ap.add_argument("--input", help="JSONL file with a 'text' field (default: the corpora mix)")
    ap.add_argument("--mix-mb", type=float, default=50.0, help="MB of text in the default mix")
    ap.add_argument("--copies", type=int, default=1, help="repeat the default mix this many times")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work-dir", default=Path(tempfile.gettempdir()) / "data_prep_bench")
    args = ap.parse_args()
    if args.megatron_lm and args.rounds < 3:
        ap.error("--rounds must be >= 3 for a side-by-side comparison")

    work = Path(args.work_dir)
    names = args.corpora.split(",") if args.corpora else None
    tag = (f"_{'-'.join(names)}" if names else "") + ("_hostile" if args.hostile else "")
    base = build_mix(
        work / f"mix{args.mix_mb:g}mb{tag}.jsonl", int(args.mix_mb * 1e6), names, args.hostile
    )
    if args.input:
        mix = Path(args.input)
    elif args.copies > 1:
        mix = repeat_file(base, work / f"mix{args.mix_mb:g}mb_x{args.copies}.jsonl", args.copies)
    else:
        mix = base
    if args.tokenizer:
        model = Path(args.tokenizer)
    elif args.hf_tokenizer:
        model = hf_tokenizer(work, base, args.hf_tokenizer)
    else:
        model = default_tokenizer(work, base)
    ours_out, meg_out = work / "out-ours", work / "out-megatron"
    print(f"input: {mix} ({mix.stat().st_size / 1e6:.1f} MB of JSONL); tokenizer: {model}")
    print(f"workers: {args.workers}; cores: {os.cpu_count()}; load before: {load()}")
    if args.megatron_lm:
        probe = "import megatron.core as m; print(m.__version__, m.__file__)"
        env = subprocess.run(
            [args.megatron_python, "-W", "ignore", "-c", probe],
            capture_output=True,
            text=True,
            check=True,
        )
        script = Path(args.megatron_lm) / "tools" / "preprocess_data.py"
        print(f"megatron: {script}; megatron-core {env.stdout.strip()}")

    rows = []
    for r in range(1, args.rounds + 1):
        for d in (ours_out, meg_out):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        row = {}
        if args.megatron_lm:
            cmd = megatron_cmd(args, mix, model, meg_out / "mix")
            row["megatron"] = timed(cmd, ROOT, work / "megatron.log")
        row["ours"] = timed(ours_cmd(args, mix, model, ours_out), ROOT, work / "ours.log")
        stats = json.loads((ours_out / "mix_text_document.stats.json").read_text())
        if args.megatron_lm:
            if not (meg_out / "mix_text_document.idx").is_file():  # it exits 0 when a worker dies
                sys.exit(f"Megatron wrote no .idx: see {work / 'megatron.log'}")
            row["identical"] = same_files(
                ours_out / "mix_text_document", meg_out / "mix_text_document"
            )
        rows.append(row)
        if args.megatron_lm:
            (mw, mc), (ow, oc) = row["megatron"], row["ours"]
            print(
                f"round {r}: megatron {mw:6.2f} s wall {mc:6.2f} CPU-s | ours {ow:6.2f} s wall "
                f"{oc:6.2f} CPU-s | ratio wall {mw / ow:.2f}x CPU {mc / oc:.2f}x | "
                f"byte-identical: {row['identical']} | load {load()}",
                flush=True,
            )
            if not row["identical"]:
                sys.exit("outputs differ: see " + str(work))
        else:
            ow, oc = row["ours"]
            print(f"round {r}: ours {ow:6.2f} s wall {oc:6.2f} CPU-s | load {load()}", flush=True)

    tokens, text_mb = stats["tokens"], stats["text_bytes"] / 1e6
    print(
        f"output: {stats['documents']} documents, {tokens / 1e6:.2f}M tokens, "
        f"{text_mb:.1f} MB of text ({stats['bytes_per_token']:.2f} bytes/token)"
    )
    ow = statistics.median(r["ours"][0] for r in rows)
    oc = statistics.median(r["ours"][1] for r in rows)
    print(
        f"ours median: {ow:.2f} s wall, {oc:.2f} CPU-s; {tokens / ow / 1e6:.2f}M tok/s, "
        f"{text_mb / ow:.2f} MB/s wall; {text_mb / oc:.2f} MB per CPU-s"
    )
    if args.megatron_lm:
        mw = statistics.median(r["megatron"][0] for r in rows)
        mc = statistics.median(r["megatron"][1] for r in rows)
        rw = statistics.median(r["megatron"][0] / r["ours"][0] for r in rows)
        rc = statistics.median(r["megatron"][1] / r["ours"][1] for r in rows)
        print(f"megatron median: {mw:.2f} s wall, {mc:.2f} CPU-s; {tokens / mw / 1e6:.2f}M tok/s")
        print(f"median ratio (Megatron / ours): wall {rw:.2f}x, CPU {rc:.2f}x")
        print(f"byte-identical every round: {all(r['identical'] for r in rows)}")
    else:
        ref = reference_digests(mix, model)
        prefix = ours_out / "mix_text_document"
        got = (file_digest(f"{prefix}.bin"), file_digest(f"{prefix}.idx"))
        print(f"byte-identical to encode(doc) + [eos] in MMIDIDX: {got == ref}")
        if got != ref:
            sys.exit(1)
    print(f"load after: {load()}")


if __name__ == "__main__":
    main()
