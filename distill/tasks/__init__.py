"""What differs between the tasks one :class:`~distill.modules.distillation.DistillationModule` serves.

The contract is :class:`distill.tasks.base.Task` (a protocol: model class, alignment of logits and labels,
metrics, the optional fused loss, scoring, export); each task is one file: sequence classification
(:mod:`~distill.tasks.classification`), causal language modelling (:mod:`~distill.tasks.causal_lm`) and
token classification (:mod:`~distill.tasks.token_classification`). Everything else (teacher handling, the
loss family, stores, compression callbacks) is shared.
"""

from distill.tasks.causal_lm import CausalLMTask
from distill.tasks.classification import ClassificationTask
from distill.tasks.token_classification import TokenClassificationTask

__all__ = ["CausalLMTask", "ClassificationTask", "TokenClassificationTask"]
