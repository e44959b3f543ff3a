"""Layer-vs-similarity PNG of over-smoothing curves, one line per evaluation JSON.

``python -m pretrain.evaluation.plot softmax.json twicing.json -o smoothing.png``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def plot_curves(curves: dict[str, list[float]], out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, values in curves.items():
        ax.plot(range(len(values)), values, marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("mean pairwise cosine similarity")
    ax.set_title(title or "over-smoothing of token representations")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", type=Path, help="evaluation JSON files")
    parser.add_argument("-o", "--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--labels", nargs="*", help="one label per file (default: file stems)")
    args = parser.parse_args(argv)
    labels = args.labels or [p.stem for p in args.results]
    if len(labels) != len(args.results):
        parser.error("give one label per results file")
    curves = {}
    for label, path in zip(labels, args.results, strict=True):
        data = json.loads(path.read_text())
        if not data.get("oversmoothing"):
            parser.error(f"{path} has no over-smoothing curve (evaluated with --no-oversmoothing?)")
        curves[label] = data["oversmoothing"]["layers"]
    print(plot_curves(curves, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
