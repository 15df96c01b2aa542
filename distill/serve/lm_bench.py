"""Causal LMs at batch 1 in the runtimes that serve them: PyTorch, ONNX Runtime and llama.cpp's server.

Every arm greedily continues the same held-out prompt. Its first token alone (the prefill arm: 1 new token, the
time to first token) and ``new_tokens`` tokens (the generate arm) are timed as separate arms, all interleaved by
:func:`distill.serve.latency.measure`; decode tokens/s = (new_tokens - 1) / (generate - prefill), the same
definition for every runtime. A llama.cpp arm also answers ``parallel`` requests at once
(``<arm>/parallel<P>``: aggregate tokens/s = P x new_tokens / wall time) and reports llama.cpp's own clocks beside
the harness's. Each row carries its artifact's size on disk and held-out perplexity, measured once by the caller.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from distill.serve.gpu_arms import synchronized
from distill.serve.latency import Samples, measure, summarize
from distill.serve.llamacpp_server import LlamaServer, Timings
from distill.serve.onnx_int8 import ONNX_FILE
from distill.utils.devices import model_device, to_device
from distill.utils.references import file_digest

TOKENS_MARGIN = 16  # a slot's context beyond prompt + new tokens: llama.cpp refuses a request that fills it


class Served(Protocol):
    """An artifact loaded for one thread count: greedy generation from the bench's prompt."""

    def generate(self, new_tokens: int) -> Timings | None: ...

    def close(self) -> None: ...


@dataclass
class LMArm:
    """One artifact in one runtime; ``open(threads, ids)`` serves it on that many threads for prompt ``ids``."""

    name: str
    runtime: str  # "pytorch", "onnxruntime" or "llama.cpp"
    artifact: str | None  # the file, folder or hub id it was loaded from
    open: Callable[[int, dict[str, torch.Tensor]], Served]
    perplexity: float | None = None
    parallel: Sequence[int] = field(default_factory=tuple)  # parallel request counts (llama.cpp arms)
    size_bytes: int | None = None  # as served: the GGUF file, the ONNX graph, a PyTorch model's weights
    sha256: str | None = None  # of a file artifact: the same file measured in several jobs is one point


@dataclass
class BenchSettings:
    new_tokens: int
    warmup: int
    repeats: int


def check_settings(parallel: Sequence[int], perplexity_blocks: int | None) -> None:
    if any(requests < 1 for requests in parallel):
        raise ValueError(f"parallel={list(parallel)} must hold request counts >= 1")
    if perplexity_blocks is not None and perplexity_blocks < 1:
        raise ValueError(f"perplexity_blocks={perplexity_blocks!r} must be >= 1, or null for every test block")


