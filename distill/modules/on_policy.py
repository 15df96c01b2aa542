"""On-policy distillation (GKD): some batches' responses are the student's own samples.

With probability ``probability`` (λ; drawn per optimizer step from ``seed``, so every data-parallel
rank and every resumed run draws alike) a batch of prompt/response rows keeps its prompts and
replaces the responses by the current student's samples (temperature ``temperature``, nucleus
``top_p``, at most ``max_new_tokens``; drawn from torch's generator, which the training loader's
checkpoint state restores per rank: :mod:`distill.data.resumable`); the live teacher then grades
every token of them through the run's divergence. λ = 1 is fully on-policy, λ = 0 is off (the data's teacher responses).
The samples' cost is kept apart: :meth:`OnPolicy.metrics` reports the batches resampled, the
tokens sampled and the seconds spent sampling.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from distill.data.rows import pack_responses, prompt_lengths
from distill.serve.generation import Generator, SamplingSettings


@dataclass
class OnPolicySettings:
    """``distill.on_policy``: with probability ``probability`` (λ; 0 = off) a step trains on the student's own
    samples of its prompts (prompt/response data only), at ``temperature`` and nucleus ``top_p``, at most
    ``max_new_tokens`` each, graded token by token by the live teacher."""

    probability: float = 0.0
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.probability <= 1:
            raise ValueError(f"distill.on_policy.probability={self.probability!r} must be in [0, 1] (λ)")
        self.sampling = SamplingSettings(
            max_new_tokens=self.max_new_tokens, do_sample=True, temperature=self.temperature, top_p=self.top_p
        )


@dataclass
class OnPolicy:
    """The sampler a run with ``settings.probability > 0`` hands the module: ``pad_id`` and ``end_ids`` are its
    tokenizer's and teacher's, ``seed`` the run's."""

    settings: OnPolicySettings
    pad_id: int
    end_ids: set[int]
    seed: int = 0
    batches: int = field(default=0, init=False)
    tokens: int = field(default=0, init=False)
    seconds: float = field(default=0.0, init=False)

    def draws(self, step: int) -> bool:
        """Whether optimizer step ``step`` trains on the student's samples."""
        probability = self.settings.probability
        return probability > 0 and random.Random(self.seed * 1_000_003 + step).random() < probability

    def resample(self, student: nn.Module, batch: dict[str, Tensor], labels: Tensor) -> tuple[dict, Tensor]:
        """The batch with each row's response replaced by a sample of ``student``, and its labels."""
        started = time.perf_counter()
        starts = prompt_lengths(labels, batch["attention_mask"])
        prompts = [ids[:start].tolist() for ids, start in zip(batch["input_ids"], starts, strict=True)]
        generate = Generator(student, self.settings.sampling, self.pad_id, self.end_ids, batch_size=len(prompts))
        responses = [response for response, _ in generate(prompts)]
        width = max(map(len, prompts)) + self.settings.max_new_tokens
        rows = pack_responses(prompts, responses, width, self.pad_id)
        device = labels.device
        self.batches += 1
        self.tokens += sum(map(len, responses))
        self.seconds += time.perf_counter() - started
        new_batch = {name: torch.as_tensor(rows[name], device=device) for name in ("input_ids", "attention_mask")}
        return new_batch, torch.as_tensor(rows["labels"], device=device)

    def state_dict(self) -> dict[str, float]:
        """The counts so far: a resumed run reports those of the whole fit."""
        return {"batches": self.batches, "tokens": self.tokens, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.batches, self.tokens, self.seconds = int(state["batches"]), int(state["tokens"]), state["seconds"]

    def metrics(self) -> dict[str, float]:
        return {
            "onpolicy/batches": self.batches,
            "onpolicy/sampled_tokens": self.tokens,
            "onpolicy/sampling_s": round(self.seconds, 1),
        }
