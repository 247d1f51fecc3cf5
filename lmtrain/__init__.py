"""lmtrain: pretraining long-context decoder language models with PyTorch Lightning."""

__version__ = "0.1.0"
