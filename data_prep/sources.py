"""Corpora: where documents come from, read as a stream of strings with clear errors.

A :class:`Corpus` is one of: local files or globs (``.jsonl``/``.json`` lines, ``.parquet``,
``.txt``; ``.gz``/``.xz``/``.bz2``/``.zst`` compressed), a ``datasets`` source read in streaming
mode (``hf:PATH:CONFIG:SPLIT``), or documents held in memory (``documents=``).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import json
import lzma
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from data_prep.base.errors import DataPrepError

TEXT_UNITS = ("file", "line", "paragraph")
_COMPRESSED = {".gz": gzip.open, ".xz": lzma.open, ".lzma": lzma.open, ".bz2": bz2.open}


@dataclass
class Corpus:
    """A named corpus. Exactly one of ``paths``, ``hf`` or ``documents`` is given.

    ``text_field``: the JSON key / parquet column / dataset column holding a document.
    ``text_unit``: what one document is in a ``.txt`` file (the whole file, a line or a paragraph).
    ``hf``: ``(path, config, split)`` for ``datasets.load_dataset(path, config, split=split,
    streaming=True)``. ``documents``: a callable returning an iterable of strings, with
    ``fingerprint`` identifying its content (for resumption). ``meta`` is copied into its stats.
    """

    name: str
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    text_unit: str = "file"
    hf: tuple[str, str | None, str] | None = None
    documents: Callable[[], Iterable[str]] | None = None
    fingerprint: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if sum(x is not None and x != [] for x in (self.paths, self.hf, self.documents)) != 1:
            raise DataPrepError(f"corpus {self.name!r}: give exactly one of paths, hf, documents")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise DataPrepError(f"bad corpus name {self.name!r}")
        if self.text_unit not in TEXT_UNITS:
            raise DataPrepError(f"text_unit must be one of {TEXT_UNITS}, got {self.text_unit!r}")

    def files(self) -> list[Path]:
        """The input files, globs expanded in sorted order; a missing file or empty glob fails."""
        out: list[Path] = []
        for pattern in self.paths:
            if glob.has_magic(str(pattern)):
                matches = sorted(glob.glob(str(pattern)))
                if not matches:
                    raise DataPrepError(f"corpus {self.name!r}: no file matches {pattern!r}")
                out += [Path(m) for m in matches]
            else:
                p = Path(pattern)
                if not p.is_file():
                    raise DataPrepError(f"corpus {self.name!r}: input file {p} does not exist")
                out.append(p)
        return out

    def identity(self) -> dict:
        """What the output depends on, for deciding whether finished work can be reused."""
        if self.documents is not None:
            return {"documents": self.fingerprint}
        if self.hf is not None:
            return {"hf": list(self.hf), "text_field": self.text_field}
        files = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files()]
        return {"files": files, "text_field": self.text_field, "text_unit": self.text_unit}

    def texts(self) -> Iterator[str]:
        """Every document, in order."""
        if self.documents is not None:
            for i, text in enumerate(self.documents()):
                if not isinstance(text, str):
                    raise DataPrepError(f"corpus {self.name!r}: document {i} is not a string")
                yield text
        elif self.hf is not None:
            yield from _read_hf(self.hf, self.text_field)
        else:
            for path in self.files():
                yield from read_file(path, self.text_field, self.text_unit)


def parse_corpus(spec: str, text_field: str = "text", text_unit: str = "file") -> Corpus:
    """``NAME=PATH_OR_GLOB[,PATH_OR_GLOB...]`` or ``NAME=hf:PATH:CONFIG:SPLIT`` (CLI syntax)."""
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise DataPrepError(f"corpus spec {spec!r} is not NAME=PATHS or NAME=hf:PATH:CONFIG:SPLIT")
    if rest.startswith("hf:"):
        parts = rest[3:].split(":")
        if len(parts) != 3:
            raise DataPrepError(f"{rest!r}: expected hf:PATH:CONFIG:SPLIT (CONFIG may be empty)")
        return Corpus(name, hf=(parts[0], parts[1] or None, parts[2]), text_field=text_field)
    return Corpus(name, paths=rest.split(","), text_field=text_field, text_unit=text_unit)


def fingerprint_texts(texts: Iterable[str]) -> str:
    """sha256 over documents (length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


# ------------------------------------------------------------------------------------- files
def _open_binary(path: Path) -> IO[bytes]:
    suffix = path.suffix.lower()
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataPrepError(f"{path}: reading .zst needs `pip install zstandard`") from None
        return zstandard.open(path, "rb")
    opener = _COMPRESSED.get(suffix, open)
    return opener(path, "rb")


def _kind(path: Path) -> str:
    name = path.name.lower()
    for ext in (*_COMPRESSED, ".zst"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    for kind, exts in {
        "jsonl": (".jsonl", ".json", ".ndjson"),
        "parquet": (".parquet",),
        "txt": (".txt", ".text", ".md", ".rst"),
    }.items():
        if name.endswith(exts):
            return kind
    raise DataPrepError(f"{path}: unknown file type (expected .jsonl, .json, .parquet or .txt)")


def read_file(path: Path, text_field: str = "text", text_unit: str = "file") -> Iterator[str]:
    """Documents of one file; errors name the file and line (or row)."""
    kind = _kind(path)
    try:
        if kind == "jsonl":
            yield from _read_jsonl(path, text_field)
        elif kind == "parquet":
            yield from _read_parquet(path, text_field)
        else:
            yield from _read_txt(path, text_unit)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataPrepError(f"{path}: cannot read: {e}") from e


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 4]
        raise DataPrepError(
            f"{path}:{lineno}: invalid UTF-8 at byte {e.start} of the line ({bad!r})"
        ) from None


def _check_surrogates(text: str, path: Path, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataPrepError(
            f"{path}:{where}: lone surrogate {text[e.start]!r} in the text"
        ) from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = _decode(raw, path, lineno)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataPrepError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise DataPrepError(f"{path}:{lineno}: expected a JSON object per line")
            try:
                text = obj[text_field]
            except KeyError:
                raise DataPrepError(
                    f"{path}:{lineno}: no text field {text_field!r} (fields: {sorted(obj)}); "
                    "choose one with --text-field"
                ) from None
            if not isinstance(text, str):
                raise DataPrepError(
                    f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string"
                )
            if b"\\ud" in raw or b"\\uD" in raw:
                _check_surrogates(text, path, str(lineno))
            yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataPrepError(
            f"{path}: no text column {text_field!r} (columns: {names}); "
            "choose one with --text-field"
        )
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataPrepError(f"{path}: column {text_field!r} has type {kind}, not string")
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=[text_field]):
        try:
            values = batch.column(0).to_pylist()
        except UnicodeDecodeError as e:
            raise DataPrepError(f"{path}: rows {row}-{row + len(batch)}: invalid UTF-8") from e
        for i, text in enumerate(values):
            if text is None:
                raise DataPrepError(f"{path}: row {row + i}: {text_field!r} is null")
            yield text
        row += len(values)


def _read_txt(path: Path, text_unit: str) -> Iterator[str]:
    with _open_binary(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        bad = data[e.start : e.start + 4]
        raise DataPrepError(f"{path}:{lineno}: invalid UTF-8 ({bad!r})") from None
    if text_unit == "file":
        if text.strip():
            yield text
    elif text_unit == "line":
        yield from (line for line in text.split("\n") if line.strip())
    else:
        yield from (p.strip("\n") for p in text.split("\n\n") if p.strip())


# ----------------------------------------------------------------------------- hf streaming
def _read_hf(hf: tuple[str, str | None, str], text_field: str) -> Iterator[str]:
    from data_prep.hub import load_dataset_split

    path, config, split = hf
    ds = load_dataset_split(path, config, split, streaming=True)
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_field not in columns:
        raise DataPrepError(
            f"dataset {path} ({config}, {split}): no column {text_field!r} (columns: {columns})"
        )
    for i, row in enumerate(ds):
        text = row.get(text_field)
        if not isinstance(text, str):
            raise DataPrepError(
                f"dataset {path} ({config}, {split}) row {i}: {text_field!r} "
                f"is {type(text).__name__}, not a string"
            )
        yield text
