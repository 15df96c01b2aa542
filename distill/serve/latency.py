"""Latency harness: every arm serves the same prepared request, interleaved, warm-up excluded.

Arms run round-robin, one request each per round, in an order that rotates every round, so that
drift on the machine (thermal, another process) falls on every arm alike instead of on whichever
ran last. Warm-up rounds run the same way and are dropped. Each request is timed on its own, and
its energy is the difference of an energy counter read before and after it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn


@dataclass
class Samples:
    seconds: list[float] = field(default_factory=list)
    joules: list[float] = field(default_factory=list)


if TYPE_CHECKING:
    from distill.data.base import DataModule


def measure(
    arms: Mapping[str, Callable[[], Any]], warmup: int, repeats: int, energy: Any | None = None
) -> dict[str, Samples]:
    """``repeats`` timed requests per arm (after ``warmup`` untimed rounds), interleaved."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats!r} must be >= 1 and warmup={warmup!r} >= 0")
    names = list(arms)
    samples = {name: Samples() for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            joules_before = energy.joules() if energy is not None else 0.0
            started = time.perf_counter()
            arms[name]()
            elapsed = time.perf_counter() - started
            if round_index >= warmup:
                samples[name].seconds.append(elapsed)
                if energy is not None:
                    samples[name].joules.append(energy.joules() - joules_before)
    return samples


def percentile(values: list[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples: Samples, requests_per_call: int) -> dict[str, float]:
    """p50/p90 latency (ms) of one call, throughput (requests/s at the median) and J per 1,000 requests
    (the mean energy of a call)."""
    median = statistics.median(samples.seconds)
    summary = {
        "p50_ms": median * 1000,
        "p90_ms": percentile(samples.seconds, 0.9) * 1000,
        "requests_per_s": requests_per_call / median,
    }
    if samples.joules:  # the mean: a counter that ticks coarser than one request is still right on average
        summary["joules_per_1000_requests"] = statistics.fmean(samples.joules) / requests_per_call * 1000
    return summary


@torch.inference_mode()
def latency_ms(model: nn.Module, datamodule: DataModule, batch_size: int, warmup: int, repeats: int) -> float:
    """Median forward time of one dev batch of ``batch_size`` real sentences, in milliseconds."""
    batch = next(iter(datamodule.dataloader("validation", batch_size, shuffle=False)))
    batch.pop("labels")
    for _ in range(warmup):
        model(**batch)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(**batch)
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)
