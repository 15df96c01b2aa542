"""What a run computes once and every later run (or sweep job) reuses, each a folder keyed by what decides it
and written atomically, so a killed job leaves nothing half-made: the teacher's logits over the training set
(:mod:`~distill.stores.teacher_logits`), the teacher's responses to a prompt pool
(:mod:`~distill.stores.generations`) and students cut from a teacher (:mod:`~distill.stores.pruned_students`)."""
