"""The teacher's responses to a prompt pool, as a stage of its own: the cache a run's generation stage reads.

    python -m distill.generate                                   # data=shakespeare_prompts, the SmolLM2 teacher
    python -m distill.generate data.generation.do_sample=true data.generation.temperature=0.8 \\
        data.generation.num_return_sequences=4

Run it ahead of the recipes (on a bigger machine, or under SLURM) and every ``experiment=smollm2_seqkd`` run
with the same teacher, prompts and settings finds its responses cached. Interrupted, it resumes at the first
unfinished shard. Writes ``generation.json`` (store folder, responses, tokens, seconds, tokens/s).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from distill.pipeline.checks import check_cache, check_model
from distill.pipeline.entry import hydra_cli
from distill.utils.references import load_causal_lm
from distill.utils.run_meter import RunMeter
from distill.utils.run_record import git_state, write_json

log = logging.getLogger("distill.generate")


def generate(cfg: DictConfig) -> dict[str, Any]:
    check_model("model", cfg.model)
    check_cache(Path(cfg.paths.cache_dir))
    datamodule = instantiate(cfg.data)
    with RunMeter(1, stage="generation") as meter:
        statistics = datamodule.attach_teacher(load_causal_lm(cfg.model))
    report = {"model": cfg.model, "store": str(datamodule.store.folder), **statistics, **meter.metrics()}
    write_json(Path(cfg.paths.output_dir) / "generation.json", report | {"git": git_state()})
    return report


# Console entry point `distill-generate`.
cli = hydra_cli("generate", generate, resumes=True)


if __name__ == "__main__":
    cli()
