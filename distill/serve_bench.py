"""Serving speed and energy of a run's artifacts against the teacher, on the same real inputs.

    python -m distill.serve_bench run_dir=logs/bert_to_tiny/runs/<run> teacher_path=<teacher folder>
    python -m distill.serve_bench run_dir=logs/smollm2_to_small/runs/<run> data=shakespeare \
        teacher_path=$DISTILL_LM_TEACHER

    python -m distill.serve_bench run_dir=<run> data=shakespeare teacher_path=$DISTILL_LM_TEACHER \
        torch_arms=false +gguf_arms.teacher_f16=<teacher-f16.gguf>    # the LM frontier's runtimes

Classifiers: p50/p90 latency of one batch of real dev sentences at each batch size, throughput and J per
1,000 requests, for the teacher, ``student/`` (PyTorch fp32), the int8 export (ONNX Runtime: the run's
``student_int8/`` after QAT, or ``int8_path``, e.g. ``model_int8/`` of ``distill.quantize``) and, on a GPU,
the teacher and student in bf16, the 2:4 student and the student's int8 GEMMs (``distill.serve.gpu_arms``,
metered by NVML's energy counter). Causal LMs: greedy generation from a held-out prompt, batch 1, in PyTorch,
ONNX Runtime (the int8 export) and llama.cpp's server (the teacher's GGUF file, the run's ``student_gguf/*.gguf``,
``gguf_arms``; also ``parallel`` requests at once): time to first token, prefill and decode tokens/s, J per
1,000 tokens, and each artifact's size and held-out perplexity through its own runtime
(:mod:`distill.serve.lm_bench`). Arms are interleaved (``distill.serve.latency``).
An artifact that cannot be served here is listed under ``skipped`` with the reason. Writes
``serve_bench.json`` into the run folder.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distill.config.cli import CONFIG_DIR
from distill.config.schemas import register_schemas
from distill.data.base import DataModule
from distill.pipeline.checks import check_model
from distill.pipeline.interrupt import ends_on_signal
from distill.serve import llamacpp
from distill.serve.energy import NvmlEnergy, cpu_energy
from distill.serve.gguf_checks import torch_perplexity, unpadded_windows
from distill.serve.gpu_arms import gpu_models, synchronized
from distill.serve.int8_arithmetic import int8_arithmetic
from distill.serve.latency import measure, summarize
from distill.serve.llamacpp_server import gguf_arms, teacher_gguf_arm
from distill.serve.lm_bench import BenchSettings, LMArm, bench_lm, check_settings, llamacpp_arm, onnx_arm, torch_arm
from distill.serve.onnx_decoder import load_onnx
from distill.serve.onnx_int8 import ONNX_FILE
from distill.tasks.base import Task
from distill.utils.devices import cpu_flags, model_device, to_device
from distill.utils.references import load_causal_lm
from distill.utils.run_record import git_state, write_json

log = logging.getLogger("distill.serve_bench")


def run_task(cfg: DictConfig) -> Task:
    """The task the run trained: ``task`` when given, else the one in the run folder's own config."""
    if cfg.get("task") is not None:
        return instantiate(cfg.task)
    saved = Path(cfg.run_dir) / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(
            f"run_dir={cfg.run_dir!r} has no .hydra/config.yaml to read its task from: name it, e.g. task=causal_lm"
        )
    return instantiate(OmegaConf.load(saved).task)


