"""The keys every layer shares: content digests and fingerprints that name cache folders, and the
extra keys a collated batch carries beside the model's inputs. One neutral module, so that data, stores,
the LightningModule and the tasks agree without importing one another."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


def digest(spec: Any) -> str:
    """16 hex digits of the sha256 of ``spec``'s JSON: equal specs (in order) give equal keys across processes."""
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of the tokenizer as loaded; take it before use, since calls change backend state."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{spec}".encode()).hexdigest()[:16]


def weights_fingerprint(model: nn.Module) -> str:
    """16 hex digits of the sha256 of every tensor of ``model``'s state, by name: equal weights, equal keys."""
    sha = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:16]


# A training batch's extra keys: which training example each row is (the stores' row), the perturbed
# copies' inputs under AUGMENTED_PREFIX and their fingerprint (distill.data.augment).
EXAMPLE_INDEX = "example_index"
AUGMENTED_PREFIX = "augmented_"
COPY_FINGERPRINT = "copy_fingerprint"


def pop_copies(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Take the perturbed copies out of a collated batch, as model inputs (``input_ids``, ...)."""
    keys = [key for key in batch if key.startswith(AUGMENTED_PREFIX)]
    return {key.removeprefix(AUGMENTED_PREFIX): batch.pop(key) for key in keys}
