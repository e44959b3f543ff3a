"""The data manifest: which indexed datasets, with which weights, feed each split of training.

A JSON file; prefixes and the tokenizer path are relative to the manifest's directory::

    {"format": "twicing-lm/data-manifest-v1",
     "tokenizer": {"model": "tok/wt2.model", "kind": "sentencepiece", "sha256": "...",
                   "vocab_size": 8192, "eod": 2},

(``"kind": "hf"`` with ``"model"`` a Hugging Face tokenizer directory; an absent kind is
sentencepiece, as every manifest written before Hugging Face tokenizers were supported)
     "blend_per_split": {"train": [{"prefix": "wt2_train_text_document", "weight": 1.0}],
                         "valid": [...], "test": [...]}}

or one blend split by megatron's ratio string::

    {..., "blend": [{"prefix": "kjv_text_document", "weight": 0.3}, ...], "split": "949,50,1"}

:meth:`Manifest.gpt_dataset_kwargs` gives the ``blend``/``split`` or ``blend_per_split``
arguments of megatron-core's ``GPTDatasetConfig``; :meth:`Manifest.check_nonempty` must pass before
``BlendedMegatronDatasetBuilder.build()``, which loops forever on a weighted corpus with no
document in a split.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from data_prep.base.atomic_write import read_json, write_json
from data_prep.base.errors import DataPrepError, EmptySplitError
from data_prep.indexed import Index, expected_bin_size
from data_prep.indexed import read_index as _read_index
from data_prep.splits import SPLIT_NAMES, parse_split, split_ranges
from data_prep.tokenizer_kinds import Kind, Tokenizer, load_tokenizer


def read_index(path: str | Path) -> Index:
    """The index at ``path``; ``DataPrepError`` naming it when it is missing or damaged."""
    try:
        return _read_index(path)
    except FileNotFoundError:
        raise DataPrepError(f"{path} does not exist") from None
    except (ValueError, OSError) as e:
        raise DataPrepError(f"{path} is not a readable indexed-dataset index: {e}") from None


FORMAT = "twicing-lm/data-manifest-v1"


@dataclass(frozen=True)
class BlendEntry:
    prefix: Path  # absolute, without .bin/.idx
    weight: float

    @property
    def name(self) -> str:
        name = self.prefix.name
        return name[: -len("_text_document")] if name.endswith("_text_document") else name


@dataclass
class Manifest:
    tokenizer_model: Path
    blend: list[BlendEntry] | None = None
    split: str | None = None
    blend_per_split: dict[str, list[BlendEntry]] | None = None
    tokenizer_sha256: str | None = None
    path: Path | None = None
    tokenizer_kind: Kind | None = None

    def __post_init__(self) -> None:
        if (self.blend is None) == (self.blend_per_split is None):
            raise DataPrepError("a manifest has either blend + split or blend_per_split")
        if self.blend is not None and not self.split:
            raise DataPrepError("a manifest with a blend needs a split string such as '949,50,1'")
        if self.split is not None:
            check_split(self.split)
        if self.blend_per_split is not None:
            unknown = set(self.blend_per_split) - set(SPLIT_NAMES)
            if unknown:
                raise DataPrepError(f"unknown splits {sorted(unknown)}; use {SPLIT_NAMES}")
            if not self.blend_per_split.get("train"):
                raise DataPrepError("blend_per_split needs a train blend")
        for entry in self.entries():
            if not (entry.weight >= 0 and math.isfinite(entry.weight)):
                raise DataPrepError(
                    f"{entry.prefix}: weight must be a finite number >= 0, got {entry.weight}"
                )

    def entries(self) -> list[BlendEntry]:
        if self.blend is not None:
            return list(self.blend)
        return [e for entries in self.blend_per_split.values() for e in entries]

    # ------------------------------------------------------------------------ for megatron
    def gpt_dataset_kwargs(self) -> dict:
        """``blend`` + ``split``, or ``blend_per_split``, for ``GPTDatasetConfig(**kwargs, ...)``.

        Zero-weight entries are left out (megatron-core would still build them, and hang on an
        empty one)."""

        def pair(entries: list[BlendEntry]):
            kept = [e for e in entries if e.weight > 0]
            if not kept:
                return None
            return [str(e.prefix) for e in kept], [float(e.weight) for e in kept]

        if self.blend is not None:
            blend = pair(self.blend)
            if blend is None:
                raise DataPrepError("every corpus of the blend has weight 0")
            return {"blend": blend, "split": self.split}
        return {"blend_per_split": [pair(self.blend_per_split.get(s) or []) for s in SPLIT_NAMES]}

    def tokenizer(self) -> Tokenizer:
        tok = load_tokenizer(self.tokenizer_model, self.tokenizer_kind)
        if self.tokenizer_sha256 and tok.sha256 != self.tokenizer_sha256:
            raise DataPrepError(
                f"{self.tokenizer_model} has sha256 {tok.sha256[:12]}…, the manifest "
                f"{self.path} expects {self.tokenizer_sha256[:12]}…: datasets and tokenizer differ"
            )
        return tok

    # ------------------------------------------------------------------------------ checks
    def check_files(self) -> None:
        """Every dataset's ``.idx`` parses and its ``.bin`` has exactly the bytes the index
        describes (a truncated or padded ``.bin`` is a ``DataPrepError`` naming it), and was
        made with this manifest's tokenizer (:meth:`check_dataset_tokenizers`)."""
        self.check_dataset_tokenizers()
        for entry in dict.fromkeys(self.entries()):
            index = read_index(f"{entry.prefix}.idx")
            binary = Path(f"{entry.prefix}.bin")
            if not binary.is_file():
                raise DataPrepError(f"{binary} does not exist (manifest {self.path})")
            size, expected = binary.stat().st_size, expected_bin_size(index)
            if size != expected:
                raise DataPrepError(
                    f"{binary} has {size:,} bytes but {entry.prefix}.idx describes {expected:,} "
                    f"({'truncated' if size < expected else 'extra bytes'}): rebuild it with "
                    "python -m data_prep tokenize"
                )

    def check_dataset_tokenizers(self) -> None:
        """A dataset that records the tokenizer it was made with (``PREFIX.stats.json``, written
        by ``data_prep tokenize``) must have been made with this manifest's: the same ids would
        mean other text (``DataPrepError`` naming the dataset and both tokenizers)."""
        mine = load_tokenizer(self.tokenizer_model, self.tokenizer_kind).sha256
        for entry in dict.fromkeys(self.entries()):
            stats = Path(f"{entry.prefix}.stats.json")
            if not stats.is_file():
                continue
            try:
                made = json.loads(stats.read_text())["identity"]["tokenizer_sha256"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # no record of the tokenizer: nothing to compare
            if made != mine:
                raise DataPrepError(
                    f"dataset {entry.prefix} was tokenized with a tokenizer of sha256 "
                    f"{made[:16]}… ({stats.name}), but this manifest's tokenizer "
                    f"{self.tokenizer_model} has sha256 {mine[:16]}…: its ids would mean other "
                    f"text. Tokenize it again with --tokenizer {self.tokenizer_model}, or blend it "
                    "with the tokenizer it was made with"
                )

    def check_nonempty(self) -> None:
        """Raise :class:`EmptySplitError` when a corpus with weight > 0 has no document
        (sequence) in a split it feeds, computed exactly as megatron-core 0.16.1 splits."""
        for split_name, entry, n_seq, lo, hi in self._split_sizes():
            if hi - lo > 0:
                continue
            if self.blend is not None:
                why = (
                    f"split {self.split!r} gives it documents [{lo}, {hi}) of its {n_seq}. Cut "
                    "its long documents into more documents, set its weight to 0, or use "
                    "per-split blends"
                )
            else:
                why = f"{entry.prefix}.idx has no documents. Remove it or set its weight to 0"
            raise EmptySplitError(
                f"corpus {entry.name!r} (weight {entry.weight}) has 0 documents in the "
                f"{split_name} split: {why}. megatron-core's GPTDataset would loop forever "
                "building this blend."
            )

    def _split_sizes(self):
        """(split, entry, sequences in the dataset, begin, end) for every weighted use."""
        for entry in self.entries():
            if not Path(f"{entry.prefix}.idx").is_file():
                raise DataPrepError(f"{entry.prefix}.idx does not exist (manifest {self.path})")
        if self.blend is not None:
            for entry in self.blend:
                if entry.weight == 0:
                    continue
                n_seq = len(read_index(f"{entry.prefix}.idx").seq_lens)
                for split_name, rng in zip(
                    SPLIT_NAMES, split_ranges(self.split, n_seq), strict=True
                ):
                    if rng is not None:
                        yield split_name, entry, n_seq, rng[0], rng[1]
        else:
            for split_name, entries in self.blend_per_split.items():
                for entry in entries:
                    if entry.weight > 0:
                        n_seq = len(read_index(f"{entry.prefix}.idx").seq_lens)
                        yield split_name, entry, n_seq, 0, n_seq

    def split_documents(self) -> dict[str, dict[str, int]]:
        """Documents (sequences) each weighted corpus contributes to each split."""
        out: dict[str, dict[str, int]] = {}
        for split_name, entry, _, lo, hi in self._split_sizes():
            out.setdefault(split_name, {})[entry.name] = hi - lo
        return out

    # --------------------------------------------------------------------------------- io
    def to_json(self, base: Path) -> dict:
        def rel(p: Path) -> str:
            try:
                return str(p.relative_to(base))
            except ValueError:
                return str(p)

        def entries(es: list[BlendEntry]) -> list[dict]:
            return [{"prefix": rel(e.prefix), "weight": e.weight} for e in es]

        tok = load_tokenizer(self.tokenizer_model, self.tokenizer_kind)
        out = {
            "format": FORMAT,
            "tokenizer": {
                "model": rel(self.tokenizer_model),
                "kind": tok.kind,
                "sha256": tok.sha256,
                "vocab_size": tok.vocab_size,
                "eod": tok.eod,
                "pad": tok.pad,
            },
        }
        if self.blend is not None:
            out["blend"] = entries(self.blend)
            out["split"] = self.split
        else:
            out["blend_per_split"] = {s: entries(e) for s, e in self.blend_per_split.items()}
        return out

    def save(self, path: str | Path, *, check: bool = True) -> Path:
        """Write the manifest (after :meth:`check_nonempty` unless ``check=False``)."""
        path = Path(path).resolve()
        self.check_dataset_tokenizers()
        if check:
            self.check_nonempty()
        content = self.to_json(path.parent)
        if not (path.is_file() and read_json(path) == content):  # unchanged: leave it alone
            write_json(path, content)
        self.path = path
        return path


def check_split(split: object) -> str:
    """``split`` if it is a megatron split string such as ``"949,50,1"`` (up to three
    non-negative numbers, not all 0), else a ``DataPrepError`` naming it."""
    numbers = str(split).replace(" ", "").split(",") if isinstance(split, str) else []
    try:
        ok = 1 <= len(numbers) <= len(SPLIT_NAMES) and all(
            math.isfinite(float(x)) and float(x) >= 0 for x in numbers
        )
        ok = ok and bool(parse_split(split))
    except ValueError:
        ok = False
    if not ok:
        raise DataPrepError(
            f"split {split!r} is not a split string: give up to three non-negative numbers for "
            "train,valid,test, e.g. '949,50,1'"
        )
    return split


def _entries(raw, base: Path, where: str) -> list[BlendEntry]:
    if not isinstance(raw, list):
        raise DataPrepError(f"{where}: expected a list of {{prefix, weight}}")
    out = []
    for item in raw:
        if isinstance(item, dict):
            prefix, weight = item.get("prefix"), item.get("weight", 1.0)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            prefix, weight = item
        else:
            raise DataPrepError(f"{where}: bad entry {item!r}")
        if not isinstance(prefix, str) or not isinstance(weight, (int, float)):
            raise DataPrepError(f"{where}: bad entry {item!r}")
        out.append(BlendEntry((base / prefix).resolve(), float(weight)))
    return out


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest; relative paths are resolved against its directory."""
    path = Path(path).resolve()
    if not path.is_file():
        raise DataPrepError(f"manifest {path} does not exist")
    try:
        raw = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataPrepError(f"manifest {path} is not valid JSON (truncated?): {e}") from None
    if not isinstance(raw, dict):
        raise DataPrepError(f"manifest {path}: expected a JSON object")
    base = path.parent
    if raw.get("format") != FORMAT:
        raise DataPrepError(f"{path}: format is {raw.get('format')!r}, expected {FORMAT!r}")
    tok = raw.get("tokenizer") or {}
    if not isinstance(tok, dict) or not isinstance(tok.get("model"), str):
        raise DataPrepError(f"{path}: no tokenizer.model")
    kind = tok.get("kind", "sentencepiece")
    if kind not in ("sentencepiece", "hf"):
        raise DataPrepError(f"{path}: tokenizer.kind {kind!r} is not 'sentencepiece' or 'hf'")
    bps = raw.get("blend_per_split")
    if bps is not None and not isinstance(bps, dict):
        raise DataPrepError(f"{path}: blend_per_split must be an object of splits")
    return Manifest(
        tokenizer_model=(base / tok["model"]).resolve(),
        tokenizer_sha256=tok.get("sha256"),
        tokenizer_kind=kind,
        blend=_entries(raw["blend"], base, f"{path}: blend") if "blend" in raw else None,
        split=raw.get("split"),
        blend_per_split=(
            {s: _entries(e, base, f"{path}: {s}") for s, e in bps.items()} if bps else None
        ),
        path=path,
    )
