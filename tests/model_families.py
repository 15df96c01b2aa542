"""Tiny random-weight causal LMs of many model families, each built from the family's own config class.

No downloads: every model is a few hundred thousand parameters with the family's real module layout
(fused projections, biases, q/k norms, post-norms, scaled embeddings, Conv1D, multipliers, local and
global attention), so one test can run the whole pipeline over all of them in seconds. Adding a family to every
family test is one entry in ``FAMILIES``.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel

VOCAB = 96
# Grouped-query attention where the family has it: 4 query heads in 2 KV groups of head_dim 8 on a
# hidden width of 48, so head_dim is not hidden / heads (families that derive it get 4 x 12).
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
NO_GQA = {key: value for key, value in COMMON.items() if key not in ("num_key_value_heads", "head_dim")}

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", COMMON),
    "mistral": ("MistralConfig", {**COMMON, "sliding_window": 6}),
    "qwen2": ("Qwen2Config", {**COMMON, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", COMMON),
    "gemma2": ("Gemma2Config", {**COMMON, "sliding_window": 6, "query_pre_attn_scalar": 8}),
    "gemma3": ("Gemma3TextConfig", {**COMMON, "sliding_window": 6, "query_pre_attn_scalar": 8}),
    "phi3": ("Phi3Config", COMMON),
    "gpt_neox": ("GPTNeoXConfig", {**NO_GQA, "rotary_pct": 0.5}),
    "gpt2": (
        "GPT2Config",
        dict(vocab_size=VOCAB, n_embd=48, n_layer=4, n_head=4, n_positions=128, n_inner=96, bos_token_id=1,
             eos_token_id=2),
    ),
    "olmo2": ("Olmo2Config", COMMON),
    "opt": ("OPTConfig", {**NO_GQA, "ffn_dim": 96, "word_embed_proj_dim": 48}),
    "cohere": ("CohereConfig", {**COMMON, "logit_scale": 0.5, "use_qk_norm": False}),
    "starcoder2": ("Starcoder2Config", {**COMMON, "sliding_window": 6}),
    "granite": (
        "GraniteConfig",
        {**COMMON, "embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
         "logits_scaling": 4.0},
    ),
}  # fmt: skip


# Gemma 2 softcaps its final logits: no affine head (distill.architectures.head), so KD takes the logits path.
NOT_AFFINE = frozenset({"gemma2"})
# torch.onnx's TorchScript exporter fails inside Cohere's interleaved rotary embedding: export_decoder refuses.
NO_ONNX_DECODER = {"cohere": "CohereForCausalLM: torch.onnx cannot trace its decoder step"}


def steady_prompt(fp32: Any, int8: Any, new_tokens: int, candidates: int = 16) -> torch.Tensor:
    """A random prompt whose greedy continuation by the ``fp32`` ONNX decoder has at least 3 distinct tokens and
    is, scored by the ``int8`` graph in one full forward, still each step's top-1: of those, the one with the
    widest int8 margin. Tiny random models have near ties everywhere (logits of std ~0.1), where int8 rounding
    decides; the test then checks that int8's step-by-step decoding with its KV cache follows that path.
    No qualifying prompt is an error."""
    generator, scored = torch.Generator().manual_seed(5), []
    for _ in range(candidates):
        prompt = torch.randint(3, VOCAB, (1, 6), generator=generator)
        tokens = fp32.generate(prompt, max_new_tokens=new_tokens)
        chosen = tokens[0, prompt.shape[1] :]
        rounded = int8(tokens[:, :-1]).logits[0, prompt.shape[1] - 1 :]
        kept = rounded.gather(1, chosen[:, None])[:, 0]
        rivals = rounded.scatter(1, chosen[:, None], float("-inf")).max(dim=-1).values
        if len(set(chosen.tolist())) >= 3:
            scored.append(((kept - rivals).min().item(), prompt))
    margin, prompt = max(scored, key=lambda item: item[0], default=(float("-inf"), None))
    assert margin > 0, f"no prompt of {candidates} decodes with 3 distinct tokens that int8 keeps (margin {margin})"
    return prompt


def tiny_causal_lm(family: str, layers: int = 4, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A random ``family`` model in eval mode; larger weights in the blocks, so that greedy decoding
    does not repeat one token."""
    config_class, settings = FAMILIES[family]
    settings = {**settings, **overrides}
    if family != "gpt2":
        settings["num_hidden_layers"] = layers
    else:
        settings["n_layer"] = layers
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**settings))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2 and parameter.shape[0] != VOCAB:
                parameter.mul_(3)
    return model.eval()
