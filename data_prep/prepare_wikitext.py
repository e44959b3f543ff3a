"""One call from WikiText to a training-ready manifest (the demo's data step)."""

from __future__ import annotations

from pathlib import Path

from data_prep.build import output_prefix, tokenize_corpora
from data_prep.manifest import BlendEntry, Manifest
from data_prep.sources import Corpus, fingerprint_texts
from data_prep.splits import SPLIT_NAMES
from data_prep.tokenizer_kinds import load_tokenizer
from data_prep.train_tokenizer import TokenizerOptions, train_tokenizer
from data_prep.wikitext import articles, canonical_name, resolve_source


def prepare_wikitext(
    out_dir: str | Path,
    *,
    name: str = "wikitext-2",
    source: str | Path | None = None,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    workers: int = 2,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    tokenizer: str | Path | None = None,
) -> Path:
    """Tokenize WikiText ``name`` into ``{out_dir}/{name}_{split}_text_document.{bin,idx}`` and
    return the manifest path (``{out_dir}/{name}.manifest.json``, one blend per split).

    ``source``: None (the hub, then the shared copy), a hub-layout directory or a directory of
    original ``wiki.*`` files. The tokenizer (``{out_dir}/tokenizer/``) is trained on train,
    unless ``tokenizer`` names one to use (a sentencepiece ``.model`` or a Hugging Face tokenizer
    directory).
    Each article is one document; ``{prefix}.stats.json`` records articles, words and lines.
    Finished outputs are reused, so a second call with the same arguments does no work.
    """
    name = canonical_name(name)
    out_dir = Path(out_dir)
    src = resolve_source(name, source, cache_dir=cache_dir)
    splits = [s for s in SPLIT_NAMES if s in ("train", "valid") or src.has_split(s)]
    corpora: dict[str, Corpus] = {}
    for split in splits:
        arts = list(articles(src.rows(split)))
        docs = [a.text for a in arts]
        meta = {
            "source": src.describe(),
            "split": split,
            "articles": len(arts),
            "words": sum(a.words for a in arts),
            "lines": sum(a.lines for a in arts),
        }
        corpora[split] = Corpus(
            f"{name}_{split}",
            documents=lambda docs=docs: docs,
            fingerprint=fingerprint_texts(docs),
            meta=meta,
        )
    if tokenizer is not None:
        model = load_tokenizer(tokenizer).model_path
    else:
        options = TokenizerOptions(model_type=model_type, vocab_size=vocab_size)
        model = train_tokenizer(
            [corpora["train"]],
            out_dir / "tokenizer" / f"{name}.{model_type}{vocab_size}",
            options,
            progress=progress,
        )
    tokenize_corpora(list(corpora.values()), model, out_dir, workers=workers, progress=progress)
    manifest = Manifest(
        tokenizer_model=model.resolve(),
        blend_per_split={
            s: [BlendEntry(output_prefix(out_dir, c.name).resolve(), 1.0)]
            for s, c in corpora.items()
        },
    )
    return manifest.save(out_dir / f"{name}.manifest.json")
