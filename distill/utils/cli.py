"""The entry points that run one Hydra-composed job and print what it returns (prune, quantize, generate)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from distill.schemas import register_schemas

log = logging.getLogger("distill")
# An absolute path: Hydra resolves a relative one against the module of the decorated function, which is
# this one for every entry point, and as a package (there is no `conf` package) when it is not __main__.
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def hydra_cli(config_name: str, job: Callable[[DictConfig], dict[str, Any]]) -> Callable[[], None]:
    """A console entry point: compose ``conf/<config_name>.yaml`` (schemas registered first, so mistyped
    keys fail at composition), print it, run ``job`` and print its report, one key per line."""

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
    def main(cfg: DictConfig) -> None:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        report = job(cfg)
        width = max(map(len, report), default=0)
        for key, value in report.items():
            print(f"{key:>{width}}: {value}")
        log.info("Run folder: %s", cfg.paths.output_dir)

    def cli() -> None:
        register_schemas()
        main()

    return cli
