"""Bad input fails clearly and leaves nothing behind; a killed run resumes to identical bytes."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from workers.data_prep_common import corpus_docs, write_jsonl

from data_prep.base.errors import DataPrepError
from data_prep.build import PAUSE_ENV, tokenize_corpora
from data_prep.sources import Corpus, parse_corpus
from data_prep.train_tokenizer import TokenizerOptions, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return corpus_docs("wiki_vital", 1500)


@pytest.fixture(scope="module")
def model(tmp_path_factory, docs) -> Path:
    corpus = Corpus("t", documents=lambda: docs[:400], fingerprint="t")
    return train_tokenizer(
        [corpus], tmp_path_factory.mktemp("tok") / "m", TokenizerOptions(vocab_size=800)
    )


def _fails(model, corpus: Corpus, out: Path, match: str, workers: int = 2) -> str:
    with pytest.raises(DataPrepError, match=match) as err:
        tokenize_corpora([corpus], model, out, workers=workers, shard_chars=20_000, progress=False)
    leftovers = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert leftovers == [], f"partial outputs left behind: {leftovers}"
    return str(err.value)


def test_missing_file_and_empty_glob(tmp_path, model):
    _fails(
        model,
        Corpus("c", paths=[str(tmp_path / "nope.jsonl")]),
        tmp_path / "o",
        r"nope.jsonl does not exist",
    )
    _fails(
        model,
        Corpus("c", paths=[str(tmp_path / "shard-*.jsonl")]),
        tmp_path / "o",
        r"no file matches .*shard-\*.jsonl",
    )
    assert not (tmp_path / "o").exists()


def test_empty_corpus(tmp_path, model):
    (tmp_path / "empty.jsonl").write_text("")
    _fails(
        model,
        Corpus("c", paths=[str(tmp_path / "empty.jsonl")]),
        tmp_path / "o",
        r"corpus 'c' is empty: no documents",
    )
    write_jsonl(tmp_path / "blank.jsonl", ["", "", ""])
    _fails(
        model,
        Corpus("c", paths=[str(tmp_path / "blank.jsonl")]),
        tmp_path / "o",
        r"its 3 documents encode to no tokens",
    )


def test_invalid_utf8_names_file_and_line_and_removes_written_shards(tmp_path, docs, model):
    path = tmp_path / "bad.jsonl.gz"
    lines = [json.dumps({"text": d}).encode() for d in docs[:1200]]
    lines[1100] = b'{"text": "caf\xe9 au lait"}'  # latin-1 byte: shards before it are written
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    msg = _fails(model, Corpus("c", paths=[str(path)]), tmp_path / "o", "invalid UTF-8")
    assert f"{path}:1101:" in msg

    seen = []  # the same with a corpus that looks at the work directory before failing

    def documents():
        yield from docs[:1100]
        seen.extend((tmp_path / "o2" / ".c.work").glob("0*.bin"))
        raise DataPrepError("bad record")

    _fails(model, Corpus("c", documents=documents, fingerprint="x"), tmp_path / "o2", "bad record")
    assert len(seen) > 10  # shards had been written, and were removed


def test_unknown_text_field_and_other_bad_records(tmp_path, model):
    path = write_jsonl(tmp_path / "d.jsonl", ["a", "b"], field="content")
    msg = _fails(model, Corpus("c", paths=[str(path)]), tmp_path / "o", "no text field 'text'")
    assert f"{path}:1:" in msg and "'content'" in msg and "--text-field" in msg
    stats = tokenize_corpora(
        [parse_corpus(f"c={path}", text_field="content")],
        model,
        tmp_path / "ok",
        workers=0,
        progress=False,
    )
    assert stats["c"]["documents"] == 2

    cases = {
        '{"text": 3}': "field 'text' is int, not a string",
        '{"text": "x"': "invalid JSON",
        '["x"]': "expected a JSON object",
        '{"text": "\\ud800 lone"}': "lone surrogate",
    }
    for line, match in cases.items():
        (tmp_path / "r.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
        assert ":2:" in _fails(
            model, Corpus("c", paths=[str(tmp_path / "r.jsonl")]), tmp_path / "o", match, workers=0
        )


def test_parquet_and_text_inputs(tmp_path, model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["one doc", "two doc"]}), tmp_path / "p.parquet")
    msg = _fails(
        model,
        Corpus("c", paths=[str(tmp_path / "p.parquet")]),
        tmp_path / "o",
        "no text column 'text'",
        workers=0,
    )
    assert "['body']" in msg
    (tmp_path / "t.txt").write_bytes(b"line one\nline two\n\xff\xfe\n")
    assert "t.txt:3:" in _fails(
        model,
        Corpus("c", paths=[str(tmp_path / "t.txt")]),
        tmp_path / "o",
        "invalid UTF-8",
        workers=0,
    )
    (tmp_path / "u.txt").write_text("para one\nstill one\n\npara two\n")
    corpora = [
        Corpus("pq", paths=[str(tmp_path / "p.parquet")], text_field="body"),
        Corpus("par", paths=[str(tmp_path / "u.txt")], text_unit="paragraph"),
        Corpus("line", paths=[str(tmp_path / "u.txt")], text_unit="line"),
    ]
    stats = tokenize_corpora(corpora, model, tmp_path / "ok", workers=0, progress=False)
    assert [stats[n]["documents"] for n in ("pq", "par", "line")] == [2, 2, 3]


def test_cli_reports_errors_without_traceback(tmp_path, model, capsys):
    from data_prep.cli import main

    args = ["tokenize", "--tokenizer", str(model), "--out-dir", str(tmp_path / "o")]
    assert main([*args, "--corpus", f"c={tmp_path / 'missing.jsonl'}", "--no-progress"]) == 2
    assert "error: corpus 'c': input file" in capsys.readouterr().err


def _run(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "data_prep", *args],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: SIGKILL reaches the workers too
    )


def test_killed_run_resumes_to_identical_output(tmp_path, docs, model):
    jsonl = write_jsonl(tmp_path / "wiki.jsonl", docs)
    out = tmp_path / "out"
    args = [
        "tokenize",
        "--corpus",
        f"wiki={jsonl}",
        "--tokenizer",
        str(model),
        "--out-dir",
        str(out),
        "--workers",
        "2",
        "--shard-chars",
        "40000",
        "--no-progress",
    ]
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}

    proc = _run(args, {**env, PAUSE_ENV: "4"})
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        if "paused after" in line or time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    work = out / ".wiki.work"
    finished = [p for p in work.glob("0*.json")]
    assert len(finished) >= 4
    assert not list(out.glob("wiki_text_document*"))  # no final output from the killed run

    proc = _run(args, env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resumed {len(finished)} finished shards" in err
    assert not work.exists() and not [p for p in out.rglob("*") if ".tmp-" in p.name]

    clean = tokenize_corpora(
        [Corpus("wiki", paths=[str(jsonl)])],
        model,
        tmp_path / "clean",
        workers=0,
        shard_chars=40_000,
        progress=False,
    )["wiki"]
    for ext in (".bin", ".idx", ".stats.json"):
        resumed = (out / f"wiki_text_document{ext}").read_bytes()
        assert resumed == (tmp_path / "clean" / f"wiki_text_document{ext}").read_bytes(), ext
    assert clean["shards"] > len(finished)


def test_datasets_streaming_source_gives_the_same_dataset(tmp_path, docs, model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "ds" / "data").mkdir(parents=True)
    table = pa.table({"text": docs[:300]})
    pq.write_table(table, tmp_path / "ds" / "data" / "train-00000-of-00001.parquet")
    streamed = parse_corpus(f"s=hf:{tmp_path / 'ds'}::train")
    assert streamed.hf == (str(tmp_path / "ds"), None, "train")
    local = Corpus("s", paths=[str(write_jsonl(tmp_path / "s.jsonl", docs[:300]))])
    tokenize_corpora([streamed], model, tmp_path / "a", workers=0, progress=False)
    tokenize_corpora([local], model, tmp_path / "b", workers=0, progress=False)
    for ext in (".bin", ".idx"):
        a = (tmp_path / "a" / f"s_text_document{ext}").read_bytes()
        assert a == (tmp_path / "b" / f"s_text_document{ext}").read_bytes()
    bad = parse_corpus(f"s=hf:{tmp_path / 'ds'}::train", text_field="body")
    _fails(model, bad, tmp_path / "o", r"no column 'body' \(columns: \['text'\]\)", workers=0)
