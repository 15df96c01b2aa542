"""GGUF files of a causal LM, written and checked against the PyTorch model they came from.

For each quantization preset: the file (:func:`distill.serve.gguf_export.export_gguf`), its size, and what
llama.cpp's runtime makes of it: held-out perplexity on the same windows as the PyTorch model's, and, for the
float presets (f32/f16/bf16), whether its greedy tokens equal PyTorch's. A greedy divergence between two float
runtimes is expected where two candidates are nearly tied (the order of float sums decides), so each one is
reported with PyTorch's top-2 logit gap at that step: a gap of a few hundredths is float order, a gap of
whole logits is a conversion bug. Perplexity through the runtime is the check that sees every position.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.serve.gguf_export import export_gguf
from distill.serve.gguf_types import preset as check_preset
from distill.serve.llamacpp import LlamaCpp, perplexity

log = logging.getLogger(__name__)
FLOAT_PRESETS = ("f32", "f16", "bf16")
# A file this much worse than PyTorch on the held-out windows is worth a warning at export time.
QUALITY_WARNING = 1.10


@torch.inference_mode()
def torch_perplexity(model: nn.Module, blocks: Sequence[Sequence[int]]) -> float:
    """``exp(total next-token NLL / tokens)`` of ``model`` (PyTorch, or the ONNX Runtime decoder) over ``blocks``,
    one window each (fp32 sums): the same tokens llama.cpp's :func:`~distill.serve.llamacpp.perplexity` scores."""
    total, count = 0.0, 0
    for block in blocks:
        ids = torch.as_tensor([list(block)], dtype=torch.long)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += len(block) - 1
    return math.exp(total / count)


@torch.inference_mode()
def torch_greedy(model: nn.Module, prompt: Sequence[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of ``model`` after ``prompt`` and, at each step, the gap between its top two logits."""
    ids = torch.as_tensor([list(prompt)], dtype=torch.long)
    output = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    gaps = [float(step[0].float().topk(2).values.diff().abs()) for step in output.logits]
    return output.sequences[0, len(prompt) :].tolist(), gaps


def greedy_agreement(
    model: nn.Module, runtime: LlamaCpp, prompts: Sequence[Sequence[int]], new_tokens: int
) -> list[dict[str, Any]]:
    """Per prompt: whether llama.cpp's greedy tokens equal PyTorch's and, if not, where and by what gap."""
    rows = []
    for prompt in prompts:
        expected, gaps = torch_greedy(model, prompt, new_tokens)
        produced = runtime.greedy(prompt, new_tokens)
        first = next(
            (step for step, pair in enumerate(zip(expected, produced, strict=True)) if len(set(pair)) > 1), None
        )
        rows.append({
            "equal": first is None, "first_divergence": first,
            "torch_top2_gap_there": gaps[first] if first is not None else None,
        })  # fmt: skip
    return rows


def tokenizer_agreement(tokenizer: Any, runtime: LlamaCpp, texts: Sequence[str]) -> bool:
    """Whether llama.cpp tokenizes each text as the Hugging Face tokenizer does (its special tokens too)."""
    return all(runtime.tokenize(text) == tokenizer(text)["input_ids"] for text in texts)


def write_ggufs(model: nn.Module, tokenizer: Any, out_dir: Path, presets: Sequence[str], stem: str) -> dict[str, Any]:
    """Write ``<out_dir>/<stem>-<preset>.gguf`` for each preset; each file's path, size and tensor types."""
    for name in presets:  # a typo in the last preset must not cost the minutes of writing the first ones
        check_preset(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for preset in presets:
        path = out_dir / f"{stem}-{preset}.gguf"
        record = export_gguf(model, tokenizer, path, preset)
        files[preset] = {
            "path": str(path),
            "file_bytes": path.stat().st_size,
            "tensor_types": record.get("tensor_types"),
        }
        log.info("%s: %.2f MB", path.name, path.stat().st_size / 1e6)
    return files


def check_ggufs(
    model: nn.Module, tokenizer: Any, files: dict[str, Any], blocks: Sequence[Sequence[int]],
    prompts: Sequence[Sequence[int]], new_tokens: int, threads: int = 1,
) -> dict[str, Any]:  # fmt: skip
    """Each file of :func:`write_ggufs` in llama.cpp against ``model`` in PyTorch: perplexity over ``blocks``,
    tokenization of the prompts' text, and greedy tokens after ``prompts`` for the float presets."""
    reference = torch_perplexity(model.float().eval(), blocks)
    texts = [tokenizer.decode(prompt) for prompt in prompts]
    checks: dict[str, Any] = {"torch_perplexity": reference, "perplexity_blocks": len(blocks)}
    for preset, file in files.items():
        score = perplexity(file["path"], blocks, threads)
        checks[preset] = {"perplexity": score, "perplexity_vs_torch": score / reference}
        with LlamaCpp(file["path"], threads, n_ctx=max(map(len, prompts)) + new_tokens) as runtime:
            checks[preset]["tokenizer_equal"] = tokenizer_agreement(tokenizer, runtime, texts)
            if preset in FLOAT_PRESETS:
                checks[preset]["greedy"] = greedy_agreement(model, runtime, prompts, new_tokens)
        log.info("%s: perplexity %.3f in llama.cpp, %.3f in PyTorch", Path(file["path"]).name, score, reference)
        if score > QUALITY_WARNING * reference:
            log.warning(
                "%s raises held-out perplexity %.1f%% over PyTorch's: a student distilled from a quantized teacher "
                "moves its weights less than this grid's step, and re-quantizing to the teacher's own type rounds "
                "them back (docs/results/deploy.md); try another preset (q4_k_m, q5_0, q8_0)",
                preset, 100 * (score / reference - 1),
            )  # fmt: skip
    return checks


def unpadded_windows(batches: Iterable[dict[str, Any]], limit: int | None = None) -> list[list[int]]:
    """The token ids of each block of ``batches`` (packed held-out blocks) without its padding, the first
    ``limit`` blocks (all if None): the windows of the project's held-out perplexity."""
    windows = []
    for batch in batches:
        for ids, real in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            windows.append(ids[real == 1].tolist())
            if limit is not None and len(windows) == limit:
                return windows
    return windows


def run_ggufs(
    student: nn.Module, tokenizer: Any, out_dir: Path, presets: Sequence[str], batches: Iterable[dict[str, Any]]
) -> dict[str, Any]:
    """A training run's GGUF export (``task.gguf``): ``student_gguf/student-<preset>.gguf`` and each file's
    size and held-out perplexity in llama.cpp, on the windows of the run's own ``test/ppl``."""
    files, windows = write_ggufs(student, tokenizer, out_dir, presets, "student"), unpadded_windows(batches)
    metrics = {}
    for preset, file in files.items():
        metrics[f"student_gguf_{preset}/file_bytes"] = file["file_bytes"]
        metrics[f"student_gguf_{preset}/test_ppl"] = perplexity(file["path"], windows, torch.get_num_threads())
    return metrics
