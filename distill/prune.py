"""One-shot pruning of a Hugging Face model with SparseGPT, Wanda or magnitude.

    python -m distill.prune method=sparsegpt pattern=2:4            # the default causal-LM teacher
    python -m distill.prune task=classification data=sst2 model=<run>/student sparsity=0.5

Composes conf/prune.yaml, prints it, draws calibration samples from the training split (never
held-out text), scores the dense model (held-out perplexity / dev accuracy), prunes it block by
block (:mod:`distill.pruning.oneshot.sequential`), scores it again and saves it with ``save_pretrained``,
its tokenizer and its masks (``sparsity_masks.safetensors``: what ``compression=hold_masks``
keeps while distilling) into the run folder, with ``prune.json``: the scores, the wall time and
the peak memory of the pruning step.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from safetensors.torch import save_file

from distill.data.base import DataModule
from distill.models.student import draw_calibration_batches
from distill.pipeline.checks import check_oneshot
from distill.pipeline.entry import hydra_cli
from distill.pruning.oneshot.sequential import OneShotSettings, prune_oneshot
from distill.pruning.oneshot.solvers import SparsityTarget
from distill.utils.devices import to_device
from distill.utils.references import load_tokenizer, resolve
from distill.utils.run_record import git_state, write_json

log = logging.getLogger("distill.prune")
MASKS_FILE = "sparsity_masks.safetensors"


def peak_memory_during(work: Callable[[], Any]) -> tuple[Any, float | None]:
    """``work()`` and the process's peak resident memory while it ran, in MiB (None off Linux)."""
    try:  # "5" resets the high-water mark (VmHWM) to the current resident size
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return work(), None
    result = work()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return result, int(line.split()[1]) / 1024
    return result, None


def calibration_batches(datamodule: DataModule, samples: int) -> list[dict[str, torch.Tensor]]:
    """``samples`` training sequences (blocks or sentences), in the data module's batches."""
    if samples < 1:
        raise ValueError(f"calibration.samples={samples!r} must be >= 1")
    datamodule.prepare_data()
    # A length-grouped batch sampler leaves the loader's batch_size unset: its batches are the module's.
    batch_size = datamodule.calibration_dataloader().batch_size or datamodule.batch_size
    count = -(-samples // batch_size)
    try:
        batches = draw_calibration_batches(datamodule, count)
    except ValueError as error:
        available = len(datamodule.splits["train"])
        raise ValueError(f"calibration.samples={samples} is more than the {available} training sequences") from error
    batches[-1] = {key: value[: samples - (count - 1) * batch_size] for key, value in batches[-1].items()}
    return batches


def settings_of(cfg: DictConfig) -> OneShotSettings:
    target = SparsityTarget.parse(cfg.sparsity, cfg.pattern)
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(cfg.sparsegpt.hessian_dtype)
    if dtype is None:
        raise ValueError(f"sparsegpt.hessian_dtype={cfg.sparsegpt.hessian_dtype!r} must be float32 or float64")
    return OneShotSettings(cfg.method, target, cfg.sparsegpt.block_size, cfg.sparsegpt.damp, dtype)


def device_of(setting: str) -> torch.device:
    """``auto``: the first CUDA GPU if there is one, else the CPU; otherwise a torch device string."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError as error:
        raise ValueError(f"device={setting!r} is not a device (auto, cpu, cuda, cuda:N)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={setting!r} but torch sees no CUDA GPU here")
    return device


def timed_on(device: torch.device, work: Callable[[], Any]) -> tuple[Any, float, float | None, float | None]:
    """``work()``, its wall time (seconds), the process's peak resident memory (MiB) and, on a GPU, the
    peak GPU memory allocated (MiB) while it ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    result, peak_resident = peak_memory_during(work)
    if device.type != "cuda":
        return result, time.perf_counter() - started, peak_resident, None
    torch.cuda.synchronize(device)
    return result, time.perf_counter() - started, peak_resident, torch.cuda.max_memory_allocated(device) / 2**20


def prune(cfg: DictConfig) -> dict[str, Any]:
    settings = settings_of(cfg)  # bad settings fail before anything loads
    device = device_of(cfg.device)
    task = instantiate(cfg.task)
    check_oneshot(cfg.model, task.auto_model, settings, cfg.include, cfg.exclude)  # widths from config.json
    output_dir = Path(cfg.paths.output_dir)
    torch.manual_seed(cfg.seed)
    datamodule = instantiate(cfg.data)
    model = task.auto_model.from_pretrained(resolve(cfg.model)).eval().to(device)
    batches = [to_device(batch, device) for batch in calibration_batches(datamodule, cfg.calibration.samples)]
    datamodule.setup("test")
    report: dict[str, Any] = {"model": cfg.model, "method": cfg.method, "target": str(settings.target)}
    report["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if cfg.evaluate:
        report["dense"] = task.score(model, datamodule)
    work = functools.partial(prune_oneshot, model, batches, settings, cfg.include, cfg.exclude)
    masks, report["prune_seconds"], report["peak_memory_mib"], report["peak_gpu_memory_mib"] = timed_on(device, work)
    pruned = sum(int((~keep).sum()) for keep in masks.values())
    total = sum(keep.numel() for keep in masks.values())
    report |= {"pruned_layers": len(masks), "layer_sparsity": pruned / total, "threads": torch.get_num_threads()}
    report["calibration_tokens"] = sum(int(batch["attention_mask"].sum()) for batch in batches)
    if cfg.evaluate:
        report["pruned"] = task.score(model, datamodule)
    save_pruned(model.cpu(), masks, cfg.model, output_dir / "model")
    write_json(output_dir / "prune.json", report | {"git": git_state()})
    return report


def save_pruned(model: torch.nn.Module, masks: dict[str, torch.Tensor], reference: str, folder: Path) -> None:
    model.save_pretrained(folder)
    load_tokenizer(reference).save_pretrained(folder)
    save_file({name: keep.contiguous() for name, keep in masks.items()}, str(folder / MASKS_FILE))


# Console entry point `distill-prune`.
cli = hydra_cli("prune", prune)


if __name__ == "__main__":
    cli()
