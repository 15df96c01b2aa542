"""The causal-LM student's training step in fp32 against bf16-mixed (CPU autocast), same process.

    python bench/precision.py [--steps 6 --repeats 2 --layers 15]

One step of experiment=smollm2_to_small's student as it trains from the teacher store: a
SmolLM2-135M-shaped Llama cut to ``--layers`` decoder layers (random weights: only shapes matter
for time), a batch of 4 x 512 tokens, the fused top-64 KD + CE loss from its last hidden states
(``kd_loss_linear_topk``, alpha 0.5, T 1), backward and an AdamW step. Arms alternate repeat by
repeat on the same batches; each arm's time is the median over steps (the first dropped) of every
repeat. Also prints the loss difference between the arms at the first step. Prints markdown,
writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill.kernels.kd_loss_linear import kd_loss_linear_topk
from distill.losses.topk import topk_targets

SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def batches(count: int, vocab: int, positions: int = 512, rows: int = 4, k: int = 64):
    generator = torch.Generator().manual_seed(0)
    for _ in range(count):
        ids = torch.randint(0, vocab, (rows, positions), generator=generator)
        teacher_logits = torch.randn(rows, positions - 1, vocab, generator=generator) * 3
        yield ids, topk_targets(teacher_logits, k, 1.0)


def step(model, optimizer, ids, targets, bf16: bool) -> tuple[float, float]:
    started = time.perf_counter()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with context:
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        loss = kd_loss_linear_topk(hidden, model.lm_head.weight, targets, ids[:, 1:], temperature=1.0, alpha=0.5)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=15)
    args = parser.parse_args()
    data = list(batches(args.steps, SMOLLM2["vocab_size"]))
    times: dict[str, list[float]] = {"fp32": [], "bf16-mixed": []}
    first_loss: dict[str, float] = {}
    for _ in range(args.repeats):
        for arm in times:
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**SMOLLM2, num_hidden_layers=args.layers)).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
            for index, (ids, targets) in enumerate(data):
                seconds, loss = step(model, optimizer, ids, targets, arm == "bf16-mixed")
                if index == 0:  # warm-up: allocator and autocast caches
                    first_loss.setdefault(arm, loss)
                else:
                    times[arm].append(seconds)
    medians = {arm: statistics.median(values) for arm, values in times.items()}
    tokens = 4 * 511
    print(f"| precision | median step ({tokens} tokens) | tokens/s | speed vs fp32 | first-step loss |")
    print("|---|---|---|---|---|")
    for arm, median in medians.items():
        ratio = medians["fp32"] / median
        print(f"| {arm} | {median:.2f} s | {tokens / median:.0f} | {ratio:.2f}x | {first_loss[arm]:.4f} |")
    result = {"args": vars(args), "threads": torch.get_num_threads(), "median_s": medians, "first_loss": first_loss}
    out = Path(__file__).parent / "results" / "precision.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
