"""The two arms that are not distill: TRL's GKDTrainer and a plain PyTorch loop, each run as its own process.

    python -m bench.peers.loops {trl,plain} --seed 42 --student DIR --save DIR --facts FILE [override ...]

Both load the same teacher (the de-quantized GGUF, as distill loads it) and the bench's initial student, read
the recipe from the composed experiment (:class:`bench.peers.common.Recipe`) and train on distill's training
batches in distill's order, with the live teacher's full-vocabulary logits at every step:

* ``trl``: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (no on-policy samples) and ``beta=0`` (forward
  KL). GKD has no cross-entropy term and ignores the temperature in its loss: its loss is ``KL(teacher ||
  student)`` at T = 1 whatever ``distill.alpha`` and ``distill.temperature`` say.
* ``plain``: distill's reference loss (:class:`distill.losses.kd.KDLoss`: ``alpha * CE + (1 - alpha) * T^2 *
  KL``) in a loop of forward, backward, clip, step, with distill's optimizer and schedule.

The loop's facts (:class:`bench.peers.common.FitFacts`) go to ``--facts``, the trained student to ``--save``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import datasets
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from bench.peers.common import FitFacts, Recipe, compose_experiment, training_batches
from distill.data.base import DataModule
from distill.losses.kd import KDLoss
from distill.modules.optimization import optimizer_with_schedule
from distill.utils.devices import to_device
from distill.utils.keys import EXAMPLE_INDEX
from distill.utils.references import load_causal_lm

log = logging.getLogger("bench.peers")


def plain(cfg: DictConfig, datamodule: DataModule, student: PreTrainedModel, teacher: PreTrainedModel,
          facts: FitFacts, scratch: Path) -> PreTrainedModel:  # fmt: skip
    recipe = Recipe.of(cfg)
    loss = KDLoss(recipe.temperature, recipe.alpha, divergence=cfg.distill.divergence, beta=cfg.distill.beta)
    parameters = list(student.named_parameters())
    schedule = optimizer_with_schedule(
        instantiate(cfg.distill.optimizer), parameters, recipe.warmup_ratio, recipe.steps(datamodule)
    )
    optimizer, scheduler = schedule["optimizer"], schedule["lr_scheduler"]["scheduler"]
    device = next(student.parameters()).device
    student.train()
    facts.start()
    for batch in training_batches(datamodule, recipe.epochs):
        facts.batch(batch)
        batch = to_device({key: value for key, value in batch.items() if key != EXAMPLE_INDEX}, device)
        labels = batch.pop("labels")
        with torch.no_grad():
            teacher_logits = teacher(**batch).logits
        logits = student(**batch).logits
        loss(logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]).loss.backward()
        del teacher_logits, logits  # the next step's logits need their memory
        torch.nn.utils.clip_grad_norm_(student.parameters(), recipe.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    soft = f"{cfg.distill.divergence} (live teacher, full vocabulary)"
    facts.end(
        loss=f"distill.losses.KDLoss: {recipe.alpha} * CE + {1 - recipe.alpha} * T^2 * {soft}, T={recipe.temperature}"
    )
    return student


def trl(cfg: DictConfig, datamodule: DataModule, student: PreTrainedModel, teacher: PreTrainedModel,
        facts: FitFacts, scratch: Path) -> PreTrainedModel:  # fmt: skip
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    asked = Recipe.of(cfg)
    recipe = dataclasses.replace(asked, alpha=0.0, temperature=1.0)  # what GKD's loss computes, whatever is asked
    if recipe != asked:
        log.warning("TRL's GKD loss has no CE term and T = 1: training alpha=0, T=1, not alpha=%s, T=%s",
                    asked.alpha, asked.temperature)  # fmt: skip
    total = recipe.steps(datamodule)
    # Distill's batches, epoch after epoch, become one dataset that TRL reads in order (its sampler sequential).
    batches = list(training_batches(datamodule, recipe.epochs))
    rows = datasets.Dataset.from_dict({key: torch.cat([batch[key] for batch in batches]).numpy() for key in batches[0]})

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = {key: torch.as_tensor([example[key] for example in examples]) for key in examples[0]}
        facts.batch(batch)
        batch.pop(EXAMPLE_INDEX)
        return batch

    args = GKDConfig(
        output_dir=str(scratch),
        seed=recipe.seed,
        per_device_train_batch_size=recipe.batch_size,
        num_train_epochs=1,  # the dataset holds every epoch's order
        train_sampling_strategy="sequential",
        learning_rate=recipe.lr,
        weight_decay=recipe.weight_decay,
        optim="adamw_torch_fused",  # TRL's default, torch.optim.AdamW(fused=True), as distill's on the CPU
        lr_scheduler_type="linear",
        warmup_steps=recipe.warmup_steps(total),
        max_grad_norm=recipe.max_grad_norm,
        lmbda=0.0,  # never the student's own samples: the dataset's blocks only
        seq_kd=False,
        beta=0.0,  # generalized JSD at beta 0: forward KL(teacher || student)
        bf16=False,  # TRL's default is bf16 and gradient checkpointing; distill's recipe is fp32 without
        fp16=False,
        activation_checkpointing=False,  # (transformers 5 name of gradient_checkpointing)
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(student.name_or_path)
    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=rows, data_collator=collate,
        processing_class=tokenizer,
    )  # fmt: skip
    facts.start()
    trainer.train()
    loss = "trl GKDTrainer generalized_jsd_loss, beta=0: KL(teacher || student), T=1, no CE term"
    facts.end(loss=loss, recipe=dataclasses.asdict(recipe))
    return trainer.model


ARMS = {"plain": plain, "trl": trl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arm", choices=sorted(ARMS))
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--student", type=Path, required=True, help="the initial student's folder")
    parser.add_argument("--save", type=Path, required=True, help="where the trained student goes")
    parser.add_argument("--facts", type=Path, required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = compose_experiment(args.seed, args.overrides)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_causal_lm(cfg.teacher.name_or_path).to(device)
    student = AutoModelForCausalLM.from_pretrained(args.student).to(device)
    torch.manual_seed(args.seed)
    trained = ARMS[args.arm](cfg, datamodule, student, teacher, FitFacts(args.facts), args.save.with_suffix(".trl"))
    trained.save_pretrained(args.save)


if __name__ == "__main__":
    main()
