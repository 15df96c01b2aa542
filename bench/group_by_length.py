"""Training-step time with length-grouped batches versus random batches, same process.

    HF_HOME=../shared/hf HF_HUB_OFFLINE=1 DISTILL_DATA_DIR=../shared/data python bench/group_by_length.py

Fine-tunes the default teacher (fwd + bwd + AdamW) on SST-2 train batches of 32, alternating
one random batch and one grouped batch so that machine noise hits both equally, and prints the
median step times, their ratio and the padded tokens per batch as a markdown table (JSON beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from itertools import islice
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from distill.data.glue import GlueDataModule

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def step_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    started = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per arm")
    parser.add_argument("--out", default="bench/results/group_by_length.json")
    args = parser.parse_args()
    common = dict(
        task="sst2",
        text_fields=["sentence"],
        data_dir=os.environ.get("DISTILL_DATA_DIR", "data"),
        cache_dir=str(Path.home() / ".cache/distill/datasets"),
        tokenizer=MODEL,
        num_labels=2,
    )
    arms = {}
    for name, grouped in (("random", False), ("grouped", True)):
        datamodule = GlueDataModule(**common, group_by_length=grouped)
        datamodule.setup("fit")
        arms[name] = list(islice(datamodule.train_dataloader(), args.steps + 3))
    model = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    timings = {name: [] for name in arms}
    for index in range(args.steps + 3):
        for name, batches in arms.items():
            seconds = step_seconds(model, optimizer, batches[index])
            if index >= 3:  # warm-up steps
                timings[name].append(seconds)
    result = {
        name: {
            "median_step_s": statistics.median(values),
            "mean_padded_len": statistics.mean(b["input_ids"].shape[1] for b in arms[name][3:]),
        }
        for name, values in timings.items()
    }
    result["speedup"] = result["random"]["median_step_s"] / result["grouped"]["median_step_s"]
    result["torch"] = torch.__version__
    result["threads"] = torch.get_num_threads()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| batches | median step (s) | mean padded length |\n|---|---|---|")
    for name in arms:
        print(f"| {name} | {result[name]['median_step_s']:.3f} | {result[name]['mean_padded_len']:.1f} |")
    print(
        f"\nspeedup (random / grouped): {result['speedup']:.2f}x, {args.steps} interleaved steps per arm, "
        f"torch {torch.__version__}, {result['threads']} threads"
    )


if __name__ == "__main__":
    main()
