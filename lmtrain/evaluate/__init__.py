"""Evaluation beyond the training loop: perplexity against context length (`eval-length`)."""
