"""prepare_wikitext: WikiText-2 → tokenizer → indexed datasets → manifest → megatron GPTDataset."""

from __future__ import annotations

import json
import time

import numpy as np
from conftest import need_shared

from data_prep.manifest import load_manifest
from data_prep.prepare_wikitext import prepare_wikitext
from data_prep.wikitext import load_articles


def _outputs(out):
    return {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_prepare_wikitext_end_to_end_and_idempotent(tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    shared = need_shared("data", "wikitext", "wikitext-2")
    out = tmp_path / "wt2"
    # source=None: the hub is unreachable here (tests run offline), so the shared copy is used
    path = prepare_wikitext(out, vocab_size=2000, progress=False, cache_dir=tmp_path / "hf")
    assert path == out / "wikitext-2.manifest.json"
    manifest = load_manifest(path)
    tok = manifest.tokenizer()
    assert (
        tok.vocab_size == 2000
        and tok.eod == tok.sp.eos_id()
        and tok.sha256 in str(tok.unique_identifiers)
    )
    assert tok.metadata["corpus"][0]["name"] == "wikitext-2_train"

    for split, (n_articles, words) in {"train": (600, 2_051_910), "valid": (60, 213_886)}.items():
        prefix = manifest.blend_per_split[split][0].prefix
        info = json.loads(prefix.with_name(f"{prefix.name}.stats.json").read_text())
        assert (info["articles"], info["documents"], info["words"]) == (
            n_articles,
            n_articles,
            words,
        )
    assert not (out / "wikitext-2_test_text_document.bin").exists()  # no test split shared

    # every valid article comes back exactly (the default tokenizer is lossless)
    articles = load_articles("wikitext-2", "valid", source=shared.parent)
    valid = IndexedDataset(str(manifest.blend_per_split["valid"][0].prefix))
    assert len(valid) == 60
    for i in (0, 1, 30, 59):
        ids = valid[i]
        assert ids[-1] == tok.eod and tok.decode(ids[:-1]) == articles[i].text

    # the training side's path: manifest → GPTDatasetConfig → BlendedMegatronDatasetBuilder
    manifest.check_nonempty()
    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=128,
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        **manifest.gpt_dataset_kwargs(),
    )
    train, val, test = BlendedMegatronDatasetBuilder(
        GPTDataset, [100, 20, None], lambda: True, config
    ).build()
    assert test is None and len(train) >= 100 and len(val) >= 20
    sample = train[0]
    assert sample["tokens"].shape[0] == 128 and int(sample["tokens"].max()) < tok.vocab_size
    assert np.array_equal(sample["labels"][:-1].numpy(), sample["tokens"][1:].numpy())

    before = _outputs(out)
    t0 = time.perf_counter()
    assert prepare_wikitext(out, vocab_size=2000, progress=False) == path
    assert time.perf_counter() - t0 < 20
    assert _outputs(out) == before  # nothing was rewritten
