"""Models by reference: a hub id, a local Hugging Face folder, or a GGUF file.

A GGUF file (``*.gguf``, or a folder holding exactly one and no ``config.json``) is de-quantized
once by transformers' ``gguf_file=`` loader and saved with ``save_pretrained`` (safetensors, with
its tokenizer) under ``<cache_dir>/models/``, keyed by the file's sha256 and the dtype, so later
runs load it in about a second. The folder appears by an atomic rename under a file lock, so
concurrent jobs never read a half-written model. Hub ids and local folders pass through unchanged.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
import struct
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from distill.utils.scratch import written_whole

log = logging.getLogger(__name__)
REFETCH = "download or export it again"
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
    target = converted_path(source, dtype, cache_dir)
    if (target / "config.json").is_file():
        return str(target)
    gguf_elements(source)  # a truncated file fails here, naming itself, before a lock file is made for it
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            _convert_gguf(source, target, dtype)
    return str(target)


def converted_path(source: Path, dtype: str, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`resolve` keeps the de-quantized copy of the GGUF file ``source``."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / "models" / f"{source.stem}-{file_digest(source)[:16]}-{dtype}"


def converted_copy(source: Path) -> Path | None:
    """A de-quantized copy of the GGUF file ``source`` already in the default cache, in any dtype, else
    ``None``. Its name holds the file's digest, so it was made from this very file: the file is whole, and
    the copy's ``config.json`` is its config, read in milliseconds where parsing the GGUF takes seconds."""
    pattern = f"{glob.escape(source.stem)}-{file_digest(source)[:16]}-*"
    found = sorted(
        folder for folder in (default_cache_dir() / "models").glob(pattern) if (folder / "config.json").is_file()
    )
    return found[0] if found else None


def gguf_elements(path: Path) -> int:
    """The number of weights in the GGUF file ``path``; a file cut short or not GGUF is refused in one line
    naming it (transformers' loader would fail with a bare ``struct.error`` or a reshape error)."""
    stat = path.stat()
    return _gguf_elements(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _gguf_elements(path: Path, size: int, _mtime_ns: int) -> int:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        end = max((int(tensor.data_offset) + int(tensor.n_bytes) for tensor in reader.tensors), default=0)
    except (ValueError, IndexError, KeyError, EOFError, struct.error) as error:
        raise ValueError(f"GGUF file {str(path)!r} is truncated or corrupt ({error}): {REFETCH}") from None
    if end > size:
        raise ValueError(f"GGUF file {str(path)!r} is truncated ({size} bytes; its tensors end at {end}): {REFETCH}")
    return sum(int(tensor.n_elements) for tensor in reader.tensors)


def _convert_gguf(source: Path, target: Path, dtype: str) -> None:
    log.info("De-quantizing %s to %s (once; cached in %s)", source, dtype, target)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=DTYPES[dtype])
    # The loader marks the model as GGUF-quantized, which save_pretrained refuses; its weights are
    # already plain tensors, so a fresh model of the same config takes them as they are.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.load_state_dict(loaded.state_dict())
    with written_whole(target) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)


def load_tokenizer(reference: str, cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model reference (hub id, folder or GGUF file)."""
    return AutoTokenizer.from_pretrained(resolve(reference, cache_dir=cache_dir))


def load_causal_lm(reference: str, dtype: str = "float32", cache_dir: str | Path | None = None) -> PreTrainedModel:
    """A causal LM by reference, in ``dtype``, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(resolve(reference, dtype, cache_dir), dtype=DTYPES[dtype]).eval()
