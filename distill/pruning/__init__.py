"""Pruning, in its three meanings, under one name.

* Structured: cut a smaller dense student out of the teacher by measured importance, whole layers, heads
  and widths (:mod:`~distill.pruning.shape` chooses the shape, :mod:`~distill.pruning.scores` measures,
  :mod:`~distill.pruning.structured` cuts); ``student=pruned`` runs it as the student stage.
* One-shot: zero weights of a trained model layer by layer against calibration activations (SparseGPT,
  Wanda, magnitude), unstructured or N:M (:mod:`~distill.pruning.oneshot`); ``python -m distill.prune``.
* During training: masks that the compression callbacks grow and hold (``distill.callbacks``: gradual
  magnitude pruning, 2:4 as APEX ASP does, held one-shot masks).

:mod:`~distill.pruning.compression_report` measures what any of them left: sparsity and bits per layer.
"""
