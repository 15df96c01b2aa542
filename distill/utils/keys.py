"""Short content keys for cache folders and fingerprints."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest(spec: Any) -> str:
    """16 hex digits of the sha256 of ``spec``'s JSON: equal specs (in order) give equal keys across processes."""
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]
