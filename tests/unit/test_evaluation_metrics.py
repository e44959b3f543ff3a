"""Evaluation building blocks on constructed inputs: window protocols, the over-smoothing
metric, word swaps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def test_sliding_window_with_stride_equal_to_length_is_the_segment_protocol():
    from pretrain.evaluation.perplexity import windows

    for n in (2, 10, 64, 65, 129, 1000):
        ws = windows(n, 64, 64)
        assert [(w.begin, w.end) for w in ws] == [
            (b, min(b + 64, n - 1)) for b in range(0, n - 1, 64)
        ]
        assert all(w.skip == 0 for w in ws)
        scored = [t for w in windows(n, 64, 16) for t in range(w.first_scored, w.end + 1)]
        assert scored == list(range(1, n))  # every target exactly once


def test_cosine_similarity_metric_on_constructed_states():
    from pretrain.evaluation.oversmoothing import mean_offdiag_cosine

    v = torch.randn(8)
    assert mean_offdiag_cosine(v.expand(5, 8).clone()) == pytest.approx(1.0, abs=1e-12)
    assert mean_offdiag_cosine(3.0 * torch.eye(6)) == pytest.approx(0.0, abs=1e-12)
    h = torch.randn(7, 5)
    u = F.normalize(h.double(), dim=-1)
    explicit = ((u @ u.T).sum() - 7) / 42
    assert mean_offdiag_cosine(h) == pytest.approx(float(explicit), rel=1e-12)
    mixed = torch.cat([torch.eye(2, 8) * 5, v.expand(4, 8)])
    assert mean_offdiag_cosine(mixed, skip=2) == pytest.approx(1.0, abs=1e-12)


def test_word_swaps_are_deterministic_per_seed():
    from pretrain.evaluation.texts import EvalText, swap_words

    text = EvalText("t", [" the quick brown fox \n jumps over\n", " the lazy dog .\n"] * 20)
    a, b = swap_words(text, 0.3, seed=5), swap_words(text, 0.3, seed=5)
    c = swap_words(text, 0.3, seed=6)
    assert a.documents == b.documents and a.swaps == b.swaps and a.swaps != c.swaps
    assert a.words == text.words and a.lines == text.lines and 0 < len(a.swaps) < text.words
    for doc, idx, old, new in a.swaps:
        assert (
            text.documents[doc].split()[idx] == old and a.documents[doc].split()[idx] == new != old
        )
    assert swap_words(text, 0.0, 1).documents == text.documents
