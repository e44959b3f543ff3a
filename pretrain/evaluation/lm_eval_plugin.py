"""Makes the stock ``lm_eval`` command know ``--model twicing``.

lm-evaluation-harness 0.4.13 finds models only in its own registry: nothing outside it is
imported before ``--model`` is resolved (no entry-point discovery in that release). So the
install step (``python -m pretrain.lm_eval --install-plugin``, run by ``make install``) writes a
one-line ``twicing_lm_eval.pth`` into site-packages that calls :func:`activate` at interpreter
start. That only adds an import hook (no torch, no lm-eval import): when ``lm_eval.api.registry``
is first imported, ``twicing`` is registered lazily as
``pretrain.evaluation.lm_eval_adapter:TwicingLM``, so a Python that never runs lm-eval pays
nothing, and lm-eval imports the adapter only when ``--model twicing`` is asked for.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import sysconfig
from pathlib import Path

TARGET = "lm_eval.api.registry"
MODEL = ("twicing", "pretrain.evaluation.lm_eval_adapter:TwicingLM")
PTH_NAME = "twicing_lm_eval.pth"
#: site.py runs a .pth line that starts with ``import``; a missing twicing-lm (uninstalled) must
#: not print a traceback at every interpreter start, hence the guarded ``exec``
PTH_LINE = (
    'import sys; exec("try:\\n from pretrain.evaluation.lm_eval_plugin import activate\\n'
    ' activate()\\nexcept ImportError:\\n pass")\n'
)


def register(registry_module) -> None:
    """Register ``twicing`` in lm-eval's model registry (lazily, by import path)."""
    name, target = MODEL
    if name not in registry_module.model_registry:
        registry_module.model_registry.register(name, target=target)


class _RegistryHook(importlib.abc.MetaPathFinder):
    """Finds ``lm_eval.api.registry`` like the normal path finder, registering after it runs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module) -> None:
            run(module)
            register(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def activate() -> None:
    """Install the hook (once); register at once if lm-eval's registry is already imported."""
    if TARGET in sys.modules:
        register(sys.modules[TARGET])
    elif not any(isinstance(f, _RegistryHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryHook())


def install(site_dir: str | Path | None = None) -> Path:
    """Write the ``.pth`` file into ``site_dir`` (default: this interpreter's site-packages)."""
    path = Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME
    path.write_text(PTH_LINE)
    return path
