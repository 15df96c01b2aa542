"""Prompt-and-answer rows: a prompt, then the answer the loss counts, right-padded to a fixed width.

Sequence-level KD (the teacher's responses), on-policy samples and conversations share the layout: labels are
-100 on the prompt and the padding, so only answer tokens count in any loss or metric, and a row's labels tell
where its answer starts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from distill.data.text import IGNORE_INDEX


def pack_responses(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], width: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Right-padded ``prompt + response`` rows of ``width`` tokens with labels on the response only."""
    input_ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(prompts), width), dtype=np.int64)
    labels = np.full((len(prompts), width), IGNORE_INDEX, dtype=np.int64)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        end = len(prompt) + len(response)
        input_ids[row, :end] = [*prompt, *response]
        attention_mask[row, :end] = 1
        labels[row, len(prompt) : end] = response
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def prompt_lengths(labels: Tensor, attention_mask: Tensor) -> list[int]:
    """Where each row's response starts: its first counted label (rows without one: after its last token)."""
    counted = labels != IGNORE_INDEX
    first = counted.int().argmax(dim=1).tolist()
    ends = attention_mask.sum(dim=1).tolist()
    return [
        start if any_counted else end
        for start, any_counted, end in zip(first, counted.any(dim=1).tolist(), ends, strict=True)
    ]
