"""Where the configs are, for every entry point's ``@hydra.main``."""

from __future__ import annotations

import distill.conf

# The configs' folder, absolute: conf/ beside distill/ in a checkout, distill/conf in a wheel (distill/__init__.py).
# Hydra would resolve a relative path against the decorated function's module, which differs between
# `python -m distill.<entry>` (a file) and the console scripts (a package).
CONFIG_DIR = next(iter(distill.conf.__path__))
