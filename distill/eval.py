"""Evaluate a saved student: accuracy, parameter counts and CPU latency.

    python -m distill.eval student_path=logs/bert_to_tiny/runs/<run>/student

Loads the model with the task's plain ``auto_model.from_pretrained`` (conf/task/), so it
measures exactly what a user of the exported folder gets; an int8 export (``student_int8/``, with
``model.onnx``) is served by ONNX Runtime instead. Writes eval.json to the run folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

from distill.config.cli import CONFIG_DIR
from distill.config.schemas import register_schemas
from distill.data.base import DataModule
from distill.pipeline.checks import check_saved_model
from distill.pipeline.harness import eval_harness
from distill.pipeline.interrupt import ends_on_signal
from distill.serve.int8_arithmetic import int8_arithmetic
from distill.serve.latency import latency_ms
from distill.serve.onnx_int8 import ONNX_FILE, OnnxModel
from distill.tasks.base import Task
from distill.utils.run_record import count_parameters, write_json

log = logging.getLogger("distill.eval")


def load_served(path: Path, task: Task) -> torch.nn.Module:
    """A save_pretrained model of the task's class (PyTorch), or an int8 export (ONNX Runtime)."""
    if (path / ONNX_FILE).is_file():
        return OnnxModel(path)
    return task.auto_model.from_pretrained(path, **task.model_kwargs()).eval()


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    check_saved_model("student_path", cfg.student_path)  # the data's tokenizer comes from it: checked first
    datamodule: DataModule = instantiate(cfg.data)
    task: Task = instantiate(cfg.task)
    datamodule.prepare_data()
    datamodule.setup("validate")
    if cfg.latency.threads:
        torch.set_num_threads(cfg.latency.threads)
    model = load_served(Path(cfg.student_path), task)
    counts = count_parameters(model) if isinstance(model, PreTrainedModel) else {"params": None, "nonzero_params": None}
    results: dict[str, Any] = {
        "student_path": str(cfg.student_path),
        "task": datamodule.task,
        "val_examples": len(datamodule.splits["validation"]),
        **task.score(model, datamodule),
        "params": counts["params"],
        "nonzero_params": counts["nonzero_params"],
        "torch_threads": torch.get_num_threads(),
    }
    results |= eval_harness(cfg)  # lm-evaluation-harness scores, when harness.tasks names any
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
    with ends_on_signal("distill.eval", Path(cfg.paths.output_dir)):
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
