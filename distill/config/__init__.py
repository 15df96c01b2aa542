"""The configuration layer: structured-config schemas and range checks (:mod:`~distill.config.schemas`)
and the Hydra entry-point helper every command shares (:mod:`~distill.config.cli`). The YAML lives in
``conf/`` (``distill.conf`` once installed)."""
