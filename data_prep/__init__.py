"""Data preparation: WikiText and larger corpora → SentencePiece → Megatron indexed datasets.

Everything runs on CPU and never imports torch. Entry points: ``python -m data_prep --help``,
:func:`data_prep.prepare_wikitext.prepare_wikitext`, :func:`data_prep.build.tokenize_corpora`,
:class:`data_prep.sentencepiece_tokenizer.SentencePieceTokenizer`,
:func:`data_prep.manifest.load_manifest`, :func:`data_prep.wikitext.load_articles`. The torch-free
base every package shares (errors, strict configs, atomic writes, output guards) is
``data_prep.base``.
"""
