"""WikiText (Merity et al., 2016) as articles: from the hub, a local hub-layout copy, or the
original ``wiki.{train,valid,test}.{tokens,raw}`` files.

Both layouts hold the original lines: a file line is ``" " + words + " \\n"`` (blank: ``" \\n"``);
a hub row is the same line, with blank lines as ``""``. Articles start at rows matching
``^ = [^=].* = $`` (top-level ``= Title =`` headings; lines before the first heading belong to the
first article). An article's text is its original lines, concatenated, so the articles of a split
concatenate back to the original file; its word count is ``len(text.split())``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep.base.errors import DataPrepError
from data_prep.hub import load_dataset_split

HUB_REPO = "Salesforce/wikitext"
SPLITS = {"train": "train", "valid": "validation", "test": "test"}  # ours -> the hub's
HEADING = re.compile(r"^ = [^=].* = $")
_NAMES = ("wikitext-2", "wikitext-2-raw", "wikitext-103", "wikitext-103-raw")


@dataclass(frozen=True)
class Article:
    title: str
    text: str  # the original lines, "\n"-terminated
    words: int  # whitespace-separated words of ``text``
    lines: int


def canonical_name(name: str) -> str:
    """``wikitext-103-raw-v1`` / ``wikitext-103-raw`` → ``wikitext-103-raw``."""
    base = name[:-3] if name.endswith("-v1") else name
    if base not in _NAMES:
        raise DataPrepError(f"unknown WikiText {name!r}; one of {list(_NAMES)} (or with -v1)")
    return base


def hub_config(name: str) -> str:
    return canonical_name(name) + "-v1"


def file_suffix(name: str) -> str:
    return "raw" if canonical_name(name).endswith("-raw") else "tokens"


def shared_wikitext_dir() -> Path:
    """``$TWICING_SHARED/data/wikitext``, else ``../shared/data/wikitext`` beside the repo."""
    root = os.environ.get("TWICING_SHARED")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / "shared"
    return base / "data" / "wikitext"


# ------------------------------------------------------------------------------- articles
def original_lines(rows: Iterable[str]) -> Iterator[str]:
    """Hub rows or file lines → the original file lines (``"\\n"``-terminated)."""
    for row in rows:
        if not row:
            yield " \n"
        elif row.endswith("\n"):
            yield row
        else:
            yield row + "\n"


def is_title(lines: list[str], i: int) -> bool:
    """Line ``i`` starts an article: it matches :data:`HEADING` and has blank lines around it.

    The context rule drops the ~5 % of matching rows that are table legends inside articles
    (e.g. ``" = Played , W = "`` between text lines); it gives the known counts (WikiText-2 train
    600 articles, valid and test 60, WikiText-103 train 28,475).
    """
    return (
        HEADING.match(lines[i][:-1]) is not None
        and (i == 0 or lines[i - 1] == " \n")
        and (i + 1 == len(lines) or lines[i + 1] == " \n")
    )


def articles(rows: Iterable[str]) -> Iterator[Article]:
    """Group WikiText rows (hub rows or file lines) into articles."""
    lines = list(original_lines(rows))
    starts = [i for i, line in enumerate(lines) if line.startswith(" = ") and is_title(lines, i)]
    starts[:1] = [0]  # lines before the first title belong to the first article
    starts.append(len(lines))
    for begin, end in zip(starts[:-1], starts[1:], strict=True):
        if end > begin:
            yield _article(lines[begin:end])


def _article(lines: list[str]) -> Article:
    text = "".join(lines)
    title = next((line[3:-4] for line in lines if HEADING.match(line[:-1])), "")
    return Article(title, text, len(text.split()), len(lines))


# -------------------------------------------------------------------------------- sources
@dataclass
class WikiTextSource:
    """Where one WikiText variant comes from: ``kind`` is ``hub`` (repo id or a local directory
    in the hub's parquet layout, read by ``datasets.load_dataset``) or ``files``."""

    name: str
    kind: str
    location: str
    cache_dir: str | None = None

    def describe(self) -> str:
        if self.kind == "files":
            return f"original files in {self.location}"
        return f"datasets.load_dataset({self.location!r}, {hub_config(self.name)!r})"

    def has_split(self, split: str) -> bool:
        if self.kind == "files":
            return (Path(self.location) / f"wiki.{split}.{file_suffix(self.name)}").is_file()
        if not Path(self.location).exists():
            return True  # the hub has all three
        config_dir = Path(self.location) / hub_config(self.name)
        return any(config_dir.glob(f"{SPLITS[split]}-*.parquet"))

    def rows(self, split: str) -> list[str]:
        """The split's rows (file lines, or hub rows)."""
        if self.kind == "files":
            path = Path(self.location) / f"wiki.{split}.{file_suffix(self.name)}"
            if not path.is_file():
                raise DataPrepError(f"{path} does not exist (no {split} split in {self.location})")
            return _file_lines(path)
        ds = load_dataset_split(
            self.location, hub_config(self.name), SPLITS[split], cache_dir=self.cache_dir
        )
        if "text" not in ds.column_names:
            raise DataPrepError(f"{self.describe()}: no 'text' column ({ds.column_names})")
        return ds.data.column("text").to_pylist()  # ds["text"] iterates ~50× slower


def _file_lines(path: Path) -> list[str]:
    """Lines split at ``\n`` only (``str.splitlines`` also splits at U+2028 and friends)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataPrepError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    lines = text.split("\n")
    last = lines.pop()
    return [line + "\n" for line in lines] + ([last] if last else [])


def _files_dir(path: Path, name: str) -> Path | None:
    suffix = file_suffix(name)
    for d in (path, path / canonical_name(name)):
        if any(d.glob(f"wiki.*.{suffix}")):
            return d
    return None


def resolve_source(
    name: str,
    source: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    need_split: str = "train",
) -> WikiTextSource:
    """Pick the source of WikiText ``name``.

    ``source``: a hub-layout directory (has ``README.md`` or ``<config>/*.parquet``), a directory
    of original files (or its parent, e.g. ``shared/data/wikitext``), or None: the hub, then the
    shared copy (``$TWICING_SHARED/data/wikitext`` or ``../shared/data/wikitext``) when it has
    the ``need_split`` file.
    """
    name = canonical_name(name)
    cache = str(cache_dir) if cache_dir is not None else None
    if source is not None:
        path = Path(source)
        if not path.is_dir():
            raise DataPrepError(f"WikiText source {path} is not a directory")
        if (path / "README.md").is_file() or any((path / hub_config(name)).glob("*.parquet")):
            return WikiTextSource(name, "hub", str(path), cache)
        files = _files_dir(path, name)
        if files is None:
            raise DataPrepError(
                f"{path} holds neither the hub's parquet layout ({hub_config(name)}/*.parquet + "
                f"README.md) nor original wiki.*.{file_suffix(name)} files"
            )
        return WikiTextSource(name, "files", str(files), cache)
    hub = WikiTextSource(name, "hub", HUB_REPO, cache)
    try:
        hub.rows("valid")  # small; downloads or finds the cached copy
        return hub
    except DataPrepError as e:
        hub_error = e
    shared = _files_dir(shared_wikitext_dir(), name)
    if shared is not None and (shared / f"wiki.{need_split}.{file_suffix(name)}").is_file():
        print(f"data_prep: {HUB_REPO} unavailable; using {shared}", file=sys.stderr)
        return WikiTextSource(name, "files", str(shared), cache)
    raise DataPrepError(
        f"cannot get {name}: {hub_error}\nNo shared copy with "
        f"wiki.{need_split}.{file_suffix(name)} in {shared_wikitext_dir()} either. Pass a "
        f"local copy: `python -m data_prep wikitext --source DIR` (or prepare_wikitext(source=DIR))"
        f", DIR being a download of the hub dataset {HUB_REPO} (its parquet layout, e.g. "
        f"{hub_config(name)}/train-00000-of-00001.parquet + README.md) or a directory with the "
        f"original wiki.{{train,valid,test}}.{file_suffix(name)} files."
    )


# --------------------------------------------------------------------------- hub layout copy
def export_hub_layout(rows_by_split: dict[str, list[str]], out_dir: str | Path, name: str) -> Path:
    """Write rows in the hub's layout (``<config>/<split>-00000-of-00001.parquet`` + a README.md
    whose YAML lists every config directory present), so ``load_dataset(out_dir, config)`` works.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    config = hub_config(name)
    (out_dir / config).mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        hub_rows = ["" if line == " \n" else line for line in original_lines(rows)]
        table = pa.table({"text": pa.array(hub_rows, pa.string())})
        pq.write_table(table, out_dir / config / f"{SPLITS[split]}-00000-of-00001.parquet")
    lines = ["---", "configs:"]
    for cfg in sorted(p.name for p in out_dir.iterdir() if p.is_dir()):
        lines += [f"- config_name: {cfg}", "  data_files:"]
        for split in SPLITS.values():
            if any((out_dir / cfg).glob(f"{split}-*.parquet")):
                lines += [f"  - split: {split}", f"    path: {cfg}/{split}-*"]
    lines += ["---", "", "WikiText (CC BY-SA 3.0 / GFDL), exported by data_prep.", ""]
    (out_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")
    return out_dir


def load_articles(
    name: str = "wikitext-103-raw",
    split: str = "valid",
    source: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
) -> list[Article]:
    """The articles of one split, e.g. for word-level perplexity (``sum(a.words for a in ...)``)."""
    src = resolve_source(name, source, cache_dir=cache_dir, need_split=split)
    return list(articles(src.rows(split)))
