"""llama.cpp in this process: a GGUF file's tokens, logits, greedy continuation and held-out perplexity.

Why ctypes and not llama.cpp's server: the server answers log-probabilities only for the tokens it generates
(llama.cpp has no prompt/echo log-probabilities), and perplexity needs every position's logits, computed by the
runtime that serves the file. The ``xllamacpp`` wheel (the ``gguf`` extra) ships llama.cpp's C library with its
public API exported; the structures below mirror ``llama.h`` of the pinned wheel (``XLLAMACPP_VERSION``): a
different wheel could lay them out differently, so :func:`runtime` refuses any other version. Timed serving goes
through llama.cpp's own server (:mod:`distill.serve.llamacpp_server`).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import torch

from distill.utils.references import gguf_elements

XLLAMACPP_VERSION = "2026.10.11549"
INSTALL_HINT = "pip install 'distill[gguf]'"


class MissingRuntime(ImportError):
    """The llama.cpp runtime (the ``xllamacpp`` wheel) is not installed, or not the pinned version."""


class _ModelParams(ctypes.Structure):
    _fields_ = [
        ("devices", ctypes.c_void_p),
        ("tensor_buft_overrides", ctypes.c_void_p),
        ("n_gpu_layers", ctypes.c_int32),
        ("split_mode", ctypes.c_int),
        ("load_mode", ctypes.c_int),
        ("lazy_mode", ctypes.c_int),
        ("main_gpu", ctypes.c_int32),
        ("tensor_split", ctypes.c_void_p),
        ("progress_callback", ctypes.c_void_p),
        ("progress_callback_user_data", ctypes.c_void_p),
        ("kv_overrides", ctypes.c_void_p),
        *[(name, ctypes.c_bool) for name in ("vocab_only", "check_tensors", "use_extra_bufts", "no_host")],
        *[(name, ctypes.c_bool) for name in ("no_alloc", "load_mtp")],
    ]


class _ContextParams(ctypes.Structure):
    _fields_ = [
        *[(name, ctypes.c_uint32) for name in ("n_ctx", "n_batch", "n_ubatch", "n_seq_max", "n_rs_seq")],
        *[(name, ctypes.c_uint32) for name in ("n_outputs_max", "n_outputs_max_per_seq")],
        ("n_threads", ctypes.c_int32),
        ("n_threads_batch", ctypes.c_int32),
        *[(name, ctypes.c_int) for name in ("ctx_type", "rope_scaling_type", "pooling_type", "attention_type")],
        ("flash_attn_type", ctypes.c_int),
        *[(name, ctypes.c_float) for name in ("rope_freq_base", "rope_freq_scale", "yarn_ext_factor")],
        *[(name, ctypes.c_float) for name in ("yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow")],
        ("yarn_orig_ctx", ctypes.c_uint32),
        ("defrag_thold", ctypes.c_float),
        ("cb_eval", ctypes.c_void_p),
        ("cb_eval_user_data", ctypes.c_void_p),
        ("type_k", ctypes.c_int),
        ("type_v", ctypes.c_int),
        ("moe_cache_size", ctypes.c_size_t),
        ("abort_callback", ctypes.c_void_p),
        ("abort_callback_data", ctypes.c_void_p),
        *[(name, ctypes.c_bool) for name in ("embeddings", "offload_kqv", "no_perf", "op_offload", "swa_full")],
        ("kv_unified", ctypes.c_bool),
        ("samplers", ctypes.c_void_p),
        ("n_samplers", ctypes.c_size_t),
        ("ctx_other", ctypes.c_void_p),
    ]


class _Batch(ctypes.Structure):
    _fields_ = [
        ("n_tokens", ctypes.c_int32),
        ("token", ctypes.POINTER(ctypes.c_int32)),
        ("embd", ctypes.POINTER(ctypes.c_float)),
        ("pos", ctypes.POINTER(ctypes.c_int32)),
        ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
        ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))),
        ("logits", ctypes.POINTER(ctypes.c_int8)),
    ]


_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_GGML_LOG_LEVEL_ERROR = 4
_PTR = ctypes.c_void_p

_SIGNATURES = {
    "llama_backend_init": ([], None),
    "llama_log_set": ([_LOG_CALLBACK, _PTR], None),
    "llama_model_default_params": ([], _ModelParams),
    "llama_context_default_params": ([], _ContextParams),
    "llama_model_load_from_file": ([ctypes.c_char_p, _ModelParams], _PTR),
    "llama_init_from_model": ([_PTR, _ContextParams], _PTR),
    "llama_model_get_vocab": ([_PTR], _PTR),
    "llama_vocab_n_tokens": ([_PTR], ctypes.c_int32),
    "llama_tokenize": (
        [_PTR, ctypes.c_char_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32, ctypes.c_bool,
         ctypes.c_bool],
        ctypes.c_int32,
    ),
    "llama_batch_init": ([ctypes.c_int32, ctypes.c_int32, ctypes.c_int32], _Batch),
    "llama_batch_free": ([_Batch], None),
    "llama_decode": ([_PTR, _Batch], ctypes.c_int32),
    "llama_get_logits": ([_PTR], ctypes.POINTER(ctypes.c_float)),
    "llama_get_memory": ([_PTR], _PTR),
    "llama_memory_clear": ([_PTR, ctypes.c_bool], None),
    "llama_free": ([_PTR], None),
    "llama_model_free": ([_PTR], None),
    # llama.cpp's own quantizer (distill.serve.ggml_quant): type, source rows, destination, first element, rows,
    # elements per row, importance matrix.
    "ggml_quantize_chunk": (
        [ctypes.c_int, ctypes.POINTER(ctypes.c_float), _PTR, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
         ctypes.POINTER(ctypes.c_float)],
        ctypes.c_size_t,
    ),
    "ggml_quantize_requires_imatrix": ([ctypes.c_int], ctypes.c_bool),
}  # fmt: skip


@_LOG_CALLBACK
def _errors_only(level: int, text: bytes | None, _: int | None) -> None:
    # llama.cpp narrates every load (hundreds of lines); its errors still explain a failed load.
    if level == _GGML_LOG_LEVEL_ERROR and text:
        print(text.decode(errors="replace"), end="")


@functools.cache
def runtime() -> ctypes.CDLL:
    """llama.cpp's C library from the pinned ``xllamacpp`` wheel, typed and initialised once."""
    try:
        import xllamacpp
    except ImportError as error:
        raise MissingRuntime(f"llama.cpp runtime not installed (no xllamacpp): {INSTALL_HINT}") from error
    version = importlib.metadata.version("xllamacpp")
    if version != XLLAMACPP_VERSION:
        raise MissingRuntime(
            f"xllamacpp {version} is installed; distill's llama.cpp binding mirrors {XLLAMACPP_VERSION}: {INSTALL_HINT}"
        )
    library = ctypes.CDLL(str(next(Path(xllamacpp.__file__).parent.glob("xllamacpp*.so"))))
    for name, (arguments, result) in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, result
    library.llama_backend_init()
    library.llama_log_set(_errors_only, None)
    return library


