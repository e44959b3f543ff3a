"""The torch-free base every package of the project imports: errors and exit codes
(``errors``), strict dataclass configs (``strict_config``), atomic writes (``atomic_write``),
the output-path guard (``output_guard``), the command wrapper (``run_command``) and the
third-party warning filters (``warning_filters``).

It lives inside ``data_prep``, the lowest of the three packages, so that ``data_prep`` (which
imports nothing of ``model`` or ``pretrain``), ``model`` (nothing of ``pretrain``) and
``pretrain`` can all import it; it imports nothing of the project itself.
"""
