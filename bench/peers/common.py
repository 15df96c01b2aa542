"""What every arm of the peer bench shares: the experiment's config, its training batches, the measured facts
of a training process, the held-out evaluation and the record each arm writes.

Every arm reads its recipe from the same composed config (``experiment=smollm2_to_small`` plus the bench's
overrides), draws its batches from distill's own data module in the order distill's training loader gives
them, and is scored by distill's held-out perplexity on the same test blocks (Macbeth + the Sonnets).
"""

from __future__ import annotations

import hashlib
import json
import platform
import resource
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from distill.config.schemas import register_schemas
from distill.data.base import DataModule
from distill.tasks.causal_lm import perplexity
from distill.utils.keys import EXAMPLE_INDEX
from distill.utils.run_record import git_state

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "smollm2_to_small"
RESULTS = REPO / "bench" / "results" / "peers"
PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets", "lightning")


def compose_experiment(seed: int, overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` with the bench's experiment at ``seed``, as ``python -m distill.train`` composes it."""
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        # Outside a Hydra run there is no run folder to interpolate; nothing the bench reads is written there.
        fixed = [f"experiment={EXPERIMENT}", f"seed={seed}", "paths.output_dir=.", "student.report_path=null"]
        return compose(config_name="train", overrides=[*fixed, *overrides])


def size_overrides(blocks: int | None, eval_blocks: int | None) -> list[str]:
    """The data overrides of a smaller bench: the first training blocks of the experiment's slice, the first
    test blocks; ``None`` keeps the experiment's."""
    sizes = {"data.train_limit_blocks": blocks, "data.test_limit_blocks": eval_blocks}
    return [f"{key}={value}" for key, value in sizes.items() if value is not None]


@dataclass(frozen=True)
class Recipe:
    """The settings of distill's run that the other arms copy, read from the composed config."""

    teacher: str
    alpha: float
    temperature: float
    lr: float
    weight_decay: float
    warmup_ratio: float
    batch_size: int
    max_grad_norm: float
    epochs: int
    precision: str
    seed: int

    @classmethod
    def of(cls, cfg: DictConfig) -> Recipe:
        if cfg.trainer.precision != "32-true":
            raise ValueError(f"trainer.precision={cfg.trainer.precision!r}: the peer arms train in fp32 only")
        return cls(
            teacher=cfg.teacher.name_or_path,
            alpha=cfg.distill.alpha,
            temperature=cfg.distill.temperature,
            lr=cfg.distill.optimizer.lr,
            weight_decay=cfg.distill.optimizer.weight_decay,
            warmup_ratio=cfg.distill.warmup_ratio,
            batch_size=cfg.data.batch_size,
            max_grad_norm=cfg.trainer.gradient_clip_val,
            epochs=cfg.trainer.max_epochs,
            precision=cfg.trainer.precision,
            seed=cfg.seed,
        )

    def steps(self, datamodule: DataModule) -> int:
        return len(datamodule.train_dataloader()) * self.epochs

    def warmup_steps(self, total_steps: int) -> int:
        """Distill's rule (distill.modules.optimization): the whole steps of the warm-up fraction."""
        return int(self.warmup_ratio * total_steps)


def training_batches(datamodule: DataModule, epochs: int) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of distill's training loader, epoch by epoch, in the order Lightning's fit sees them."""
    loader = datamodule.train_dataloader()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        yield from loader


def counted_tokens(labels: torch.Tensor) -> int:
    """Next-token targets of a causal-LM batch (each block's first token predicts nothing)."""
    return int((labels[..., 1:] != -100).sum())


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kilobytes on Linux


class FitFacts:
    """What a training process reports about its own training: when it started and ended (wall clock, so the
    launcher can add its own start), the blocks it trained on in order, the targets and its peak memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = self.ended = 0.0
        self.order: list[int] = []
        self.tokens = self.steps = 0

    def start(self) -> None:
        self.started = time.time()

    def batch(self, batch: dict[str, torch.Tensor]) -> None:
        self.order += batch[EXAMPLE_INDEX].tolist()
        self.tokens += counted_tokens(batch["labels"])
        self.steps += 1

    def end(self, **extra: Any) -> None:
        self.ended = time.time()
        facts = {
            "train_start": self.started,
            "train_end": self.ended,
            "steps": self.steps,
            "tokens": self.tokens,
            "order": self.order,
            "peak_rss_mb": peak_rss_mb(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(facts | extra))


def heldout(model: torch.nn.Module, datamodule: DataModule) -> dict[str, float]:
    """Distill's held-out perplexity (the test split: Macbeth + the Sonnets), the same function for every arm."""
    started = time.perf_counter()
    datamodule.setup("test")
    ppl = perplexity(model, datamodule.test_dataloader())
    return {"heldout_ppl": ppl, "eval_s": round(time.perf_counter() - started, 1)}


def order_digest(order: list[int]) -> str:
    """One string per block order: arms that trained on the same blocks in the same order share it."""
    return hashlib.sha256(json.dumps(order).encode()).hexdigest()[:16]


def cpu() -> dict[str, Any]:
    info = {"machine": platform.machine(), "threads": torch.get_num_threads()}
    info["capability"] = torch.backends.cpu.get_cpu_capability()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    info["model"] = fields.get("model name")
    info["logical_cores"] = text.count("processor\t:")
    info["flags"] = sorted(fields.get("flags", "").split())
    return info


def versions() -> dict[str, Any]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found | {"distill": git_state()}


def write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=lambda value: asdict(value)) + "\n")