class ModelGeneration:
    """A PyTorch or ONNX Runtime model's ``generate``; on a GPU each request ends when the device is done."""

    def __init__(self, model: nn.Module, ids: dict[str, torch.Tensor]) -> None:
        self.model, self.ids = model, to_device(ids, model_device(model))
        self.cuda = model_device(model).type == "cuda"

    @torch.inference_mode()
    def generate(self, new_tokens: int) -> None:
        call = functools.partial(
            self.model.generate, **self.ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
        (synchronized(call) if self.cuda else call)()

    def close(self) -> None:
        """Nothing to release: the model serves every thread count (a llama.cpp server is per thread count)."""


class ServerGeneration:
    """A GGUF file in llama.cpp's server, the prompt's real tokens as the request."""

    def __init__(self, server: LlamaServer, ids: dict[str, torch.Tensor]) -> None:
        self.server, self.prompt = server, ids["input_ids"][0][ids["attention_mask"][0] == 1].tolist()

    def generate(self, new_tokens: int) -> Timings:
        return self.server.complete(self.prompt, new_tokens)

    def parallel(self, new_tokens: int, requests: int) -> list[Timings]:
        return self.server.parallel(self.prompt, new_tokens, requests)

    def close(self) -> None:
        self.server.close()


def torch_arm(name: str, model: nn.Module, artifact: Any, ppl: float | None) -> LMArm:
    """A PyTorch model, its size the bytes of its weights as served (a GGUF teacher is de-quantized to fp32)."""
    size = sum(weight.numel() * weight.element_size() for weight in model.parameters())  # tied ones once
    artifact = None if artifact is None else str(artifact)
    return LMArm(name, "pytorch", artifact, lambda _, ids: ModelGeneration(model, ids), ppl, size_bytes=size)


def onnx_arm(name: str, path: Path, load: Callable[[Path, int], nn.Module], ppl: float) -> LMArm:
    """An ONNX Runtime decoder folder; a session per thread count (its threads are fixed when it is made)."""
    opened = lambda threads, ids: ModelGeneration(load(path, threads), ids)  # noqa: E731
    graph = [file for file in path.iterdir() if file.name == ONNX_FILE or file.suffix == ".data"]  # not the tokenizer
    return LMArm(name, "onnxruntime", str(path), opened, ppl, size_bytes=sum(file.stat().st_size for file in graph))


def llamacpp_arm(name: str, path: Path, ppl: float, parallel: Sequence[int], tokens_per_slot: int) -> LMArm:
    """A GGUF file in a server per thread count, with a slot for each of the most parallel requests."""
    slots = max([1, *parallel])

    def open_server(threads: int, ids: dict[str, torch.Tensor]) -> ServerGeneration:
        return ServerGeneration(LlamaServer(path, threads, slots, tokens_per_slot + TOKENS_MARGIN), ids)

    size, digest = path.stat().st_size, file_digest(path.resolve())
    return LMArm(name, "llama.cpp", str(path), open_server, ppl, tuple(parallel), size, digest)


def bench_lm(
    arms: Sequence[LMArm], ids: dict[str, torch.Tensor], threads: int, settings: BenchSettings, energy: Any
) -> list[dict[str, Any]]:
    """The rows of every arm at ``threads``: batch 1, then each arm's parallel requests."""
    served = {arm.name: arm.open(threads, ids) for arm in arms}
    try:
        calls, clocks = timed_calls(arms, served, settings.new_tokens)
        samples = measure(calls, settings.warmup, settings.repeats, energy)
    finally:
        for generation in served.values():
            generation.close()
    prompt_tokens = int(ids["attention_mask"][0].sum())
    rows = []
    for arm in arms:
        own = [clock for clocks_ in clocks[f"{arm.name}/generate"][settings.warmup :] for clock in clocks_]
        rows.append(batch_row(arm, samples, own, threads, prompt_tokens, settings.new_tokens))
        for requests in arm.parallel:
            name = f"{arm.name}/parallel{requests}"
            own = [clock for clocks_ in clocks[name][settings.warmup :] for clock in clocks_]
            rows.append(parallel_row(arm, samples[name], own, threads, prompt_tokens, settings.new_tokens, requests))
    return rows


def timed_calls(
    arms: Sequence[LMArm], served: dict[str, Served], new_tokens: int
) -> tuple[dict[str, Callable[[], None]], dict[str, list[list[Timings]]]]:
    """The measured calls by arm, and where each call leaves the runtime's own clocks (llama.cpp's)."""
    calls, clocks = {}, {}

    def recorded(name: str, call: Callable[[], Any]) -> Callable[[], None]:
        clocks[name] = []

        def run() -> None:
            result = call()
            clocks[name].append(result if isinstance(result, list) else [result] if result is not None else [])

        return run

    for arm in arms:
        generation = served[arm.name]
        for kind, count in (("prefill", 1), ("generate", new_tokens)):
            calls[f"{arm.name}/{kind}"] = recorded(f"{arm.name}/{kind}", functools.partial(generation.generate, count))
        for requests in arm.parallel:
            call = functools.partial(generation.parallel, new_tokens, requests)
            calls[f"{arm.name}/parallel{requests}"] = recorded(f"{arm.name}/parallel{requests}", call)
    return calls, clocks


def _common(arm: LMArm, threads: int, prompt_tokens: int, requests: int) -> dict[str, Any]:
    return {
        "arm": arm.name if requests == 1 else f"{arm.name}/parallel{requests}", "runtime": arm.runtime,
        "threads": threads, "batch_size": 1, "parallel": requests, "prompt_tokens": prompt_tokens,
        "artifact": arm.artifact, "artifact_bytes": arm.size_bytes, "artifact_sha256": arm.sha256,
        "perplexity": arm.perplexity,
    }  # fmt: skip


def _runtime_clocks(clocks: list[Timings]) -> dict[str, float | None]:
    """llama.cpp's own median decode and prefill tokens/s over the timed requests (``None`` elsewhere)."""
    if not clocks:
        return {"llamacpp_decode_tokens_per_s": None, "llamacpp_prefill_tokens_per_s": None}
    return {
        "llamacpp_decode_tokens_per_s": statistics.median(clock.decode_tokens_per_s for clock in clocks),
        "llamacpp_prefill_tokens_per_s": statistics.median(clock.prompt_tokens_per_s for clock in clocks),
    }


def batch_row(
    arm: LMArm, samples: dict[str, Samples], clocks: list[Timings], threads: int, prompt_tokens: int, new_tokens: int
) -> dict[str, Any]:
    prefill, generate = summarize(samples[f"{arm.name}/prefill"], 1), summarize(samples[f"{arm.name}/generate"], 1)
    decode_s = (generate["p50_ms"] - prefill["p50_ms"]) / 1000
    return _common(arm, threads, prompt_tokens, 1) | {
        "time_to_first_token_ms": prefill["p50_ms"],
        "prefill_tokens_per_s": prompt_tokens / prefill["p50_ms"] * 1000,
        "decode_tokens_per_s": (new_tokens - 1) / decode_s,
        "aggregate_tokens_per_s": new_tokens / generate["p50_ms"] * 1000,
        "generate_p90_ms": generate["p90_ms"],
        "joules_per_1000_tokens": generate.get("joules_per_1000_requests", 0) / new_tokens,
        **_runtime_clocks(clocks),
    }


def parallel_row(
    arm: LMArm,
    samples: Samples,
    clocks: list[Timings],
    threads: int,
    prompt_tokens: int,
    new_tokens: int,
    requests: int,
) -> dict[str, Any]:
    """``requests`` requests at once: their tokens over the wall time of the call, and energy per token."""
    wall = summarize(samples, 1)
    return _common(arm, threads, prompt_tokens, requests) | {
        "time_to_first_token_ms": None,
        "prefill_tokens_per_s": None,
        "decode_tokens_per_s": None,
        "aggregate_tokens_per_s": requests * new_tokens / wall["p50_ms"] * 1000,
        "generate_p90_ms": wall["p90_ms"],
        "joules_per_1000_tokens": wall.get("joules_per_1000_requests", 0) / (requests * new_tokens),
        **_runtime_clocks(clocks),
    }
