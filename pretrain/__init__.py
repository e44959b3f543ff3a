"""twicing-lm pretraining: DeepSpeed ZeRO × megatron-core tensor parallel, with exact resume.

The top-level modules are the commands (``python -m pretrain.train``, ``evaluate``, ``export_hf``,
``consolidate``, ``universal``, ``local_launch``, ``demo``); the subpackages are the library:
``parallel`` (launch, process groups, DeepSpeed engine), ``checkpoint`` (layout, state, save/load,
resharding, reading), ``training`` (the loop), ``evaluation`` and ``export``.
"""
