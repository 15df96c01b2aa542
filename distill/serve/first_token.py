"""BERT sequence classifiers, traced so that the last encoder layer computes the first position only.

Why: the classification head reads one position (the pooler takes ``[CLS]``), so the last layer's other
positions feed nothing the logits use, yet each costs a query, an attention row, the output projection and the
feed-forward block. Keys and values still need every position. The logits equal the model's to float
rounding (``tests/test_onnx_int8.py``); the exported graph of the 2-layer ``bert_to_tiny`` student does about
40 % less work (docs/results/deploy.md). Other architectures keep the plain graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import BertForSequenceClassification
from transformers.models.bert.modeling_bert import BertLayer


def reads_first_token(model: nn.Module) -> bool:
    """Whether ``model`` is an encoder classifier this module can trace (BERT with its pooler)."""
    return (
        isinstance(model, BertForSequenceClassification)
        and model.bert.pooler is not None
        and not model.config.is_decoder
        and len(model.bert.encoder.layer) > 0
    )


class FirstTokenClassifier(nn.Module):
    """Positional inputs in, logits out, like ``_LogitsOnly``; the last layer runs on position 0 only."""

    def __init__(self, model: BertForSequenceClassification, input_names: list[str]) -> None:
        super().__init__()
        self.model, self.input_names = model, input_names

    def forward(self, *inputs: Tensor) -> Tensor:
        batch = dict(zip(self.input_names, inputs, strict=True))
        bert = self.model.bert
        hidden = bert.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
        mask = additive_mask(batch.get("attention_mask"), hidden.dtype)
        *body, last = bert.encoder.layer
        for layer in body:
            hidden = layer(hidden, mask)
        first = first_position(last, hidden, mask)
        return self.model.classifier(self.model.dropout(bert.pooler(first)))


def additive_mask(attention_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``(batch, 1, 1, keys)``: 0 where a key is attended, the dtype's minimum where it is padding."""
    if attention_mask is None:
        return None
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def first_position(layer: BertLayer, hidden: Tensor, mask: Tensor | None) -> Tensor:
    """``layer``'s output at position 0 (``(batch, 1, hidden)``): one query over every key."""
    attention = layer.attention.self
    rows, heads, size = hidden.shape[0], attention.num_attention_heads, attention.attention_head_size

    def split_heads(states: Tensor) -> Tensor:
        return states.view(rows, -1, heads, size).transpose(1, 2)

    query = split_heads(attention.query(hidden[:, :1]))
    key, value = split_heads(attention.key(hidden)), split_heads(attention.value(hidden))
    scores = query @ key.transpose(2, 3) * attention.scaling
    if mask is not None:
        scores = scores + mask
    context = (scores.softmax(dim=-1) @ value).transpose(1, 2).reshape(rows, 1, heads * size)
    attended = layer.attention.output(context, hidden[:, :1])
    return layer.feed_forward_chunk(attended)
