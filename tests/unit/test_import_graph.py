"""The project's import graph: no circles (imports inside functions count), every import points
down the layer order (:data:`LAYERS`), and the commands' front doors load no torch, megatron-core
or DeepSpeed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "pretrain", "data_prep")
HEAVY = ("torch", "megatron", "deepspeed", "transformers", "numpy")


def modules() -> dict[str, Path]:
    found = {}
    for top in PACKAGES:
        for f in (ROOT / top).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = f
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports anywhere in its body (functions included)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        package = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                r = resolve(t)
                # a package's own submodules and its parents are not edges of a circle
                if r and r != m and not m.startswith(r + ".") and not r.startswith(m + "."):
                    graph[m].add(r)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    graph = import_graph()
    assert sum(map(len, graph.values())) > 100  # the walk sees the real graph
    assert circles(graph) == []


def test_circle_detection_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


#: the layers, lowest first; a module may import its own layer and those below, never above
LAYERS = (
    ("data_prep.base",),  # torch-free base: errors, strict config, atomic writes, guards
    ("data_prep",),  # data preparation (no torch)
    ("model",),  # the model math and its megatron modules
    ("pretrain.faults", "pretrain.train_config"),  # torch-free pieces of the trainer's package
    ("pretrain.parallel",),
    ("pretrain.checkpoint",),
    ("pretrain.export", "pretrain.evaluation"),
    ("pretrain.training",),
    ("pretrain",),  # the commands: pretrain/<command>.py (nothing of the library imports them)
)


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of the most specific prefix that ``module`` falls under."""
    best = (-1, -1)
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                best = max(best, (len(prefix), i))
    if best[1] < 0:
        raise AssertionError(f"{module} is in no layer of LAYERS")
    return best[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every edge that points to a higher layer, as ``"a -> b"``."""
    return sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts if layer_of(t) > layer_of(m))


def test_layers_only_import_downward():
    """data_prep.base imports nothing of the project; data_prep nothing of model/pretrain;
    model nothing of pretrain; inside pretrain: parallel <- checkpoint <- export/evaluation <-
    training <- the commands."""
    graph = import_graph()
    assert upward_imports(graph) == []
    base = {t for m, ts in graph.items() if m.startswith("data_prep.base") for t in ts}
    assert all(t.startswith("data_prep.base") for t in base), base


def test_a_planted_upward_import_is_found():
    graph = import_graph()
    planted = {k: set(v) for k, v in graph.items()}
    planted["model.gpt"].add("pretrain.train_config")
    planted["data_prep.build"].add("model.model_config")
    planted["pretrain.checkpoint.manager"].add("pretrain.train")  # the library importing a command
    assert upward_imports(planted) == [
        "data_prep.build -> model.model_config",
        "model.gpt -> pretrain.train_config",
        "pretrain.checkpoint.manager -> pretrain.train",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "pretrain.train", "--help"],
        ["-m", "pretrain.evaluate", "--help"],
        ["-m", "pretrain.export_hf", "--help"],
        ["-m", "pretrain.import_hf", "--help"],
        ["-m", "pretrain.lm_eval", "--help"],
        ["-m", "pretrain.consolidate", "--help"],
        ["-m", "pretrain.universal", "--help"],
        ["-m", "pretrain.generate", "--help"],
        ["-m", "pretrain.train", "--config", "configs/demo.yaml", "model.no_such_key=1"],
        ["-m", "pretrain.train", "--config", "configs/demo.yaml", "model.num_layers=zero"],
    ],
)
def test_front_doors_load_nothing_heavy(argv):
    """--help and a config error answer without importing torch, megatron-core or DeepSpeed
    (seen by ``python -X importtime``, which lists every module imported)."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], cwd=ROOT, capture_output=True, text=True
    )
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in run.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "pretrain" in imported  # importtime did report our imports
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    if "--help" in argv:
        assert run.returncode == 0 and "usage:" in run.stdout
    else:
        assert run.returncode == 2
        messages = [ln for ln in run.stderr.splitlines() if not ln.startswith("import time:")]
        assert any("config error" in ln and "model." in ln for ln in messages), messages
