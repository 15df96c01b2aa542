"""Models by reference: a hub id, a local Hugging Face folder, or a GGUF file.

A GGUF file (``*.gguf``, or a folder holding exactly one and no ``config.json``) is de-quantized
once by transformers' ``gguf_file=`` loader and saved with ``save_pretrained`` (safetensors, with
its tokenizer) under ``<cache_dir>/models/``, keyed by the file's sha256 and the dtype, so later
runs load it in about a second. The folder appears by an atomic rename under a file lock, so
concurrent jobs never read a half-written model. Hub ids and local folders pass through unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_cache_dir() -> Path:
    """``DISTILL_CACHE_DIR``, else ``~/.cache/distill`` (the default of ``paths.cache_dir``)."""
    return Path(os.environ.get("DISTILL_CACHE_DIR") or Path.home() / ".cache" / "distill").expanduser()


def gguf_file(reference: str) -> Path | None:
    """The GGUF file a reference names, ``None`` for hub ids and Hugging Face folders."""
    path = Path(reference).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {reference!r} does not exist")
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ValueError(f"model folder {reference!r} holds several GGUF files ({names}): name one of them")
    if not path.exists() and _looks_like_path(reference):
        raise FileNotFoundError(f"model path {reference!r} does not exist (neither a folder nor a GGUF file)")
    return None


def _looks_like_path(reference: str) -> bool:
    # A hub id is `owner/name`; anything absolute, relative-dotted or home-based is meant as a path.
    return reference.startswith(("/", "./", "../", "~")) or reference.count("/") > 1


@functools.cache
def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve(reference: str, dtype: str = "float32", cache_dir: str | Path | None = None) -> str:
    """A path or hub id that ``from_pretrained`` loads: GGUF files are converted (once) first."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
    source = gguf_file(reference)
    if source is None:
        return reference
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = root / "models" / f"{source.stem}-{file_digest(source)[:16]}-{dtype}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            _convert_gguf(source, target, dtype)
    return str(target)


def _convert_gguf(source: Path, target: Path, dtype: str) -> None:
    log.info("De-quantizing %s to %s (once; cached in %s)", source, dtype, target)
    scratch = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=DTYPES[dtype])
    # The loader marks the model as GGUF-quantized, which save_pretrained refuses; its weights are
    # already plain tensors, so a fresh model of the same config takes them as they are.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    os.replace(scratch, target)


def load_tokenizer(reference: str, cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model reference (hub id, folder or GGUF file)."""
    return AutoTokenizer.from_pretrained(resolve(reference, cache_dir=cache_dir))


def load_causal_lm(reference: str, dtype: str = "float32", cache_dir: str | Path | None = None) -> PreTrainedModel:
    """A causal LM by reference, in ``dtype``, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(resolve(reference, dtype, cache_dir), dtype=DTYPES[dtype]).eval()
