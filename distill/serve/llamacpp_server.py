"""llama.cpp's own server in this process (``xllamacpp.Server``): timed greedy completions of token-id prompts,
one at a time or several in parallel, for the serve bench's llama.cpp arms.

Why the server and not the ctypes binding's greedy loop (:mod:`distill.serve.llamacpp`): the server is how GGUF
files are served (llama-server; ollama and LM Studio run the same code), slots and continuous batching of
parallel requests included, and a Python loop per token would time the binding, not llama.cpp. Each response
carries llama.cpp's own clocks (``timings``), kept beside the harness's wall time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from distill.serve.llamacpp import INSTALL_HINT, MissingRuntime, runtime
from distill.utils.references import gguf_file

FILE_TYPE_KEY = "general.file_type"


def xllamacpp_module() -> ModuleType:
    """The ``xllamacpp`` wheel, at the version :mod:`distill.serve.llamacpp` is pinned to."""
    try:
        import xllamacpp
    except ImportError as error:
        raise MissingRuntime(f"llama.cpp runtime not installed (no xllamacpp): {INSTALL_HINT}") from error
    runtime()  # the pinned version, and llama.cpp's log narrowed to its errors for the servers too
    return xllamacpp


def gguf_type(path: str | Path) -> str | None:
    """A GGUF file's weight type as llama.cpp's quantizer names it (``q4_1``, ``f16``, ``q4_k_m``), from its
    ``general.file_type``; ``None`` where the file does not say."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(path).fields.get(FILE_TYPE_KEY)
    if field is None:
        return None
    try:
        kind = LlamaFileType(int(field.parts[field.data[0]][0]))
    except ValueError:  # a type newer than the gguf package
        return None
    return kind.name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def teacher_gguf_arm(teacher_path: str | None) -> str | None:
    """The arm of the teacher's own GGUF file, ``teacher_gguf_<type>`` (the LM frontier's reference point); ``None``
    where the teacher is no GGUF file."""
    teacher = gguf_file(str(teacher_path)) if teacher_path else None
    return None if teacher is None else f"teacher_gguf_{gguf_type(teacher) or teacher.stem}"


def gguf_arms(run_dir: Path, teacher_path: str | None, extra: Mapping[str, str]) -> dict[str, Path]:
    """The GGUF files a run serves in llama.cpp, by arm name: the teacher when it is one (``teacher_gguf_<type>``),
    each ``<run_dir>/student_gguf/student-<quant>.gguf`` (``student_gguf_<quant>``) and ``extra`` (name: file)."""
    arms = {}
    teacher = teacher_gguf_arm(teacher_path)
    if teacher is not None:
        arms[teacher] = gguf_file(str(teacher_path))
    for path in sorted((run_dir / "student_gguf").glob("*.gguf")):
        arms[f"student_gguf_{path.stem.removeprefix('student-')}"] = path
    for name, path in extra.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"gguf_arms.{name}={str(path)!r} is not a file")
        if name in arms:
            raise ValueError(f"gguf_arms.{name} is already the arm of {arms[name]}: name it otherwise")
        arms[name] = Path(path)
    if arms:  # before any model loads: a bench that cannot serve its GGUF arms says so at once
        xllamacpp_module()
    return arms


@dataclass(frozen=True)
class Timings:
    """llama.cpp's own clocks of one completion."""

    prompt_tokens: int
    prompt_tokens_per_s: float
    new_tokens: int
    decode_tokens_per_s: float  # llama.cpp's: (new_tokens - 1) over the time after the first token


class LlamaServer:
    """One GGUF file served on ``threads`` threads with ``slots`` parallel slots of ``tokens_per_slot`` each."""

    def __init__(self, path: str | Path, threads: int, slots: int = 1, tokens_per_slot: int = 512) -> None:
        xllamacpp = xllamacpp_module()
        if not Path(path).is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = slots * tokens_per_slot  # the server splits its context evenly among its slots
        params.n_parallel = slots
        for cpu in (params.cpuparams, params.cpuparams_batch):
            # poll=0: idle workers sleep instead of spinning after a request, which would take the cores from
            # the arm measured next (as ONNX Runtime's sessions, distill.serve.onnx_int8.cpu_session).
            cpu.n_threads, cpu.poll = threads, 0
        params.verbosity = -1
        self.path, self.slots = Path(path), slots
        self.server = xllamacpp.Server(params)
        self.pool = ThreadPoolExecutor(slots, thread_name_prefix="llamacpp-request")

    def complete(self, prompt: Sequence[int], new_tokens: int) -> Timings:
        """Exactly ``new_tokens`` greedy tokens after ``prompt``; every request pays its own prefill."""
        request = {"prompt": [int(token) for token in prompt], "n_predict": new_tokens, "temperature": 0}
        response = self.server.handle_completions(request | {"ignore_eos": True, "cache_prompt": False})
        timings = response.get("timings") if isinstance(response, dict) else None
        if timings is None or timings.get("predicted_n") != new_tokens:
            raise RuntimeError(f"llama.cpp server on {self.path.name}: {_error(response)} for {new_tokens} tokens")
        return Timings(
            timings["prompt_n"], timings["prompt_per_second"], timings["predicted_n"], timings["predicted_per_second"]
        )

    def parallel(self, prompt: Sequence[int], new_tokens: int, requests: int) -> list[Timings]:
        """``requests`` completions at once, each from its own Python thread (the server call releases the GIL)."""
        if not 1 <= requests <= self.slots:
            raise ValueError(f"requests={requests} must be in [1, {self.slots}] (the server's slots)")
        futures = [self.pool.submit(self.complete, prompt, new_tokens) for _ in range(requests)]
        return [future.result() for future in futures]

    def close(self) -> None:
        self.pool.shutdown()
        self.server = None  # the server stops when its last reference goes

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()


def _error(response: Any) -> str:
    if isinstance(response, dict) and "error" in response:
        return f"error {response['error']}"
    return f"response without the expected timings ({str(response)[:200]})"
