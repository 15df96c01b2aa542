"""Wall time, device-hours and energy of a run and of its stages, for the sweep report's per-kWh column.

Energy comes from CodeCarbon's offline tracker (no network): RAPL counters where the machine
exposes them, otherwise its CPU-power model, plus GPU (NVML) and RAM estimates. Only one process
per run measures (the global-zero rank), since the tracker sees the whole machine.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)


class RunMeter:
    """``with RunMeter(world_size, measure=rank == 0) as meter: ...`` then ``meter.metrics()``.

    Without ``stage`` it meters distillation (fit + test): ``energy/kwh``. With one (``teacher_stage``,
    ``logit_store``) it meters that stage: ``energy/<stage>_kwh`` and ``energy/<stage>_seconds``; a stage
    served from its cache costs what reading the cache costs.
    """

    def __init__(
        self, world_size: int, measure: bool = True, country_iso_code: str = "USA", stage: str | None = None
    ) -> None:
        self.world_size, self.stage = world_size, stage
        self.measure = measure
        self.country_iso_code = country_iso_code
        self.tracker = None
        self.seconds = 0.0
        self.energy_kwh: float | None = None
        self.emissions_kg: float | None = None

    def __enter__(self) -> RunMeter:
        self.started = time.perf_counter()
        if self.measure:
            self.tracker = self._start_tracker()
        return self

    def _start_tracker(self):
        try:
            from codecarbon import OfflineEmissionsTracker

            tracker = OfflineEmissionsTracker(
                country_iso_code=self.country_iso_code, save_to_file=False, log_level="error", measure_power_secs=15
            )
            tracker.start()
            return tracker
        except Exception as error:  # energy is a report column, never a reason to lose a run
            log.warning("energy is not measured: CodeCarbon failed to start (%s)", error)
            return None

    def __exit__(self, *exc_info) -> None:
        self.seconds = time.perf_counter() - self.started
        if self.tracker is not None:
            self.emissions_kg = self.tracker.stop()
            self.energy_kwh = self.tracker.final_emissions_data.energy_consumed

    def metrics(self) -> dict[str, Any]:
        if self.stage:
            return {f"energy/{self.stage}_seconds": round(self.seconds, 1), f"energy/{self.stage}_kwh": self.energy_kwh}
        return {
            "energy/fit_test_seconds": round(self.seconds, 1),
            "energy/device_hours": self.seconds / 3600 * self.world_size,
            "energy/kwh": self.energy_kwh,
            "energy/emissions_kg": self.emissions_kg,
        }
