"""Evaluation text: documents, their word/byte counts, token streams, and seeded word swaps."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from data_prep.base.errors import ConfigError, DataPrepError

_WORDS = re.compile(r"(\s+)")


@dataclass
class EvalText:
    """Documents to score; ``name`` says where they came from."""

    name: str
    documents: list[str]
    swaps: list[tuple[int, int, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.documents = [d for d in self.documents if d.strip()]
        if not self.documents:
            raise ConfigError(f"evaluation text {self.name!r} is empty (no non-blank document)")

    @property
    def words(self) -> int:
        """Whitespace-separated words of the original text (the word-level ppl denominator)."""
        return sum(len(d.split()) for d in self.documents)

    @property
    def bytes(self) -> int:
        return sum(len(d.encode("utf-8")) for d in self.documents)

    @property
    def lines(self) -> int:
        return sum(d.count("\n") for d in self.documents)

    @property
    def line_ends(self) -> int:
        """End-of-line symbols of the Transformer-XL / lmtool convention: one per line of the
        text (a last line without ``\\n`` counts too), blank lines included."""
        return sum(d.count("\n") + (not d.endswith("\n")) for d in self.documents)

    def token_stream(self, tokenizer) -> list[int]:
        """``[eod] + Σ (encode(doc) + [eod])``: every token of every document (and each document's
        end) is a prediction target, each document read after an EOD as in training."""
        stream = [tokenizer.eod]
        for ids in tokenizer.encode_batch(self.documents):
            stream.extend(ids)
            stream.append(tokenizer.eod)
        return stream


def load_text(
    spec: str,
    *,
    wikitext_source: str | None = None,
    text_field: str = "text",
    text_unit: str = "file",
    max_documents: int | None = None,
) -> EvalText:
    """``wikitext-2:valid`` / ``wikitext-103-raw:test`` (articles, via data_prep's WikiText
    sources) or any data_prep corpus spec (files/globs of .jsonl/.parquet/.txt, ``hf:…``)."""
    from data_prep.sources import parse_corpus
    from data_prep.wikitext import load_articles

    try:
        name, _, split = spec.partition(":")
        if name.startswith("wikitext-") and split in ("train", "valid", "test"):
            docs = [a.text for a in load_articles(name, split, wikitext_source)]
        else:
            docs = list(parse_corpus(spec, text_field=text_field, text_unit=text_unit).texts())
    except DataPrepError as e:
        raise ConfigError(f"evaluation data {spec!r}: {e}") from None
    return EvalText(spec, docs[:max_documents] if max_documents else docs)


def swap_words(text: EvalText, rate: float, seed: int) -> EvalText:
    """Seeded random word substitution ("word swap") at ``rate``.

    Exactly: documents are split on whitespace runs (kept verbatim); the word vocabulary is the
    sorted set of distinct words of ``text``; one ``random.Random(seed)`` walks the documents and
    words in order and, for each word, draws ``u = random()``; if ``u < rate`` the word is replaced
    by ``vocab[randrange(len(vocab))]``, redrawn while equal to the original. Word, line and
    document counts are unchanged, so word-level perplexities stay comparable across rates.
    ``EvalText.swaps`` lists every ``(document, word index, old, new)``.
    """
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"swap rate {rate} is not in [0, 1]")
    vocab = sorted({w for d in text.documents for w in d.split()})
    rng = random.Random(seed)
    docs, swaps = [], []
    for di, doc in enumerate(text.documents):
        parts = _WORDS.split(doc)
        wi = 0
        for pi, part in enumerate(parts):
            if not part or part.isspace():
                continue
            if rng.random() < rate and len(vocab) > 1:
                new = part
                while new == part:
                    new = vocab[rng.randrange(len(vocab))]
                swaps.append((di, wi, part, new))
                parts[pi] = new
            wi += 1
        docs.append("".join(parts))
    return EvalText(f"{text.name} (word swaps p={rate}, seed={seed})", docs, swaps)
