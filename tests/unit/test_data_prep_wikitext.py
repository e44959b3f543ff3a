"""WikiText: articles and word counts from the original files and a local hub-layout copy."""

from __future__ import annotations

import time

import pytest
from conftest import need_shared

from data_prep.base.errors import DataPrepError
from data_prep.hub import hub_reachable, load_dataset_split
from data_prep.wikitext import articles, export_hub_layout, load_articles, resolve_source

# SOURCES.md totals and the published article counts
KNOWN = {
    ("wikitext-2", "train"): (600, 2_051_910, 36_718),
    ("wikitext-2", "valid"): (60, 213_886, 3_760),
    ("wikitext-103", "valid"): (60, 213_886, 3_760),
    ("wikitext-103-raw", "valid"): (60, 213_886, 3_760),
}


@pytest.mark.parametrize(("name", "split"), list(KNOWN))
def test_original_files_give_known_articles_and_words(name, split):
    root = need_shared("data", "wikitext")
    arts = load_articles(name, split, source=root)
    assert (len(arts), sum(a.words for a in arts), sum(a.lines for a in arts)) == KNOWN[name, split]
    suffix = "raw" if name.endswith("raw") else "tokens"
    original = (root / name / f"wiki.{split}.{suffix}").read_bytes().decode()
    assert "".join(a.text for a in arts) == original  # nothing lost or reordered
    assert arts[0].text.startswith(f" \n = {arts[0].title} = \n")
    first = {"train": "Valkyria Chronicles III", "valid": "Homarus gammarus"}[split]
    assert arts[0].title == first


def test_table_legend_headings_are_not_articles():
    rows = ["", " = A = \n", "", " text \n", " = Played , W = \n", " Wins , L \n", "", " = B = \n"]
    assert [a.title for a in articles(rows)] == ["A", "B"]
    assert [a.words for a in articles(rows)] == [12, 3]


def test_local_hub_layout_loads_with_the_same_call_and_same_articles(tmp_path):
    root = need_shared("data", "wikitext")
    files = resolve_source("wikitext-2", root)
    raw_files = resolve_source("wikitext-103-raw", root)
    hub = tmp_path / "hub"
    export_hub_layout({s: files.rows(s) for s in ("train", "valid")}, hub, "wikitext-2")
    export_hub_layout({"valid": raw_files.rows("valid")}, hub, "wikitext-103-raw-v1")

    import datasets

    ds = datasets.load_dataset(str(hub), "wikitext-2-v1", split="validation", cache_dir=tmp_path)
    assert ds.column_names == ["text"] and len(ds) == 3760
    assert ds["text"][:3] == ["", " = Homarus gammarus = \n", ""]  # the hub's row convention

    for name, split in [
        ("wikitext-2", "train"),
        ("wikitext-2", "valid"),
        ("wikitext-103-raw", "valid"),
    ]:
        local = resolve_source(name, hub, cache_dir=tmp_path)
        assert local.kind == "hub" and local.location == str(hub)
        want = load_articles(name, split, source=root)
        got = list(articles(local.rows(split)))
        assert got == want
    assert resolve_source("wikitext-2", hub).has_split("test") is False


def test_offline_hub_call_fails_fast_and_says_how_to_pass_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("TWICING_SHARED", str(tmp_path))  # no shared copy to fall back to
    t0 = time.perf_counter()
    with pytest.raises(DataPrepError, match="local copy") as err:
        resolve_source("wikitext-103-raw", None, cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 15
    assert "--source" in str(err.value) and "wikitext-103-raw-v1" in str(err.value)


def test_unreachable_hub_fails_fast_even_without_offline_env(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    if hub_reachable():
        pytest.skip("the hub is reachable from here")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    t0 = time.perf_counter()
    with pytest.raises(DataPrepError, match="cannot be reached"):
        load_dataset_split("Salesforce/wikitext", "wikitext-2-v1", "test", cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 15  # instead of ~25 s of retries
    assert datasets.config.HF_HUB_OFFLINE is False  # offline mode was only temporary


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(DataPrepError, match="not a directory"):
        resolve_source("wikitext-2", tmp_path / "missing")
    with pytest.raises(DataPrepError, match="neither the hub's parquet layout"):
        resolve_source("wikitext-2", tmp_path)
    with pytest.raises(DataPrepError, match="unknown WikiText"):
        resolve_source("wikitext-5", tmp_path)
