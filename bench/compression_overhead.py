"""Per-step cost of the compression callbacks inside Trainer.fit, against no callback, same process.

    python bench/compression_overhead.py [--steps 40 --repeats 5]

Distils a MiniLM-L6-shaped teacher (random weights: only shapes matter for time) into the
bert_to_tiny student (2 layers, H384) on batches of 32 x 64 tokens, through Trainer.fit with one
callback set per arm. Arms are interleaved repeat by repeat so machine noise hits all of them;
each arm's step time is the median over steps (first 5 dropped) of every repeat, and the table
gives the median ratio to the no-callback arm. GMP updates masks every 10 steps here (the preset
uses 100), so its mask-update cost is counted generously. Arms: none, gmp80, nm24 (masks held),
gmp80+nm24 (GMP on attention, 2:4 on the FFN), qat8, nm24+qat8. Prints markdown, writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from distill.callbacks.magnitude_pruning import MagnitudePruning
from distill.callbacks.nm_sparsity import NMSparsity
from distill.callbacks.qat import QuantizationAwareTraining
from distill.modules.distillation import DistillationModule

WARMUP_STEPS = 5
ARMS = {
    "none": lambda: [],
    "gmp80": lambda: [MagnitudePruning(final_sparsity=0.8, start_step=0, end_step=1000, frequency=10)],
    "nm24": lambda: [NMSparsity(backend="native")],
    "gmp80+nm24": lambda: [
        MagnitudePruning(
            final_sparsity=0.8, start_step=0, end_step=1000, frequency=10, include=["student.*attention*"]
        ),
        NMSparsity(backend="native", include=["student.*intermediate.dense", "student.*layer.?.output.dense"]),
    ],
    "qat8": lambda: [QuantizationAwareTraining()],
    "nm24+qat8": lambda: [NMSparsity(backend="native"), QuantizationAwareTraining()],
}


class StepStart(pl.Callback):
    """First in the list, so mask updates in the callbacks' batch-start hooks are timed."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.started = time.perf_counter()


class StepEnd(pl.Callback):
    """Last in the list, so the re-masking in the callbacks' batch-end hooks is timed."""

    def __init__(self, start: StepStart) -> None:
        self.start, self.times = start, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self.start.started)


def minilm(layers: int) -> BertForSequenceClassification:
    config = BertConfig(hidden_size=384, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=1536)
    return BertForSequenceClassification(config)


def batches(steps: int, batch_size: int = 32, length: int = 64) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    items = [
        {
            "input_ids": torch.randint(1000, 30000, (length,), generator=generator),
            "attention_mask": torch.ones(length, dtype=torch.long),
            "labels": torch.randint(0, 2, (), generator=generator),
        }
        for _ in range(steps * batch_size)
    ]
    return DataLoader(items, batch_size=batch_size)


def run_arm(name: str, steps: int, data: DataLoader) -> float:
    torch.manual_seed(0)
    module = DistillationModule(
        student=minilm(2),
        teacher=minilm(6),
        num_labels=2,
        temperature=2.0,
        alpha=0.5,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4),
    )
    start = StepStart()
    timer = StepEnd(start)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[start, *ARMS[name](), timer],
    )
    trainer.fit(module, train_dataloaders=data)
    return statistics.median(timer.times[WARMUP_STEPS:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--arms",
        nargs="+",
        default=list(ARMS),
        choices=list(ARMS),
        metavar="ARM",
        help=f"subset of: {', '.join(ARMS)} ('none' is always run)",
    )
    parser.add_argument("--out", default="bench/results/compression_overhead.json")
    args = parser.parse_args()
    data = batches(args.steps)
    arms = ["none", *[name for name in args.arms if name != "none"]]
    medians: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name in arms:
            medians[name].append(run_arm(name, args.steps, data))
    ratios = {
        name: statistics.median(a / b for a, b in zip(times, medians["none"], strict=True))
        for name, times in medians.items()
    }
    print(
        f"\nStep time through Trainer.fit, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.repeats} interleaved repeats x {args.steps} steps\n"
    )
    print("| callbacks | median step (ms) | ratio to none |\n|---|---|---|")
    for name, times in medians.items():
        print(f"| {name} | {1000 * statistics.median(times):.1f} | {ratios[name]:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"step_seconds": medians, "ratio_to_none": ratios, "args": vars(args)}, indent=2)
    )


if __name__ == "__main__":
    main()
