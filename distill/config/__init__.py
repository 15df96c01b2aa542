"""The configuration layer: structured-config schemas read off the constructors and the checks run before
any stage (:mod:`~distill.config.schemas`), nested settings as constructors take them
(:mod:`~distill.utils.settings`) and the Hydra entry-point helper every command shares
(:mod:`~distill.config.cli`). The YAML lives in ``conf/`` (``distill.conf`` once installed)."""
