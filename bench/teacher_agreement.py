"""How far a served teacher's stored responses are from the in-process teacher's, on evenly spaced prompts of a
generation store (docs/results/served-teacher.md, acceptance 1):

    python bench/teacher_agreement.py <store folder> <teacher GGUF or folder> [--first 2064] [--count 48]

Both teachers answer greedily with the store's settings; prints identical responses, equal tokens at the same
position and ROUGE-L between the two.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets

from distill.serve.generation import Generator, SamplingSettings, end_token_ids
from distill.tasks.rouge import rouge_l
from distill.utils.references import load_causal_lm, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("teacher")
    parser.add_argument("--first", type=int, default=2064, help="the first held-out row (train + validation)")
    parser.add_argument("--count", type=int, default=48)
    args = parser.parse_args()
    rows = datasets.Dataset.from_parquet(sorted(map(str, args.store.glob("shard-*.parquet"))))
    held_out = len(rows) - args.first
    picked = rows.select([args.first + i * held_out // args.count for i in range(args.count)]).to_dict()
    settings = json.loads(json.loads((args.store / "key.json").read_text())["settings"])
    tokenizer, model = load_tokenizer(args.teacher), load_causal_lm(args.teacher)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generate = Generator(model, SamplingSettings(**settings), pad, end_token_ids(model, tokenizer), 16)
    local = [tokens for tokens, _ in generate(picked["prompt_ids"])]
    served = picked["response_ids"]
    same = sum(a == b for a, b in zip(local, served, strict=True))
    equal = sum(x == y for a, b in zip(local, served, strict=True) for x, y in zip(a, b, strict=False))
    text = [tokenizer.batch_decode(ids, skip_special_tokens=True) for ids in (local, served)]
    score = 100 * sum(map(rouge_l, *text)) / args.count
    print(
        f"{args.count} held-out prompts: identical {same}, equal tokens at the same position {equal}/"
        f"{sum(map(len, served))}, ROUGE-L between the teachers {score:.1f}"
    )


if __name__ == "__main__":
    main()
