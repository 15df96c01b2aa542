"""What ``distill.train`` runs, in order, and what it writes: the stages before ``fit`` (teacher answers,
logit store, the assembled module: :mod:`~distill.pipeline.stages`), the export of the student after ``test``
(:mod:`~distill.pipeline.export`), the run's metrics (:mod:`~distill.pipeline.metrics`) and what a signal leaves
(:mod:`~distill.pipeline.interrupt`)."""
