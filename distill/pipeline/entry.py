"""The entry points that run one Hydra-composed job and print what it returns (prune, quantize, generate,
export_gguf); a signal ends them as it ends ``distill.train`` (:mod:`distill.pipeline.interrupt`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from distill.config.cli import CONFIG_DIR
from distill.config.schemas import register_schemas
from distill.pipeline.interrupt import ends_on_signal

log = logging.getLogger("distill")


def hydra_cli(
    config_name: str, job: Callable[[DictConfig], dict[str, Any]], resumes: bool = False
) -> Callable[[], None]:
    """A console entry point: compose ``conf/<config_name>.yaml`` (schemas registered first, so mistyped
    keys fail at composition), print it, run ``job`` and print its report, one key per line. ``resumes``:
    the job started again after a signal goes on where it stopped (what its last line then says)."""

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
    def main(cfg: DictConfig) -> None:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        with ends_on_signal(f"distill.{config_name}", Path(cfg.paths.output_dir), resumes):
            report = job(cfg)
        width = max(map(len, report), default=0)
        for key, value in report.items():
            print(f"{key:>{width}}: {value}")
        log.info("Run folder: %s", cfg.paths.output_dir)

    def cli() -> None:
        register_schemas()
        main()

    return cli
