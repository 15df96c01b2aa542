"""A tiny distillation setup for callback tests: deterministic data, no dropout, CPU trainer."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from distill.modules.distillation import DistillationModule

# hidden 16 / intermediate 32: every encoder Linear is 2:4-eligible (out % 8, in % 16).
ENCODER = "student.*encoder.layer.*"


def tiny_bert(seed: int, layers: int = 2, hidden: int = 16) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def tiny_module(seed: int = 2, **kwargs) -> DistillationModule:
    return DistillationModule(
        student=tiny_bert(seed, layers=2),
        teacher=tiny_bert(seed=1, layers=2),
        num_labels=3,
        temperature=2.0,
        alpha=0.5,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        **kwargs,
    )


def batches(count: int = 8, batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    items = [
        {
            "input_ids": torch.randint(1, 50, (6,), generator=generator),
            "attention_mask": torch.ones(6, dtype=torch.long),
            "labels": torch.randint(0, 3, (), generator=generator),
        }
        for _ in range(count)
    ]
    return DataLoader(items, batch_size=batch_size)


def make_trainer(tmp_path: Path, callbacks, max_steps: int, **kwargs) -> pl.Trainer:
    options = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(callbacks=list(callbacks), **(options | kwargs))


def masks_of(callback) -> dict[str, torch.Tensor]:
    return {name: mask.detach().cpu().clone() for name, mask in callback.masks.items()}
