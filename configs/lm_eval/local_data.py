"""Offline datasets of the shipped lm-eval tasks (``custom_dataset`` of ``twicing_*.yaml``).

Both read the local WikiText-2 validation articles through ``data_prep.wikitext`` — the very
text ``python -m pretrain.evaluate --data wikitext-2-raw:valid`` scores. The copy is
``source=DIR`` (``--metadata '{"source": "DIR"}'``), else ``$TWICING_WIKITEXT``, else
``$TWICING_SHARED/data/wikitext`` or ``../shared/data/wikitext`` when present, else the hub.
"""

from __future__ import annotations

import os
import random
from typing import Any


def _articles(source: str | None) -> list[str]:
    from data_prep.wikitext import load_articles, shared_wikitext_dir

    source = source or os.environ.get("TWICING_WIKITEXT")
    if source is None and shared_wikitext_dir().is_dir():
        source = str(shared_wikitext_dir())
    return [a.text for a in load_articles("wikitext-2-raw", "valid", source)]


def wikitext_documents(source: str | None = None, **_metadata: Any):
    """lm-eval's ``wikitext_document_level`` layout: one row per article, column ``page``."""
    import datasets

    pages = [{"page": text} for text in _articles(source)]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(pages)})


def wikitext_choices(
    source: str | None = None,
    context_words: int = 16,
    choice_words: int = 8,
    choices: int = 4,
    documents: int = 200,
    seed: int = 1234,
    **_metadata: Any,
):
    """Which continuation follows? Each paragraph line of ≥ ``context_words + choice_words``
    words gives a context (its first ``context_words`` words), the true next ``choice_words``
    words and ``choices − 1`` distractors: the same span of other paragraphs (seeded)."""
    import datasets

    lines = [
        line.split()
        for text in _articles(source)
        for line in text.split("\n")
        if not line.strip().startswith("=") and len(line.split()) >= context_words + choice_words
    ]
    spans = [" ".join(w[context_words : context_words + choice_words]) for w in lines]
    rng = random.Random(seed)
    rows = []
    for i, words in enumerate(lines[:documents]):
        others = rng.sample([j for j in range(len(lines)) if spans[j] != spans[i]], choices - 1)
        options = [spans[i], *(spans[j] for j in others)]
        rng.shuffle(options)
        rows.append(
            {
                "context": " ".join(words[:context_words]),
                "choices": options,
                "label": options.index(spans[i]),
            }
        )
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})