def load_model(task: Task, reference: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model of the task's class by reference (a GGUF teacher too) in ``dtype``, in eval mode."""
    if task.generates:  # cast, not loaded in dtype: a GGUF teacher is de-quantized (and cached) once, in fp32
        return load_causal_lm(str(reference)).to(dtype).eval()
    return task.auto_model.from_pretrained(reference, dtype=dtype, **task.model_kwargs()).eval()


def float_models(cfg: DictConfig, task: Task) -> dict[str, nn.Module]:
    """The PyTorch fp32 arms on the CPU, loaded once for every thread count."""
    models = {}
    if cfg.teacher_path:
        models["teacher_fp32"] = load_model(task, cfg.teacher_path)
    models["student_fp32"] = load_model(task, Path(cfg.run_dir) / "student")
    return models


def serve(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    return model(**batch)


def request(call: Callable[[], Any], model: nn.Module) -> Callable[[], Any]:
    """One timed request: on a GPU it ends when the device has finished, not when the launches are queued."""
    return synchronized(call) if model_device(model).type == "cuda" else call


@torch.inference_mode()
def bench_classifier(cfg: DictConfig, datamodule: DataModule, models: dict[str, nn.Module], threads: int, energy: Any):
    rows = []
    for batch_size in cfg.batch_sizes:
        batch = next(iter(datamodule.dataloader("validation", batch_size, shuffle=False)))
        batch.pop("labels")
        arms = {
            name: request(functools.partial(serve, model, to_device(batch, model_device(model))), model)
            for name, model in models.items()
        }
        for name, samples in measure(arms, cfg.warmup, cfg.repeats, energy).items():
            rows.append({"arm": name, "threads": threads, "batch_size": batch_size, **summarize(samples, batch_size)})
    return rows


def int8_artifact(cfg: DictConfig) -> Path | None:
    """``int8_path`` if given, else the run's ``student_int8/`` (QAT runs) if there is one."""
    if cfg.int8_path:
        if not (Path(cfg.int8_path) / ONNX_FILE).is_file():
            raise FileNotFoundError(f"int8_path={cfg.int8_path!r} holds no {ONNX_FILE}")
        return Path(cfg.int8_path)
    exported = Path(cfg.run_dir) / "student_int8"
    return exported if (exported / ONNX_FILE).is_file() else None


def held_out_blocks(datamodule: DataModule, count: int | None) -> list[list[int]]:
    """The real tokens of the first ``count`` test blocks (``None``: all): every runtime's perplexity scores exactly
    these tokens, each block a window from an empty cache."""
    return unpadded_windows(datamodule.dataloader("test", 1, shuffle=False), count)


def lm_arms(
    cfg: DictConfig, task: Task, datamodule: DataModule, int8_path: Path | None, slot_tokens: int
) -> list[LMArm]:
    """Every causal-LM artifact with its held-out perplexity in its own runtime, measured once on the most threads;
    ``slot_tokens``: a request's prompt and new tokens (a llama.cpp server slot's context)."""
    blocks, threads = held_out_blocks(datamodule, cfg.perplexity_blocks), max(cfg.threads)
    torch.set_num_threads(threads)
    arms = []
    if cfg.torch_arms:
        for name, model in float_models(cfg, task).items():
            artifact = cfg.teacher_path if name.startswith("teacher") else Path(cfg.run_dir) / "student"
            arms.append(torch_arm(name, model, artifact, torch_perplexity(model, blocks)))
    if int8_path is not None:
        ppl = torch_perplexity(load_onnx(int8_path, threads), blocks)
        arms.append(onnx_arm("student_int8", int8_path, load_onnx, ppl))
    for name, path in gguf_arms(Path(cfg.run_dir), cfg.teacher_path, cfg.gguf_arms).items():
        ppl = llamacpp.perplexity(path, blocks, threads)
        arms.append(llamacpp_arm(name, path, ppl, cfg.parallel, slot_tokens))
    return arms


def prompt_ids(cfg: DictConfig, datamodule: DataModule) -> dict[str, torch.Tensor]:
    prompt = datamodule.prompts("test", 1, cfg.generation.prompt_tokens)[0]
    encoded = datamodule.tokenizer(prompt, return_tensors="pt")
    return {name: encoded[name] for name in ("input_ids", "attention_mask")}


def bench_classifiers(cfg: DictConfig, task: Task, datamodule: DataModule, int8_path: Path | None, gpu: dict):
    """Every thread count's CPU rows, then the GPU arms'; the energy counters used."""
    models, rows, energy = float_models(cfg, task), [], None
    for threads in cfg.threads:
        torch.set_num_threads(threads)
        arms = dict(models)
        if int8_path is not None:  # an ORT session's thread count is fixed when it is created
            arms["student_int8"] = load_onnx(int8_path, threads)
        energy = cpu_energy(threads, os.cpu_count() or 1)
        rows += bench_classifier(cfg, datamodule, arms, threads, energy)
    gpu_energy = NvmlEnergy() if gpu else None
    if gpu:  # the GPU arms among themselves: interleaving them with seconds-long CPU arms would heat nothing
        rows += bench_classifier(cfg, datamodule, gpu, torch.get_num_threads(), gpu_energy)
    return rows, energy, gpu_energy


def bench_causal_lms(cfg: DictConfig, task: Task, datamodule: DataModule, int8_path: Path | None, gpu: dict):
    """As :func:`bench_classifiers`, for greedy generation in each runtime (:mod:`distill.serve.lm_bench`)."""
    settings = BenchSettings(cfg.generation.new_tokens, cfg.warmup, cfg.repeats)
    ids = prompt_ids(cfg, datamodule)
    arms = lm_arms(cfg, task, datamodule, int8_path, ids["input_ids"].shape[1] + settings.new_tokens)
    rows, energy = [], None
    for threads in cfg.threads:
        torch.set_num_threads(threads)
        energy = cpu_energy(threads, os.cpu_count() or 1)
        rows += bench_lm(arms, ids, threads, settings, energy)
    gpu_energy = NvmlEnergy() if gpu else None
    if gpu:
        gpu_arms = [torch_arm(name, model, None, None) for name, model in gpu.items()]
        rows += bench_lm(gpu_arms, ids, torch.get_num_threads(), settings, gpu_energy)
    return rows, energy, gpu_energy


def serve_bench(cfg: DictConfig) -> dict[str, Any]:
    student_dir = Path(cfg.run_dir) / "student"
    if not (student_dir / "config.json").is_file():
        raise FileNotFoundError(f"run_dir={cfg.run_dir!r} has no exported student/ (config.json)")
    if cfg.teacher_path:
        check_model("teacher_path", cfg.teacher_path)
    task, int8_path = run_task(cfg), int8_artifact(cfg)
    causal = task.generates
    if causal:  # bad settings, a missing GGUF file or llama.cpp runtime are named before any model loads
        check_settings(cfg.parallel, cfg.perplexity_blocks)
        if gguf_arms(Path(cfg.run_dir), cfg.teacher_path, cfg.gguf_arms) and max(cfg.threads) > 1:
            warn_passive_openmp()
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test" if causal else "validate")
    gpu, skipped = gpu_models(functools.partial(load_model, task), cfg.teacher_path, student_dir, causal)
    bench = bench_causal_lms if causal else bench_classifiers
    rows, energy, gpu_energy = bench(cfg, task, datamodule, int8_path, gpu)
    measured = results(rows, skipped, energy, gpu_energy, int8_path is not None)
    if causal:  # what the LM frontier (distill.serve.frontier_lm) reads beside the rows
        reference = teacher_gguf_arm(cfg.teacher_path)
        measured |= {"reference_arm": reference, "perplexity_blocks": cfg.perplexity_blocks, **cfg.generation}
        measured["git"] = git_state()  # the bench's own commit: the run's git.json is the training's
    return measured


def warn_passive_openmp() -> None:
    """llama.cpp's CPU backend and PyTorch share one OpenMP runtime in this process (the same libgomp.so.1), which
    reads OMP_WAIT_POLICY once: PASSIVE puts llama.cpp's threads to sleep after every graph, and its two-thread
    decode of the SmolLM2 teacher fell from 122-136 to 46-51 tokens/s (docs/results/deploy.md)."""
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        log.warning(
            "OMP_WAIT_POLICY=PASSIVE slows llama.cpp's multi-threaded arms to well under half their speed (they share "
            "PyTorch's OpenMP runtime here): unset it for a bench with llama.cpp arms"
        )


def results(rows: list[dict], skipped: dict[str, str], energy: Any, gpu_energy: Any, int8: bool) -> dict[str, Any]:
    # PyTorch's OpenMP pool spins after each call unless OMP_WAIT_POLICY=PASSIVE, which slows the arm that runs
    # next on a machine with few cores: the README's commands set it; the result records it.
    wait_policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    return {
        "rows": rows, "skipped": skipped, "energy_source": energy.source if energy else None, "cpu": os.cpu_count(),
        "omp_wait_policy": wait_policy, "gpu": torch.cuda.get_device_name() if gpu_energy else None,
        "gpu_energy_source": gpu_energy.source if gpu_energy else None,
        "int8_arithmetic": int8_arithmetic() if int8 else None, "cpu_flags": vector_flags(),
    }  # fmt: skip


def vector_flags() -> list[str] | None:
    """The CPU's vector extensions that decide int8 and quantized kernels (llama.cpp's, ONNX Runtime's)."""
    flags = cpu_flags()
    return None if flags is None else sorted(f for f in flags if f in ("avx2", "avx_vnni") or f.startswith("avx512"))


def markdown(results: dict[str, Any]) -> str:
    columns = [key for key in results["rows"][0] if key not in ("arm",)]
    lines = ["| arm | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in results["rows"]:
        cells = [f"{row[key]:.4g}" if isinstance(row[key], float) else str(row[key]) for key in columns]
        lines.append(f"| {row['arm']} | " + " | ".join(cells) + " |")
    lines += [f"skipped {name}: {reason}" for name, reason in results["skipped"].items()]
    energy = [f"energy: {results['energy_source']}"]
    if results.get("gpu"):
        energy.append(f"GPU arms on {results['gpu']}, energy: {results['gpu_energy_source']}")
    return "\n".join([*lines, *energy])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="serve_bench")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg, resolve=True))
    with ends_on_signal("distill.serve_bench", Path(cfg.paths.output_dir)):
        results = serve_bench(cfg)
    write_json(Path(cfg.run_dir) / "serve_bench.json", results)
    log.info("serve bench of %s\n%s", cfg.run_dir, markdown(results))


def cli() -> None:
    """Console entry point (`distill-serve-bench`); the schemas must be known before Hydra composes."""
    register_schemas()
    main()


if __name__ == "__main__":
    cli()
