"""distill: distillation-first model compression with PyTorch Lightning and Hydra."""

import logging


class _SkipCudaOnlyExtensions(logging.Filter):
    """torchao's CPU wheels warn at import about CUDA-only libraries they cannot load: noise on CPU."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load")


logging.getLogger("torchao").addFilter(_SkipCudaOnlyExtensions())

__version__ = "0.1.0"
