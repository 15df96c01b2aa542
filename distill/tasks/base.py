"""The contract between a task and the rest of a run.

A :class:`Task` says what differs between tasks: the model class, how logits and labels line up, the
metrics, the fused loss where one exists, scoring and export. The LightningModule, the teacher and student
stages, the stores, export and serving ask it, and nothing else; in turn a task sees the module only
through :class:`EvaluatedModule` and a training step only through :class:`FusedStep`. A third task is a
task file, a data module (:class:`distill.data.base.DataModule`) and their YAML: see the README's
"Add a task".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from distill.data.base import DataModule
    from distill.losses.kd import KDLossTerms
    from distill.losses.topk import TopKTargets
    from distill.modules.frozen_teacher import FrozenTeacher


class EvaluatedModule(Protocol):
    """What :meth:`Task.evaluate` may use of the LightningModule."""

    #: the frozen teacher, or ``None`` when the run fine-tunes without one
    teacher: FrozenTeacher | None

    def __call__(self, inputs: dict[str, Tensor]) -> Tensor:
        """The student's logits for a batch of model inputs."""

    def update_metric(self, name: str, batch_size: int, *values: Tensor) -> None:
        """Update and log the task's metric ``name`` (``<stage>/<metric>``, one of :meth:`Task.make_metrics`)."""


@dataclass(frozen=True)
class FusedStep:
    """What a training step hands :meth:`Task.fused_terms`: the models and the loss settings, nothing more.

    The module asks only when the step has a teacher term (``alpha < 1``), no hidden-state term and no
    perturbed copies, on an unsharded student.
    """

    student: PreTrainedModel
    teacher: FrozenTeacher
    #: the store's targets for the batch (full logits or :class:`~distill.losses.topk.TopKTargets`), or ``None``
    stored: Tensor | TopKTargets | None
    temperature: float
    alpha: float
    divergence: str


class Task(Protocol):
    """What differs between the tasks one :class:`~distill.modules.distillation.DistillationModule` serves."""

    #: the task's name in cache file names
    name: str
    #: the ``transformers`` Auto class its models load with
    auto_model: type
    #: the metric checkpoints rank by, and whether lower (``min``) or higher (``max``) is better
    monitor: str
    monitor_mode: str
    #: what a training batch trains on (``examples``, ``tokens``)
    target_unit: str
    #: a served request generates tokens (prefill, then decode) rather than taking one forward
    generates: bool
    #: batch sizes the exported int8 student's latency is measured at (empty: not one forward per request)
    latency_batch_sizes: tuple[int, ...]
    #: set by the run when teacher and student pad their vocabularies differently: logits are compared on
    #: the first ``vocabulary`` ids only (``None``: all)
    vocabulary: int | None

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``auto_model.from_pretrained`` / ``from_config`` (e.g. ``num_labels``)."""

    def align(self, student_logits: Tensor, teacher_targets: Any, labels: Tensor) -> tuple[Tensor, Any, Tensor]:
        """The positions the loss compares: student logits, teacher targets and labels, lined up."""

    def count_targets(self, labels: Tensor) -> Tensor:
        """What a training batch trains on (``target_unit``), as a 0-dim tensor on the labels' device."""

    def fused_terms(self, step: FusedStep, batch: dict[str, Tensor], labels: Tensor) -> KDLossTerms | None:
        """The step's loss from hidden states and output heads by a fused kernel, or ``None``: use the logits."""

    def make_metrics(self) -> nn.ModuleDict:
        """Validation and test metrics, keyed ``<stage>_<metric>``."""

    def evaluate(self, module: EvaluatedModule, batch: dict[str, Tensor], stage: str) -> None:
        """Update the ``stage`` metrics with one held-out batch (``labels`` included)."""

    def score(self, model: nn.Module, datamodule: DataModule) -> dict[str, float]:
        """A standalone model's held-out score (e.g. the exported int8 student's)."""

    def export_onnx(self, model: nn.Module, datamodule: DataModule, path: Path) -> None:
        """Write the model's ONNX graph to ``path`` (the int8 export quantizes it)."""

    def export_extras(
        self, student: nn.Module, teacher: nn.Module | None, datamodule: DataModule, output_dir: Path
    ) -> dict[str, float]:
        """Task-specific artifacts of the run folder (e.g. greedy samples) and their metrics."""

    def summary(self, results: dict[str, float]) -> dict[str, Any]:
        """The final metrics of a run from the test results."""
