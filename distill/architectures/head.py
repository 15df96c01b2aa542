"""How a causal LM's head turns the base model's last hidden state into logits.

For most families the logits are ``last_hidden_state @ lm_head.weight.T (+ bias)``; some scale that
product, and some squash it. Code that computes logits from hidden states itself (the fused KD kernels)
asks :func:`head_scale` first and takes the model's own logits where the head is not an affine map.
"""

from __future__ import annotations

import re

from transformers import PretrainedConfig

# Config keys read, and what each does to the logits (``x @ W.T`` times the returned scale):
#   final_logit_softcapping (Gemma 2/3, ...): cap * tanh(logits / cap), not linear: None.
#   logits_scaling (Granite and its MoE/hybrid variants): logits / logits_scaling.
#   logit_scale (Cohere, Cohere 2): logits * logit_scale.
#   lm_head_multiplier (Falcon-H1): logits * lm_head_multiplier.
# Any other set key that names the logits or the head's output (HyperCLOVA X multiplies by its
# `logits_scaling`; `output_multiplier`) is one this module does not know: None, the exact logits path.
_SOFTCAPS = ("final_logit_softcapping",)
_MULTIPLIERS = ("logit_scale", "lm_head_multiplier")
_DIVISORS = {"logits_scaling": "granite"}  # key -> the model-type prefix known to divide by it
_MENTIONS_LOGITS = re.compile(r"logit|lm_head|output_mult")
# Keys that mention logits but act elsewhere: attention-score caps, MoE routers, how many positions to score.
_ELSEWHERE = re.compile(r"attn|attention|router|to_keep")


def head_scale(config: PretrainedConfig) -> float | None:
    """The factor the head multiplies ``last_hidden_state @ weight.T + bias`` by to give the logits
    (``1.0`` for Llama-like heads), or ``None`` when the logits are not an affine map of the hidden
    state (final-logit softcapping) or the config sets a logits key listed nowhere above.
    """
    config = config.get_text_config(decoder=True)
    settings = {key: value for key, value in config.to_dict().items() if _is_set(key, value)}
    scale = 1.0
    for key, value in settings.items():
        if key in _SOFTCAPS:
            return None
        if key in _MULTIPLIERS:
            scale *= float(value)
        elif key in _DIVISORS and config.model_type.startswith(_DIVISORS[key]):
            scale /= float(value)
        else:
            return None
    return scale


def _is_set(key: str, value: object) -> bool:
    """A set key that may act on the head's output."""
    return bool(_MENTIONS_LOGITS.search(key)) and not _ELSEWHERE.search(key) and value is not None
