"""Blends: megatron-core's BlendedMegatronDatasetBuilder draws corpora in the manifest's
proportions; corpora that would leave a split empty are refused before megatron-core hangs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from workers.data_prep_common import corpus_docs, write_jsonl

from data_prep.base.errors import EmptySplitError
from data_prep.build import output_prefix, tokenize_corpora
from data_prep.indexed import optimal_dtype, write_dataset
from data_prep.manifest import BlendEntry, Manifest, load_manifest
from data_prep.sources import Corpus
from data_prep.splits import split_matrix, split_ranges
from data_prep.train_tokenizer import TokenizerOptions, train_tokenizer

SLICES = {  # corpus -> (documents, characters per document at most)
    "wiki_vital": (600, None),
    "python_docs": (40, 20000),
    "postgres_docs": (60, 20000),
    "kjv": (66, None),  # 66 long books: "949,50,1" leaves its test split empty
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    files = {}
    for name, (n, cut) in SLICES.items():
        files[name] = write_jsonl(root / f"{name}.jsonl", corpus_docs(name, n, cut))
    corpora = [Corpus(name, paths=[str(path)]) for name, path in files.items()]
    model = train_tokenizer(
        corpora[:3], root / "tok", TokenizerOptions(vocab_size=1000, input_sentence_size=20000)
    )
    tokenize_corpora(corpora, model, root, workers=2, progress=False)
    return root, model


def _build(manifest: Manifest, sizes: list[int | None]):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    manifest.check_nonempty()
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=64,
        tokenizer=manifest.tokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        mmap_bin_files=False,
        **manifest.gpt_dataset_kwargs(),
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def test_split_arithmetic_is_megatron_cores(data):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    for split in ["949,50,1", "98,2,0", "1", "90,10", "1,1,1", "0.7,0.2,0.1", "100,0,0", "3,0,1"]:
        assert split_matrix(split) == convert_split_vector_to_split_matrix(
            parse_and_normalize_split(split)
        )
        for n in (1, 2, 3, 7, 20, 66, 199, 1000, 12345):
            want = [
                None if m is None else (int(round(m[0] * float(n))), int(round(m[1] * float(n))))
                for m in split_matrix(split)
            ]
            assert split_ranges(split, n) == want


def test_weighted_blend_draws_corpora_in_proportion(data):
    root, model = data
    weights = {"wiki_vital": 0.5, "python_docs": 0.3, "postgres_docs": 0.2, "kjv": 0.0}
    blend = [BlendEntry(output_prefix(root, n), w) for n, w in weights.items()]
    path = Manifest(model, blend=blend, split="90,8,2").save(root / "mix.manifest.json")
    manifest = load_manifest(path)
    kwargs = manifest.gpt_dataset_kwargs()
    assert kwargs["split"] == "90,8,2" and kwargs["blend"][1] == [0.5, 0.3, 0.2]  # kjv dropped

    sizes = [3000, 300, 60]
    datasets = _build(manifest, sizes)
    eod = manifest.tokenizer().eod
    bins = [output_prefix(root, n).with_suffix(".bin").read_bytes() for n in list(weights)[:3]]
    checked = 0
    for split, blended in enumerate(datasets):
        assert len(blended) == sizes[split]
        frac = np.bincount(blended.dataset_index, minlength=3) / len(blended)
        assert np.abs(frac - [0.5, 0.3, 0.2]).max() <= 2 / len(blended)
        for i in range(0, len(blended), max(1, len(blended) // 40)):  # the samples' content
            tokens = blended[i]["tokens"].numpy()
            run = tokens[: np.argmax(tokens == eod)] if (tokens == eod).any() else tokens
            if len(run) >= 8:
                owner = [run.astype(np.uint16).tobytes() in b for b in bins]
                assert owner.index(True) == blended.dataset_index[i]
                checked += 1
    assert checked > 60


def test_per_split_blend_builds(data):
    root, model = data
    per_split = {
        "train": [
            BlendEntry(output_prefix(root, "wiki_vital"), 2.0),
            BlendEntry(output_prefix(root, "python_docs"), 1.0),
        ],
        "valid": [BlendEntry(output_prefix(root, "postgres_docs"), 1.0)],
    }
    manifest = load_manifest(Manifest(model, blend_per_split=per_split).save(root / "ps.json"))
    assert manifest.gpt_dataset_kwargs()["blend_per_split"][2] is None
    train, valid, test = _build(manifest, [600, 50, None])
    assert len(train) == 600 and len(valid) >= 50 and test is None
    frac = np.bincount(train.dataset_index) / len(train)
    assert np.abs(frac - [2 / 3, 1 / 3]).max() <= 2 / len(train)


def test_corpus_with_an_empty_split_is_refused(data, tmp_path):
    root, model = data
    blend = [BlendEntry(output_prefix(root, n), 1.0) for n in ("wiki_vital", "kjv")]
    manifest = Manifest(model, blend=blend, split="949,50,1")
    with pytest.raises(EmptySplitError, match=r"'kjv' .* 0 documents in the test split") as err:
        manifest.check_nonempty()
    assert "[66, 66) of its 66" in str(err.value) and "loop forever" in str(err.value)
    with pytest.raises(EmptySplitError):
        manifest.save(tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()
    # weight 0 for the long-document corpus: accepted
    Manifest(model, blend=[blend[0], BlendEntry(blend[1].prefix, 0.0)], split="949,50,1").save(
        tmp_path / "ok.json"
    )
    # a per-split blend naming a dataset without documents
    empty = tmp_path / "empty_text_document"
    write_dataset(empty, np.zeros(0, np.uint16), np.zeros(0, np.int64), optimal_dtype(1000))
    per_split = {"train": blend[:1], "valid": [BlendEntry(empty, 1.0)]}
    with pytest.raises(EmptySplitError, match=r"'empty' .* 0 documents in the valid split"):
        Manifest(model, blend_per_split=per_split).check_nonempty()


def test_cli_blend_and_check(data, tmp_path, capsys):
    from data_prep.cli import main

    root, model = data
    wiki, kjv = output_prefix(root, "wiki_vital"), output_prefix(root, "kjv")
    out = tmp_path / "m.json"
    args = ["blend", "--tokenizer", str(model), "--out", str(out), "--split", "949,50,1"]
    assert main([*args, "--corpus", f"{wiki}:0.7", f"{kjv}:0.3"]) == 2
    assert "'kjv'" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--corpus", f"{wiki}:0.7", f"{kjv}:0"]) == 0
    capsys.readouterr()
    assert main(["check", str(out), "--ids"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documents"]["test"] == {"wiki_vital": 1}  # [round(.999 * 600), 600)
