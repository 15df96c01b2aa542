"""distill: distillation-first model compression with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
