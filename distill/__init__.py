"""distill: distillation-first model compression with PyTorch Lightning and Hydra."""

import importlib.util
import logging
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path


class _SkipCudaOnlyExtensions(logging.Filter):
    """torchao's CPU wheels warn at import about CUDA-only libraries they cannot load: noise on CPU."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load")


logging.getLogger("torchao").addFilter(_SkipCudaOnlyExtensions())

__version__ = "0.1.0"

# The project's layout keeps callbacks/, kernels/ and conf/ beside distill/, importable only as
# distill.callbacks, distill.kernels and distill.conf: PyPI owns the bare names (transformers imports
# Hugging Face's `kernels`), so those folders carry no __init__.py that could shadow them when a
# checkout's root is on sys.path. A wheel installs them inside this package (pyproject's package-dir);
# in a checkout they are adopted here, as namespace subpackages of this one package root.
SUBPACKAGE_FOLDERS = ("callbacks", "kernels", "conf")


def _adopt_checkout_folders() -> None:
    package = Path(__file__).resolve().parent
    for name in SUBPACKAGE_FOLDERS:
        folder = package.parent / name
        if (package / name).is_dir() or not folder.is_dir():
            continue  # an installed wheel: the folder is inside the package
        spec = ModuleSpec(f"{__name__}.{name}", None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        globals()[name] = module


_adopt_checkout_folders()
