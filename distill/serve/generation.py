"""Responses of a causal LM to token-id prompts: greedy or sampled, KV-cached, batched and left-padded.

The teacher's generations (:mod:`distill.stores.generations`), on-policy samples
(:mod:`distill.modules.on_policy`) and held-out greedy samples (:mod:`distill.tasks.causal_lm`) all come from
:class:`Generator`. A response is cut after its first end token (kept: training on it teaches the student to
stop) or at ``max_new_tokens``; ``finished`` says which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distill.utils.sharding import is_sharded


@dataclass
class SamplingSettings:
    """How responses are drawn: greedy (``do_sample=False``) or sampled at ``temperature``/``top_p``,
    ``num_return_sequences`` per prompt, at most ``max_new_tokens`` each. The prompt pool's ``data.generation``
    (:class:`~distill.data.prompts.PromptResponseDataModule`) and the source of its defaults."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences={self.num_return_sequences!r} must be >= 1")
        if self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError(f"num_return_sequences={self.num_return_sequences} needs do_sample=true (greedy repeats)")


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, Tensor]:
    """``input_ids``/``attention_mask`` with every prompt ending at the last column, as decoders generate."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def cut_at_end(tokens: list[int], end_ids: set[int]) -> tuple[list[int], bool]:
    """``tokens`` up to and including the first end token, and whether there was one."""
    for position, token in enumerate(tokens):
        if token in end_ids:
            return tokens[: position + 1], True
    return tokens, False


@dataclass
class Generator:
    """A model's responses to batches of prompts under ``settings``, ended by any of ``end_ids``."""

    model: nn.Module
    settings: SamplingSettings
    pad_id: int
    end_ids: set[int]
    batch_size: int = 16

    def __call__(self, prompts: Sequence[Sequence[int]]) -> list[tuple[list[int], bool]]:
        """Responses (token ids, finished), ``num_return_sequences`` per prompt, in prompt order."""
        responses = []
        for start in range(0, len(prompts), self.batch_size):
            responses += self.generate_batch(prompts[start : start + self.batch_size])
        return responses

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[Sequence[int]]) -> list[tuple[list[int], bool]]:
        settings, was_training = self.settings, self.model.training
        self.model.eval()
        inputs = left_padded(prompts, self.pad_id, next(self.model.parameters()).device)
        # top_k=0: no top-k cut beyond top_p (generation configs often default to 50).
        sampling = dict(temperature=settings.temperature, top_p=settings.top_p, top_k=0) if settings.do_sample else {}
        output = self.model.generate(
            **inputs,
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            num_return_sequences=settings.num_return_sequences,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.end_ids),
            # A sharded model's ranks step together until every rank's batch has ended.
            synced_gpus=is_sharded(self.model),
            **sampling,
        )
        self.model.train(was_training)
        generated = output[:, inputs["input_ids"].shape[1] :].tolist()
        return [cut_at_end(tokens, self.end_ids) for tokens in generated]


def end_token_ids(model: nn.Module, tokenizer: object) -> set[int]:
    """The ids that end a response: the tokenizer's EOS and the model's generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured if isinstance(configured, list) else [configured]) - {None}
    if not ids:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} and the model define no end-of-sequence token")
    return ids
