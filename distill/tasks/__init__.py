"""What differs between the tasks one :class:`~distill.modules.distillation.DistillationModule` serves.

A task is a small object (``conf/task/``) that the module, the teacher stage and the exporter ask:

* ``auto_model``: the ``transformers`` Auto class its models load with;
* ``align(student_logits, teacher_targets, labels)``: which positions are compared and with what
  (sequence classification: as they are; causal LM: position ``i`` predicts token ``i + 1``);
* ``make_metrics()`` / ``evaluate(module, batch, stage)``: validation and test metrics, with
  ``monitor`` / ``monitor_mode`` naming the one checkpoints rank by;
* ``fused_terms(...)``: the loss straight from hidden states and output heads, where the task has
  a fused kernel for it (``None``: compute logits and use the loss module);
* ``count_targets(labels)`` / ``target_unit``: what a training batch trains on (examples, tokens),
  counted as a 0-dim tensor on the labels' device so that the training step never waits for the host;
* ``score(model, datamodule)`` / ``export_extras(...)``: a standalone model's score (the int8
  export) and task-specific artifacts of the run folder (greedy samples for language models);
* ``summary(results)``: the final metrics of a run;
* ``vocabulary``: set by the run when teacher and student pad their vocabularies differently (causal
  LMs compare logits on the tokenizer's ids only).

Everything else (teacher handling, the loss family, stores, compression callbacks) is shared.
"""

from distill.tasks.causal_lm import CausalLMTask
from distill.tasks.classification import ClassificationTask

__all__ = ["CausalLMTask", "ClassificationTask"]
