"""Perplexity evaluation of training checkpoints (entry point: ``python -m pretrain.evaluate``)."""
