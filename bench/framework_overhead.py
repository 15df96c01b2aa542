"""A distillation step through Trainer.fit against a hand-written PyTorch loop doing the same work.

    python bench/framework_overhead.py [--steps 30 --pairs 5]

Both arms: the same MiniLM-shaped teacher (frozen, eval, no grad) and bert_to_tiny student (random
weights: only shapes matter for time), the same batches of 32 x 64 tokens, ``kd_loss`` (T=2,
alpha=0.5), AdamW with the module's warm-up/decay schedule. The Lightning arm is distill's
``DistillationModule`` under a ``Trainer`` with checkpointing, loggers and the progress bar off;
the loop is forward, loss, backward, step, schedule, zero_grad. A step's time is the interval
between consecutive step starts (so data loading, hooks and logging count), median over steps
after 5 warm-up steps. Pairs run interleaved; the ratio is the median of per-pair ratios.
Prints markdown, writes JSON.
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
from transformers import BertConfig, BertForSequenceClassification, get_linear_schedule_with_warmup

from distill.losses.kd import kd_loss
from distill.modules.distillation import DistillationModule
from distill.modules.optimization import NO_DECAY

WARMUP = 5


def minilm(layers: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=384, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=1536)
    return BertForSequenceClassification(config)


def batches(steps: int, batch_size: int = 32, length: int = 64) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(1000, 30000, (batch_size, length), generator=generator),
            "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch_size,), generator=generator),
        }
        for _ in range(steps)
    ]


def median_step(starts: list[float]) -> float:
    return statistics.median(b - a for a, b in zip(starts[WARMUP:], starts[WARMUP + 1 :], strict=False))


class StepStarts(pl.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, module) -> None:
        self.starts.append(time.perf_counter())


def lightning_arm(data: list[dict]) -> float:
    module = DistillationModule(
        student=minilm(2, seed=1),
        teacher=minilm(6, seed=0),
        num_labels=2,
        temperature=2.0,
        alpha=0.5,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.01),
    )
    record = StepStarts()
    trainer = pl.Trainer(
        max_steps=len(data),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return median_step(record.starts)


def loop_arm(data: list[dict]) -> float:
    student, teacher = minilm(2, seed=1).train(), minilm(6, seed=0).eval().requires_grad_(False)
    named = list(student.named_parameters())
    groups = [
        {"params": [p for n, p in named if not n.endswith(NO_DECAY)]},
        {"params": [p for n, p in named if n.endswith(NO_DECAY)], "weight_decay": 0.0},
    ]  # the module's split: no decay on biases and LayerNorm weights
    optimizer = torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * len(data)), len(data))
    starts = []
    for batch in torch.utils.data.DataLoader(data, batch_size=None):
        starts.append(time.perf_counter())
        labels = batch.pop("labels")
        student_logits = student(**batch).logits
        with torch.no_grad():
            teacher_logits = teacher(**batch).logits
        kd_loss(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    starts.append(time.perf_counter())
    return median_step(starts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--out", default="bench/results/framework_overhead.json")
    args = parser.parse_args()
    data = batches(args.steps)
    pairs = [(lightning_arm(data), loop_arm(data)) for _ in range(args.pairs)]
    ratio = statistics.median(fit / loop for fit, loop in pairs)
    print(
        f"\nDistillation step, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.pairs} interleaved pairs x {args.steps} steps\n"
    )
    print("| pair | Trainer.fit step (ms) | hand-written loop step (ms) | ratio |\n|---|---|---|---|")
    for index, (fit, loop) in enumerate(pairs):
        print(f"| {index} | {1000 * fit:.1f} | {1000 * loop:.1f} | {fit / loop:.3f} |")
    print(f"\nmedian ratio Trainer.fit / loop: {ratio:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"pairs_seconds": pairs, "median_ratio": ratio, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
