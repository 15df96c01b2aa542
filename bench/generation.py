"""Teacher generation speed for the generation stage: prefill and decode tokens/s by prompts per call.

    python bench/generation.py [--model <reference>] [--batch-sizes 1 16 48] [--prompt-tokens 94] [--new-tokens 32]

Times ``distill.serve.generation.Generator`` (left-padded, KV-cached, greedy ``generate``) at 1 new token (the
prefill) and at ``1 + new_tokens`` (prefill + decode steps), median of ``--repeats`` runs, on synthetic
prompts of ``--prompt-tokens`` ids (the cost does not depend on which ids). The default model is
``$DISTILL_LM_TEACHER``. Prints a markdown table with the speed-up of each batch size over batch 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from distill.serve.generation import Generator, SamplingSettings
from distill.utils.references import load_causal_lm


def seconds(model, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    # No end token can stop a response early: every call makes exactly new_tokens tokens.
    never = model.config.vocab_size  # an id no model output can be
    generator = Generator(model, SamplingSettings(max_new_tokens=new_tokens), 0, {never}, batch_size=len(prompts))
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        generator(prompts)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("DISTILL_LM_TEACHER", "HuggingFaceTB/SmolLM2-135M-Instruct"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 48])
    parser.add_argument("--prompt-tokens", type=int, default=94)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = load_causal_lm(args.model)
    print("| prompts per call | prefill tokens/s | decode tokens/s | decode ms/step | decode speed-up over 1 |")
    print("|---|---|---|---|---|")
    baseline = None
    for batch in args.batch_sizes:
        prompts = [list(range(1000, 1000 + args.prompt_tokens))] * batch
        prefill = seconds(model, prompts, 1, args.repeats)
        step = (seconds(model, prompts, 1 + args.new_tokens, args.repeats) - prefill) / args.new_tokens
        decode = batch / step
        baseline = baseline or decode
        print(
            f"| {batch} | {batch * args.prompt_tokens / prefill:.0f} | {decode:.0f} | {step * 1000:.0f} | "
            f"{decode / baseline:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
