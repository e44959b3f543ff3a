"""megatron-core 0.16.1's split arithmetic, reimplemented (no torch import) for exact checks.

``BlendedMegatronDatasetConfig`` parses ``split`` ("949,50,1") with ``parse_and_normalize_split``
and ``convert_split_vector_to_split_matrix``; the builder then gives split ``i`` of a dataset with
``n`` sequences the range ``[int(round(lo * n)), int(round(hi * n)))``.
"""

from __future__ import annotations

import re

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """``"949,50,1"`` → normalised weights (``parse_and_normalize_split``)."""
    vector = [float(x) for x in re.findall(r"[.0-9]+", split)]
    vector += [0.0] * (len(SPLIT_NAMES) - len(vector))
    if len(vector) != len(SPLIT_NAMES) or any(x < 0 for x in vector) or sum(vector) <= 0:
        raise ValueError(f"bad split string {split!r}")
    w = np.array(vector, dtype=np.float64)
    return (w / np.sum(w)).tolist()


def split_matrix(split: str) -> list[tuple[float, float] | None]:
    """Book-ends per split, None for an empty split (``convert_split_vector_to_split_matrix``)."""
    ends = [0.0]
    for x in parse_split(split):
        ends.append(ends[-1] + x)
    return [(lo, hi) if hi > lo else None for lo, hi in zip(ends[:-1], ends[1:], strict=True)]


def split_ranges(split: str, num_elements: int) -> list[tuple[int, int] | None]:
    """The ``[begin, end)`` sequence range of each split for a dataset of ``num_elements``."""
    out: list[tuple[int, int] | None] = []
    for bookend in split_matrix(split):
        if bookend is None:
            out.append(None)
        else:
            lo, hi = bookend
            out.append((int(round(lo * float(num_elements))), int(round(hi * float(num_elements)))))
    return out
