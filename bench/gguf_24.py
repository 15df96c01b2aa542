"""What llama.cpp keeps of a 2:4-sparse student on CPU: its file size and decode speed against the dense one.

    python bench/gguf_24.py --model logs/smollm2_to_small/runs/<run>/student [--quant f16 q8_0 q4_0] [--threads 1 2]

The student's block Linears get an exact 2:4 magnitude mask (``distill.kernels.nm_mask``, what ``nm24`` and the
one-shot solvers leave), then the dense and the masked model are exported at each preset
(``distill.serve.gguf_export``) and served in llama.cpp's server (``distill.serve.llamacpp_server``), batch 1, 32
tokens after a 32-token prompt, the two arms interleaved round by round, median of ``--repeats``. llama.cpp's CPU
kernels have no sparse format: zeros are stored and multiplied, so the ratio printed is expected to be ~1.0.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.architectures.linears import block_linear_names, linear_weight
from distill.kernels.sparsity import nm_mask
from distill.serve.gguf_export import export_gguf
from distill.serve.llamacpp_server import LlamaServer

PROMPT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows"


@torch.no_grad()
def masked_24(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every block Linear cut to 2:4 by magnitude, in place."""
    for name in block_linear_names(model):
        weight = linear_weight(model.get_submodule(name))
        weight.mul_(nm_mask(weight, 2, 4).to(weight.dtype))
    return model


def decode_rates(files: dict[str, Path], prompt: list[int], threads: int, repeats: int) -> dict[str, float]:
    """llama.cpp's own decode tokens/s of each file, arms interleaved, median after one warm-up round."""
    servers = {name: LlamaServer(path, threads) for name, path in files.items()}
    rates: dict[str, list[float]] = {name: [] for name in files}
    for round_ in range(repeats + 1):
        for name, server in servers.items():
            timing = server.complete(prompt, 32)
            if round_:
                rates[name].append(timing.decode_tokens_per_s)
    for server in servers.values():
        server.close()
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a saved causal LM folder (a run's student/)")
    parser.add_argument("--quant", nargs="+", default=["f16", "q8_0", "q4_0"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    sparse = masked_24(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32))
    prompt = tokenizer(PROMPT)["input_ids"][:32]
    print("| preset | threads | dense MB | 2:4 MB | dense tokens/s | 2:4 tokens/s | 2:4 / dense |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for quant in args.quant:
            files = {kind: Path(folder) / f"{kind}-{quant}.gguf" for kind in ("dense", "2:4")}
            for path, model in zip(files.values(), (dense, sparse), strict=True):
                export_gguf(model, tokenizer, path, quant)
            sizes = {kind: path.stat().st_size / 1e6 for kind, path in files.items()}
            for threads in args.threads:
                rates = decode_rates(files, prompt, threads, args.repeats)
                print(f"| {quant} | {threads} | {sizes['dense']:.1f} | {sizes['2:4']:.1f} | {rates['dense']:.1f} | "
                      f"{rates['2:4']:.1f} | {rates['2:4'] / rates['dense']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
