"""GGUF files of a causal LM (a run's student, or any model by reference) for llama.cpp, each checked there.

    python -m distill.export_gguf model=<run>/student                      # f16, q8_0, q4_1, q4_k_m
    python -m distill.export_gguf model=<run>/student 'quant=[q4_1]' check=false

Writes ``<stem>-<preset>.gguf`` (``distill.serve.gguf_export``: tensors, llama.cpp's names and types, the
tokenizer and chat template) into ``out_dir`` (``<run>/student_gguf/`` for a run's ``student/``) and
``export_gguf.json`` into the command's run folder: each file's size, its held-out perplexity in llama.cpp
against PyTorch's on the same windows, whether llama.cpp tokenizes as the Hugging Face tokenizer does, and,
for the float presets, greedy tokens against PyTorch's (``distill.serve.gguf_checks``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from distill.data.text import TextDataModule
from distill.pipeline.checks import check_model
from distill.pipeline.entry import hydra_cli
from distill.serve.gguf_checks import check_ggufs, unpadded_windows, write_ggufs
from distill.utils.references import gguf_file, load_causal_lm, load_tokenizer
from distill.utils.run_record import git_state, write_json

log = logging.getLogger("distill.export_gguf")


def destination(cfg: DictConfig) -> tuple[Path, str]:
    """The folder the files go to and their stem: ``<run>/student`` -> ``<run>/student_gguf``, ``student``;
    a GGUF file or hub id -> the command's run folder (or ``out_dir``), the file's or model's name."""
    source = Path(cfg.model).expanduser()
    local_folder = source.is_dir() and gguf_file(cfg.model) is None
    stem = source.name if local_folder else (gguf_file(cfg.model) or source).stem
    if cfg.out_dir:
        return Path(cfg.out_dir), stem
    return (source.parent / f"{source.name}_gguf" if local_folder else Path(cfg.paths.output_dir)), stem


def held_out(datamodule: TextDataModule, limit: int | None, count: int, length: int) -> tuple[list, list]:
    """The first ``limit`` test blocks (padding removed) and ``count`` held-out prompts of ``length`` tokens."""
    datamodule.setup("test")
    prompts = [prompt for prompt, _ in datamodule.reference_prompts("test", count, length, 0)]
    return unpadded_windows(datamodule.test_dataloader(), limit), prompts


def export(cfg: DictConfig) -> dict[str, Any]:
    check_model("model", cfg.model)
    model, tokenizer = load_causal_lm(cfg.model), load_tokenizer(cfg.model)
    out_dir, stem = destination(cfg)
    report: dict[str, Any] = {"model": cfg.model, "files": write_ggufs(model, tokenizer, out_dir, cfg.quant, stem)}
    if cfg.check:
        blocks, prompts = held_out(instantiate(cfg.data), cfg.perplexity_blocks, cfg.prompts, cfg.prompt_tokens)
        report["checks"] = check_ggufs(model, tokenizer, report["files"], blocks, prompts, cfg.new_tokens, cfg.threads)
    write_json(Path(cfg.paths.output_dir) / "export_gguf.json", report | {"git": git_state()})
    return report


# Console entry point `distill-export-gguf`.
cli = hydra_cli("export_gguf", export)

if __name__ == "__main__":
    cli()
