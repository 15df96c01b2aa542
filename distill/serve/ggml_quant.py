"""llama.cpp's own K-quant quantizer (``ggml_quantize_chunk``), bound with ctypes from the xllamacpp wheel.

The ``gguf`` package has numpy quantizers for the 32-element block types only; Q4_K/Q5_K/Q6_K come from ggml's
C code, the very quantizer ``llama-quantize`` runs, found in the shared library that xllamacpp ships. The
library is located without importing xllamacpp, so a missing runtime is one line, not an import error.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

MISSING_RUNTIME = "llama.cpp runtime not installed: pip install 'distill[gguf]'"
LIBRARY = "xllamacpp.abi3.so"


def _library_path() -> Path | None:
    spec = importlib.util.find_spec("xllamacpp")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / LIBRARY
    return path if path.is_file() else None


def runtime_available() -> bool:
    """Whether llama.cpp's shared library (the ``gguf`` extra's xllamacpp) is installed."""
    return _library_path() is not None


@functools.cache
def _library() -> ctypes.CDLL:
    path = _library_path()
    if path is None:
        raise RuntimeError(MISSING_RUNTIME)
    library = ctypes.CDLL(str(path))
    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    library.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # enum ggml_type
        ctypes.POINTER(ctypes.c_float),
        ctypes.c_void_p,
        ctypes.c_int64,  # start (an element index)
        ctypes.c_int64,  # rows
        ctypes.c_int64,  # elements per row
        ctypes.POINTER(ctypes.c_float),  # importance matrix, none here
    ]
    library.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    library.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return library


def quantize_rows(matrix: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """``matrix`` (rows, row length) in ``qtype`` as ggml lays it out: uint8 of shape (rows, bytes per row)."""
    library = _library()
    if library.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"{qtype.name} needs an importance matrix, which distill's GGUF export does not compute")
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    rows, row_length = matrix.shape
    if row_length % block != 0:
        raise ValueError(f"{qtype.name} packs rows in blocks of {block}; a row of {row_length} does not divide")
    source = np.ascontiguousarray(matrix, dtype=np.float32)
    packed = np.empty((rows, row_length // block * block_bytes), dtype=np.uint8)
    written = library.ggml_quantize_chunk(
        int(qtype), source.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), packed.ctypes.data, 0, rows, row_length, None
    )
    if written != packed.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes of {qtype.name}, expected {packed.nbytes}")
    return packed
