"""Attention variants: one file each (its pure math beside its megatron-core module).

``registry`` names them (torch-free, read by config validation); ``backend`` is the one kernel
seam (flash-attn / SDPA / torch's CPU primitives); ``base`` is the core-attention contract.
Import what you need from the submodule that defines it.
"""