class LlamaCpp:
    """A GGUF model and one context in llama.cpp's CPU runtime (``threads`` for decode and prompt batches).

    ``n_ctx`` bounds the tokens of one :meth:`logits` or :meth:`greedy` call; each call starts from an empty
    KV cache, so calls are independent (one window of perplexity, one prompt).
    """

    def __init__(self, path: str | Path, threads: int = 1, n_ctx: int = 1024) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        self.library, self.n_ctx = runtime(), n_ctx
        defaults = self.library.llama_model_default_params()
        self.model = self.library.llama_model_load_from_file(str(path).encode(), defaults)
        if not self.model:
            gguf_elements(Path(path))  # a truncated file is the usual cause: say so, naming it
            raise ValueError(f"llama.cpp could not load {str(path)!r} (its error is printed above)")
        params = self.library.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.context = self.library.llama_init_from_model(self.model, params)
        if not self.context:
            self.library.llama_model_free(self.model)
            raise ValueError(f"llama.cpp could not create a context of {n_ctx} tokens for {str(path)!r}")
        self.vocab = self.library.llama_model_get_vocab(self.model)
        self.vocab_size = self.library.llama_vocab_n_tokens(self.vocab)

    def close(self) -> None:
        if self.context:
            self.library.llama_free(self.context)
            self.library.llama_model_free(self.model)
            self.context = self.model = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama.cpp's token ids of ``text`` (its BOS when the file says to add one and ``add_special``)."""
        encoded = text.encode()

        def into(capacity: int) -> tuple[ctypes.Array, int]:
            tokens = (ctypes.c_int32 * capacity)()
            flags = (add_special, parse_special)
            return tokens, self.library.llama_tokenize(self.vocab, encoded, len(encoded), tokens, capacity, *flags)

        tokens, count = into(len(encoded) + 8)
        if count < 0:  # -count is the size it needed
            tokens, count = into(-count)
        return list(tokens[:count])

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Every position's next-token logits ``(len(ids), vocab)`` (fp32) for ``ids`` from an empty cache."""
        self.library.llama_memory_clear(self.library.llama_get_memory(self.context), True)
        self._decode(ids, start=0, all_logits=True)
        return np.ctypeslib.as_array(self.library.llama_get_logits(self.context), (len(ids), self.vocab_size)).copy()

    def greedy(self, prompt: Sequence[int], new_tokens: int) -> list[int]:
        """``new_tokens`` tokens by argmax after ``prompt``, one decode step each with the KV cache."""
        if len(prompt) + new_tokens > self.n_ctx:
            raise ValueError(f"prompt of {len(prompt)} + {new_tokens} new tokens exceeds n_ctx={self.n_ctx}")
        self.library.llama_memory_clear(self.library.llama_get_memory(self.context), True)
        last, generated = self._decode(prompt, start=0, all_logits=False), []
        for _ in range(new_tokens):
            generated.append(int(np.argmax(last)))
            last = self._decode(generated[-1:], start=len(prompt) + len(generated) - 1, all_logits=False)
        return generated

    def _decode(self, ids: Sequence[int], start: int, all_logits: bool) -> np.ndarray:
        """Run ``ids`` at positions ``start...``; the last position's logits (a view valid until the next call)."""
        if not ids or start + len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens at position {start} do not fit n_ctx={self.n_ctx}")
        batch = self.library.llama_batch_init(len(ids), 0, 1)
        try:
            for index, token in enumerate(ids):
                batch.token[index], batch.pos[index] = int(token), start + index
                batch.n_seq_id[index], batch.seq_id[index][0] = 1, 0
                batch.logits[index] = all_logits or index == len(ids) - 1
            batch.n_tokens = len(ids)
            status = self.library.llama_decode(self.context, batch)
        finally:
            self.library.llama_batch_free(batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} on {len(ids)} tokens at position {start}")
        outputs = len(ids) if all_logits else 1
        logits = np.ctypeslib.as_array(self.library.llama_get_logits(self.context), (outputs, self.vocab_size))
        return logits[-1]


def block_nll(logits: np.ndarray, ids: Sequence[int]) -> tuple[float, int]:
    """Summed next-token NLL (float64) of ``ids`` under per-position ``logits``, and its token count."""
    scores = torch.from_numpy(logits[:-1]).float()
    targets = torch.as_tensor(ids[1:], dtype=torch.long)
    nll = torch.nn.functional.cross_entropy(scores, targets, reduction="sum")
    return float(nll), len(targets)


def perplexity(path: str | Path, blocks: Iterable[Sequence[int]], threads: int = 1) -> float:
    """Held-out perplexity of a GGUF file in llama.cpp: ``exp(total NLL / tokens)`` over ``blocks``, each a
    window scored from an empty cache (the project's non-overlapping blocks, padding already removed)."""
    blocks = [list(block) for block in blocks if len(block) > 1]
    if not blocks:
        raise ValueError("perplexity needs at least one block of two or more tokens")
    total, count = 0.0, 0
    with LlamaCpp(path, threads, n_ctx=max(len(block) for block in blocks)) as model:
        for block in blocks:
            nll, tokens = block_nll(model.logits(block), block)
            total, count = total + nll, count + tokens
    return math.exp(total / count)
