"""llama.cpp's own K-quant quantizer (``ggml_quantize_chunk``), bound with ctypes from the xllamacpp wheel.

The ``gguf`` package has numpy quantizers for the 32-element block types only; Q4_K/Q5_K/Q6_K come from ggml's
C code, the very quantizer ``llama-quantize`` runs, found in the shared library that xllamacpp ships. The
library is :func:`distill.serve.llamacpp.runtime`'s (typed there); a missing runtime is one line.
"""

from __future__ import annotations

import ctypes

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from distill.serve.llamacpp import MissingRuntime, runtime

MISSING_RUNTIME = "llama.cpp runtime not installed: pip install 'distill[gguf]'"


def runtime_available() -> bool:
    """Whether llama.cpp's library (the ``gguf`` extra's xllamacpp, at the pinned version) is installed."""
    try:
        runtime()
    except MissingRuntime:
        return False
    return True


def _library() -> ctypes.CDLL:
    try:
        return runtime()
    except MissingRuntime as error:
        raise RuntimeError(MISSING_RUNTIME) from error


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
