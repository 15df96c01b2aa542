"""Post-training int8 export of a saved model for ONNX Runtime, the deployment ``qat8`` ends with.

    python -m distill.quantize model=<run>/student                          # causal LM: held-out perplexity
    python -m distill.quantize task=classification data=sst2 model=<run>/student

A student trained with ``compression=qat8`` gets ``student_int8/`` at the end of its run, and its fake-quant
score is its deployed score. This is the same export for a model trained without QAT: ORT's dynamic int8 needs
no calibration, and both scores (float and int8) are reported, so what post-training quantization costs is seen.
Writes ``<run folder>/model_int8/`` (``distill.serve.onnx_int8``) and ``quantize.json``.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from distill.pipeline.checks import check_model, skeleton
from distill.pipeline.entry import hydra_cli
from distill.pruning.oneshot.sequential import target_linears
from distill.serve.onnx_decoder import load_onnx
from distill.serve.onnx_int8 import save_int8
from distill.utils.references import load_tokenizer, resolve
from distill.utils.run_record import git_state, write_json

log = logging.getLogger("distill.quantize")


def quantize(cfg: DictConfig) -> dict[str, Any]:
    output_dir = Path(cfg.paths.output_dir)
    task = instantiate(cfg.task)
    # The layers to quantize, from the model's config alone: a bad include fails before the model loads.
    target_linears(skeleton(check_model("model", cfg.model), task.auto_model), cfg.include, cfg.exclude)
    datamodule = instantiate(cfg.data)
    model = task.auto_model.from_pretrained(resolve(cfg.model), dtype=torch.float32).eval()
    layers = target_linears(model, cfg.include, cfg.exclude)
    datamodule.setup("test")
    started = time.perf_counter()
    int8_dir = save_int8(
        model, layers, load_tokenizer(cfg.model), output_dir / "model_int8",
        functools.partial(task.export_onnx, model, datamodule),
    )  # fmt: skip
    report: dict[str, Any] = {
        "model": cfg.model,
        "layers": len(layers),
        "export_seconds": time.perf_counter() - started,
    }
    if cfg.evaluate:
        report["float"] = task.score(model, datamodule)
        report["int8"] = task.score(load_onnx(int8_dir), datamodule)
    write_json(output_dir / "quantize.json", report | {"git": git_state()})
    return report


# Console entry point `distill-quantize`.
cli = hydra_cli("quantize", quantize)


if __name__ == "__main__":
    cli()
