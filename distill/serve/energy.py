"""Energy counters read around each measured request: measured where the hardware says, estimated otherwise.

Every counter is monotonic joules, so a window's energy is the difference of two reads:

* ``NvmlEnergy``: the GPU's own energy counter (NVML ``nvmlDeviceGetTotalEnergyConsumption``, millijoules).
* ``RaplEnergy``: the CPU package counters under ``/sys/class/powercap`` (microjoules, wrapping at their range).
* ``PowerModelEstimate``: no counter readable (this VM): CodeCarbon's power figure for the CPU, scaled to the
  threads in use, times wall time. It is labelled an estimate wherever it is reported.
"""

from __future__ import annotations

import contextlib
import glob
import time
from pathlib import Path


class RaplEnergy:
    """Sum of the readable RAPL package domains, unwrapped."""

    def __init__(self, root: str = "/sys/class/powercap") -> None:
        self.domains = [Path(path) for path in sorted(glob.glob(f"{root}/intel-rapl:[0-9]"))]
        if not self.domains:
            raise FileNotFoundError(f"no RAPL domains under {root}")
        self.ranges = [int((domain / "max_energy_range_uj").read_text()) for domain in self.domains]
        self.last = [self._read(domain) for domain in self.domains]
        self.total_uj = 0
        self.source = f"RAPL ({len(self.domains)} package domain(s))"

    @staticmethod
    def _read(domain: Path) -> int:
        return int((domain / "energy_uj").read_text())

    def joules(self) -> float:
        for index, domain in enumerate(self.domains):
            value = self._read(domain)
            self.total_uj += (value - self.last[index]) % self.ranges[index]
            self.last[index] = value
        return self.total_uj / 1e6


class NvmlEnergy:
    """The GPU's total-energy counter."""

    def __init__(self, device_index: int = 0) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self.source = f"NVML energy counter, GPU {device_index}"

    def joules(self) -> float:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000


class PowerModelEstimate:
    """Constant power times wall time: CodeCarbon's figure for this CPU, for the share of its threads in use."""

    def __init__(self, threads: int, cpu_threads: int, cpu_watts: float | None = None) -> None:
        model = "given"
        if cpu_watts is None:
            from codecarbon.core.cpu import TDP

            tdp = TDP()
            model, cpu_watts = tdp.model, float(tdp.tdp)
        self.watts = cpu_watts * min(threads, cpu_threads) / cpu_threads
        self.source = f"estimate: CodeCarbon power model ({model}, {cpu_watts:g} W for {cpu_threads} threads) x time"
        self.estimate = True

    def joules(self) -> float:
        return self.watts * time.perf_counter()


def cpu_energy(threads: int, cpu_threads: int) -> RaplEnergy | PowerModelEstimate | None:
    """RAPL where readable, else CodeCarbon's estimate; ``None`` (no energy columns) without either."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        return RaplEnergy()
    try:
        return PowerModelEstimate(threads, cpu_threads)
    except ImportError:
        return None
