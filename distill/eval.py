"""Evaluate a saved student: accuracy, parameter counts and CPU latency.

    python -m distill.eval student_path=logs/bert_to_tiny/runs/<run>/student

Loads the model with plain ``AutoModelForSequenceClassification.from_pretrained``, so it
measures exactly what a user of the exported folder gets; an int8 export (``student_int8/``, with
``model.onnx``) is served by ONNX Runtime instead. Writes eval.json to the run folder.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from distill.config.cli import CONFIG_DIR
from distill.config.schemas import register_schemas
from distill.data.glue import GlueDataModule
from distill.serve.int8_arithmetic import int8_arithmetic
from distill.serve.onnx_int8 import ONNX_FILE, OnnxModel
from distill.utils.devices import model_device, to_device
from distill.utils.run_record import count_parameters, write_json

log = logging.getLogger("distill.eval")


@torch.inference_mode()
def accuracy(model: PreTrainedModel, datamodule: GlueDataModule) -> float:
    correct = total = 0
    device = model_device(model)
    for batch in datamodule.val_dataloader():
        labels = batch.pop("labels").to(device)
        correct += int((model(**to_device(batch, device)).logits.argmax(dim=-1) == labels).sum())
        total += labels.numel()
    return correct / total


@torch.inference_mode()
def latency_ms(model: PreTrainedModel, datamodule: GlueDataModule, batch_size: int, warmup: int, repeats: int) -> float:
    """Median forward time of one dev batch of ``batch_size`` real sentences, in milliseconds."""
    batch = next(iter(datamodule.dataloader("validation", batch_size, shuffle=False)))
    batch.pop("labels")
    for _ in range(warmup):
        model(**batch)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(**batch)
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def load_served(path: Path) -> torch.nn.Module:
    """A save_pretrained classifier (PyTorch), or an int8 export (ONNX Runtime)."""
    if (path / ONNX_FILE).is_file():
        return OnnxModel(path)
    return AutoModelForSequenceClassification.from_pretrained(path).eval()


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    datamodule: GlueDataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("validate")
    if cfg.latency.threads:
        torch.set_num_threads(cfg.latency.threads)
    model = load_served(Path(cfg.student_path))
    counts = count_parameters(model) if isinstance(model, PreTrainedModel) else {"params": None, "nonzero_params": None}
    results: dict[str, Any] = {
        "student_path": str(cfg.student_path),
        "task": datamodule.task,
        "val_examples": len(datamodule.splits["validation"]),
        "val_acc": accuracy(model, datamodule),
        "params": counts["params"],
        "nonzero_params": counts["nonzero_params"],
        "torch_threads": torch.get_num_threads(),
    }
    if isinstance(model, OnnxModel):
        results["int8_arithmetic"] = int8_arithmetic()
    for batch_size in cfg.latency.batch_sizes:
        results[f"latency_ms/batch_{batch_size}"] = latency_ms(
            model, datamodule, batch_size, cfg.latency.warmup, cfg.latency.repeats
        )
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg, resolve=True))
    results = evaluate(cfg)
    write_json(Path(cfg.paths.output_dir) / "eval.json", results)
    for key, value in results.items():
        print(f"{key:>24}: {value}")


def cli() -> None:
    """Console entry point (`distill-eval`); the schemas must be known before Hydra composes."""
    register_schemas()
    main()


if __name__ == "__main__":
    cli()
