"""twicing-lm pretraining: DeepSpeed ZeRO × megatron-core tensor parallel, with exact resume."""
