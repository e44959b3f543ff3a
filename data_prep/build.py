"""Tokenize corpora into Megatron indexed datasets: sharded, multi-process, atomic, resumable.

The main process reads documents (decompression and JSON parsing included) and cuts them into
shards of about ``shard_chars`` characters; ``workers`` spawned processes encode whole shards with
:class:`~data_prep.encoder.DocumentEncoder` and write each as a small indexed dataset in a hidden
work directory, its stats JSON last (the shard's completion marker). When every shard of a corpus
is there they are concatenated, in order, into ``{out_dir}/{name}_text_document.{bin,idx}``, then
``{name}_text_document.stats.json`` is written: the corpus' completion marker. A re-run skips
finished corpora and finished shards (a killed run resumes to identical bytes); bad input raises
:class:`DataPrepError` and removes that corpus' partial work.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from data_prep.base.atomic_write import read_json, remove_stale_tmp, write_json
from data_prep.base.errors import DataPrepError
from data_prep.encoder import DocumentEncoder, HFDocumentEncoder, encoder_blocker
from data_prep.indexed import merge_datasets, optimal_dtype, read_index, write_dataset
from data_prep.sources import Corpus
from data_prep.tokenizer_kinds import Tokenizer, load_tokenizer

FORMAT = "mmidx-v1/one-sequence-per-document"
SHARD_CHARS = 2_000_000
PAUSE_ENV = "DATA_PREP_PAUSE_AFTER_SHARDS"  # test hook: stop (sleep) after N shards are written


def output_prefix(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name}_text_document"


def stats_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.stats.json")


def finished_stats(prefix: str | Path, identity: dict | None = None) -> dict | None:
    """The stats of a complete dataset at ``prefix`` (made from ``identity``, if given), or None."""
    path = stats_path(prefix)
    if not path.is_file() or not Path(f"{prefix}.bin").is_file():
        return None
    stats = read_json(path)
    if identity is not None and stats.get("identity") != identity:
        return None
    try:
        index = read_index(f"{prefix}.idx")
    except (OSError, ValueError):
        return None
    size = Path(f"{prefix}.bin").stat().st_size
    if index.num_tokens != stats["tokens"] or size != index.num_tokens * index.dtype.itemsize:
        return None
    return stats


# --------------------------------------------------------------------------------- workers
_ENCODER: DocumentEncoder | HFDocumentEncoder | None = None


def _init_worker(kind: str, model_path: str, fast: bool, worker: bool = True) -> None:
    global _ENCODER
    if kind == "hf":
        if worker:  # one thread per worker process: the workers are the parallelism
            os.environ.setdefault("RAYON_NUM_THREADS", "1")
        _ENCODER = HFDocumentEncoder(model_path)
    else:
        _ENCODER = DocumentEncoder(model_path, fast=fast)


def _encode_shard(work_dir: str, shard: int, texts: list[str], dtype: str) -> dict:
    """Encode one shard and write it (its stats JSON last); runs in a worker process."""
    ids, doc_lens = _ENCODER.encode(texts)
    prefix = Path(work_dir) / f"{shard:06d}"
    write_dataset(prefix, ids, doc_lens, np.dtype(dtype))
    stats = {
        "shard": shard,
        "documents": len(texts),
        "empty_documents": int(np.count_nonzero(doc_lens == 0)),
        "tokens": len(ids),
        "text_bytes": sum(len(t.encode("utf-8")) for t in texts),
    }
    write_json(f"{prefix}.json", stats)
    return stats


class _Pool:
    """Process pool (or in-process when ``workers == 0``) with a bound on shards in flight."""

    def __init__(self, workers: int, kind: str, model_path: str, fast: bool) -> None:
        self.ex = None
        if workers > 0:
            self.ex = ProcessPoolExecutor(
                workers, get_context("spawn"), _init_worker, (kind, model_path, fast)
            )
        else:
            _init_worker(kind, model_path, fast, worker=False)
        self.limit = max(2, 2 * workers)
        self.pending: dict[Future, Callable[[dict], None]] = {}

    def submit(self, on_done: Callable[[dict], None], *args) -> None:
        if self.ex is None:
            on_done(_encode_shard(*args))
            return
        while len(self.pending) >= self.limit:
            self._collect(FIRST_COMPLETED)
        self.pending[self.ex.submit(_encode_shard, *args)] = on_done

    def _collect(self, mode) -> None:
        done, _ = wait(list(self.pending), return_when=mode)
        for fut in done:
            on_done = self.pending.pop(fut)
            on_done(fut.result())

    def drain(self) -> None:
        while self.pending:
            self._collect(FIRST_COMPLETED)

    def close(self, cancel: bool) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True, cancel_futures=cancel)


# ------------------------------------------------------------------------------------- jobs
@dataclass
class _Job:
    corpus: Corpus
    prefix: Path
    identity: dict
    shard_chars: int
    dtype: np.dtype
    shards: dict[int, dict] = field(default_factory=dict)
    num_shards: int = 0
    resumed: int = 0

    @property
    def work_dir(self) -> Path:
        return self.prefix.with_name(f".{self.corpus.name}.work")

    def prepare(self) -> None:
        """Drop a stale completion marker; keep the work dir only if it was made for this job."""
        stats_path(self.prefix).unlink(missing_ok=True)
        plan = {"identity": self.identity, "shard_chars": self.shard_chars}
        plan_file = self.work_dir / "plan.json"
        if plan_file.is_file() and read_json(plan_file) == plan:
            remove_stale_tmp(self.work_dir)
            return
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.work_dir.mkdir(parents=True)
        write_json(plan_file, plan)

    def done_shard(self, k: int) -> dict | None:
        marker = self.work_dir / f"{k:06d}.json"
        if not marker.is_file():
            return None
        base = self.work_dir / f"{k:06d}"
        if not (Path(f"{base}.bin").is_file() and Path(f"{base}.idx").is_file()):
            return None
        return read_json(marker)

    def abandon(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)
        stats_path(self.prefix).unlink(missing_ok=True)

    def check_nonempty(self) -> None:
        docs = sum(s["documents"] for s in self.shards.values())
        tokens = sum(s["tokens"] for s in self.shards.values())
        where = f"from {self.corpus.paths}" if self.corpus.paths else ""
        if docs == 0:
            raise DataPrepError(f"corpus {self.corpus.name!r} is empty: no documents {where}")
        if tokens == 0:
            raise DataPrepError(
                f"corpus {self.corpus.name!r} is empty: its {docs} documents encode to no tokens"
            )

    def finish(self, tokenizer: Tokenizer) -> dict:
        parts = [self.work_dir / f"{k:06d}" for k in range(self.num_shards)]
        index = merge_datasets(parts, self.prefix, self.dtype)
        shards = [self.shards[k] for k in range(self.num_shards)]
        docs = sum(s["documents"] for s in shards)
        empty = sum(s["empty_documents"] for s in shards)
        text_bytes = sum(s["text_bytes"] for s in shards)
        text_tokens = index.num_tokens - (docs - empty)
        stats = {
            "name": self.corpus.name,
            "prefix": self.prefix.name,
            "documents": docs,
            "empty_documents": empty,
            "sequences": len(index.seq_lens),
            "tokens": index.num_tokens,
            "text_tokens": text_tokens,
            "text_bytes": text_bytes,
            "bytes_per_token": round(text_bytes / max(text_tokens, 1), 4),
            "dtype": self.dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
            "shards": self.num_shards,
            **self.corpus.meta,
            "identity": self.identity,
        }
        write_json(stats_path(self.prefix), stats)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        return stats


def _cut(texts: Iterable[str], shard_chars: int) -> Iterator[list[str]]:
    """Consecutive documents, about ``shard_chars`` characters per shard (deterministic)."""
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= shard_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _maybe_pause(completed: int) -> None:
    limit = os.environ.get(PAUSE_ENV)
    if limit and completed >= int(limit):
        print(f"data_prep: paused after {completed} shards ({PAUSE_ENV})", file=sys.stderr)
        sys.stderr.flush()
        while True:
            time.sleep(60)


# ------------------------------------------------------------------------------------ entry
def tokenize_corpora(
    corpora: list[Corpus],
    tokenizer_model: str | Path,
    out_dir: str | Path,
    *,
    workers: int = 2,
    shard_chars: int = SHARD_CHARS,
    fast: bool = True,
    progress: bool = True,
) -> dict[str, dict]:
    """Write ``{out_dir}/{name}_text_document.{bin,idx}`` (+ ``.stats.json``) for each corpus.

    Returns each corpus' stats. Finished corpora (same inputs, same tokenizer) are not redone.
    """
    names = [c.name for c in corpora]
    if len(set(names)) != len(names):
        raise DataPrepError(f"corpus names must be unique, got {names}")
    tokenizer = load_tokenizer(tokenizer_model)
    dtype = optimal_dtype(tokenizer.vocab_size)
    out_dir = Path(out_dir)
    results: dict[str, dict] = {}
    jobs: list[_Job] = []
    for corpus in corpora:  # identity() also checks that every input file exists
        identity = {"format": FORMAT, "tokenizer_sha256": tokenizer.sha256, **corpus.identity()}
        prefix = output_prefix(out_dir, corpus.name)
        stats = finished_stats(prefix, identity)
        if stats is not None:
            results[corpus.name] = stats
        else:
            jobs.append(_Job(corpus, prefix, identity, shard_chars, dtype))
    if not jobs:
        return results
    out_dir.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm  # not in the workers' imports

    sentencepiece = tokenizer.kind == "sentencepiece"
    if sentencepiece and fast and (reason := encoder_blocker(tokenizer.model_path)):
        print(f"data_prep: encoding whole documents with sp.encode ({reason})", file=sys.stderr)
    pool = _Pool(workers, tokenizer.kind, str(tokenizer.model_path), fast)
    bar = tqdm(desc="tokenize", unit="doc", disable=not progress, dynamic_ncols=True)
    completed, tokens, t0 = 0, 0, time.perf_counter()
    current: _Job | None = None
    try:
        for job in jobs:
            current = job
            job.prepare()

            def on_done(stats: dict, job: _Job = job) -> None:
                nonlocal completed, tokens
                job.shards[stats["shard"]] = stats
                completed += 1
                tokens += stats["tokens"]
                bar.update(stats["documents"])
                bar.set_postfix(tok_per_s=f"{tokens / (time.perf_counter() - t0):.3g}")
                _maybe_pause(completed)

            k = -1
            for k, texts in enumerate(_cut(job.corpus.texts(), shard_chars)):
                stats = job.done_shard(k)
                if stats is not None:
                    job.shards[k] = stats
                    job.resumed += 1
                    bar.update(len(texts))
                    continue
                pool.submit(on_done, str(job.work_dir), k, texts, dtype.name)
            job.num_shards = k + 1
            if job.num_shards == 0:
                job.check_nonempty()
        current = None
        pool.drain()
        for job in jobs:
            current = job
            job.check_nonempty()
        current = None
    except BaseException as e:
        pool.close(cancel=True)
        bar.close()
        if current is not None and isinstance(e, DataPrepError):
            current.abandon()  # bad input: leave nothing of this corpus behind
        raise
    pool.close(cancel=False)
    bar.close()
    for job in jobs:
        if job.resumed:
            print(
                f"data_prep: {job.corpus.name}: resumed {job.resumed} finished shards",
                file=sys.stderr,
            )
        results[job.corpus.name] = job.finish(tokenizer)
    return {name: results[name] for name in names}
