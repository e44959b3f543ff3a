"""Incremental decoding for every attention variant, on megatron-core's own inference plumbing.

``context`` is the cache (megatron's ``StaticInferenceContext`` plus per-layer extra caches and
left-padding); ``sampling`` turns logits into tokens; ``generate`` is the prefill + decode loop.
Each variant's decode rule lives beside its math in ``model.attention.<variant>``.
"""
