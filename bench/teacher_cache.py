"""Distillation step time with precomputed teacher logits versus the live teacher, same process.

    HF_HOME=../shared/hf HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=../shared/data python bench/teacher_cache.py
    ... DISTILL_LM_TEACHER=<gguf> python bench/teacher_cache.py --experiment smollm2_to_small --steps 6 --repeats 2

Builds an experiment's objects (default ``bert_to_tiny``: data, cached fine-tuned teacher, student)
through the same Hydra config as ``distill.train``, then runs ``--steps`` training steps through
``Trainer.fit`` with the live teacher and with the logit stores (the sentences' and, with the
recipe's perturbed copies, the copies'), alternating arms ``--repeats`` times. Reports median step
times, the steady-state epoch ratio, the time this run spent building or loading the stores and
the largest difference between the arms' losses (same seed, same batches). Trailing arguments are
config overrides (``data.augment.copies=0`` times the recipe without copies). Prints markdown,
writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from distill.config.schemas import register_schemas
from distill.pipeline.stages import build_module, teacher_logit_store

CONF = str(Path(__file__).resolve().parents[1] / "conf")


class LossTimes(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self.started)
        self.losses.append(float(outputs["loss"]))


def run_arm(cfg, task, teacher, student, datamodule, steps: int) -> LossTimes:
    store = teacher_logit_store(cfg, teacher, datamodule, world_size=1)
    pl.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg, task, teacher, copy.deepcopy(student), datamodule, store)
    record = LossTimes()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[record],
    )
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="bert_to_tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/teacher_cache.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.augment.copies=0")
    args = parser.parse_args()
    register_schemas()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        # The default recipe, perturbed copies included: the cached arm reads the teacher's logits on
        # the sentences and on the copies the loader draws; the live arm runs the teacher on both.
        output = f"/tmp/bench-teacher-cache-{args.experiment}"
        overrides = [f"experiment={args.experiment}", f"paths.output_dir={output}", *args.overrides]
        cfg = compose("train", overrides=overrides)
    datamodule = instantiate(cfg.data)
    task = instantiate(cfg.task)
    teacher = instantiate(cfg.teacher, datamodule=datamodule, task=task)
    student = instantiate(cfg.student, teacher=teacher, datamodule=datamodule)

    started = time.perf_counter()
    cfg.distill.teacher_cache = "precompute"
    teacher_logit_store(cfg, teacher, datamodule, world_size=1)  # build (or reuse) the stores
    build_seconds = time.perf_counter() - started
    arms = {"live": "none", "cached": "precompute"}
    records: dict[str, list[LossTimes]] = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, mode in arms.items():
            cfg.distill.teacher_cache = mode
            records[name].append(run_arm(cfg, task, teacher, student, datamodule, args.steps))
    warmup = min(3, args.steps - 1)
    step = {name: statistics.median(t for r in runs for t in r.times[warmup:]) for name, runs in records.items()}
    epoch_steps = len(datamodule.train_dataloader())
    loss_gap = max(abs(a - b) for a, b in zip(records["live"][0].losses, records["cached"][0].losses, strict=True))
    result = {
        "step_seconds": step,
        "epoch_steps": epoch_steps,
        "epoch_ratio": step["live"] / step["cached"],
        "store_seconds_this_run": build_seconds,
        "first_losses": {name: runs[0].losses[:5] for name, runs in records.items()},
        "max_first_loss_difference": loss_gap,
        "threads": torch.get_num_threads(),
        "args": vars(args),
    }
    copies = cfg.data.get("augment", {}).get("copies", 0)
    print(
        f"\n{args.experiment} distillation steps, {copies} perturbed copies per example, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, "
        f"{args.repeats} alternating repeats x {args.steps} steps\n"
    )
    print("| teacher | median step (ms) | epoch estimate (s) |\n|---|---|---|")
    for name in arms:
        print(f"| {name} | {1000 * step[name]:.1f} | {step[name] * epoch_steps:.0f} |")
    print(
        f"\nepoch ratio live/cached: {result['epoch_ratio']:.2f}x; store build/load this run: {build_seconds:.1f} s; "
        f"max |loss live - loss cached| over {args.steps} steps: {loss_gap:.2e}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
