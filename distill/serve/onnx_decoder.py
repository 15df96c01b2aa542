"""Causal LMs on ONNX Runtime: one graph for a decoder step with a KV cache, and greedy decoding over it.

The graph takes ``input_ids`` (the new tokens), ``attention_mask`` (past and new positions) and each layer's
past keys and values, and returns the logits of the new tokens and the presents. With an empty past it is a
whole-sequence forward, so the same file scores held-out perplexity and serves generation. The causal mask is
built inside the graph from the two lengths, as an additive float mask: transformers' own mask code decides
from Python values (padding present or not, one query or many) that a trace would freeze.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from transformers import DynamicCache

from distill.serve.onnx_int8 import OnnxModel, OnnxOutput, cpu_session


def _names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{index}" for index in range(layers) for kind in ("key", "value")]


class DecoderStep(nn.Module):
    """(input_ids, attention_mask, past keys/values) -> (logits, present keys/values), traceable."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.layers = model, model.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        new, total = input_ids.shape[1], attention_mask.shape[1]
        positions = torch.arange(total - new, total)
        visible = torch.arange(total)[None, :] <= positions[:, None]
        allowed = visible[None, None] & attention_mask[:, None, None, :].bool()
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions[None].expand(input_ids.shape[0], -1),
            past_key_values=cache,
            cache_position=positions,
            use_cache=True,
        )
        return output.logits, *[
            tensor for layer in output.past_key_values.layers for tensor in (layer.keys, layer.values)
        ]


def kv_shape(config) -> tuple[int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, head_dim


@torch.no_grad()
def export_decoder(model: nn.Module, path) -> None:
    """The fp32 decoder-step graph, dynamic in batch, new tokens and past length."""
    model = model.float().cpu().eval()
    layers, (kv_heads, head_dim) = model.config.num_hidden_layers, kv_shape(model.config)
    past = [torch.randn(1, kv_heads, 3, head_dim) for _ in range(2 * layers)]
    example = (torch.ones(1, 2, dtype=torch.long), torch.ones(1, 5, dtype=torch.long), *past)
    inputs, outputs = ["input_ids", "attention_mask", *_names(layers, "past")], ["logits", *_names(layers, "present")]
    axes = {"input_ids": {0: "batch", 1: "new"}, "attention_mask": {0: "batch", 1: "total"}}
    axes |= {"logits": {0: "batch", 1: "new"}} | {name: {0: "batch", 2: "past"} for name in inputs[2:]}
    axes |= {name: {0: "batch", 2: "total"} for name in outputs[1:]}
    torch.onnx.export(
        # eval: the exporter leaves the model in the wrapper's mode, and a new wrapper is training.
        DecoderStep(model).eval(), example, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
        opset_version=17, dynamo=False,
    )  # fmt: skip


class OnnxCausalLM(OnnxModel):
    """A decoder-step graph served as ``model(**batch).logits`` (empty past) and as greedy ``generate``."""

    def __init__(self, path, threads: int | None = None, session: ort.InferenceSession | None = None) -> None:
        super().__init__(path, threads, session)
        past = [node for node in self.session.get_inputs() if node.name.startswith("past_")]
        if not past:
            raise ValueError(f"{path} is not a decoder-step graph (no past_* inputs)")
        self.past_names = [node.name for node in past]
        self.kv_heads, self.head_dim = past[0].shape[1], past[0].shape[3]

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask} | dict(
            zip(self.past_names, past, strict=True)
        )
        return self.session.run(None, feeds)

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)] * len(self.past_names)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> OnnxOutput:
        ids = input_ids.cpu().numpy()
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.cpu().numpy()
        return OnnxOutput(torch.from_numpy(self._run(ids, mask, self._empty_past(ids.shape[0]))[0]))

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        min_new_tokens: int | None = None,
        do_sample: bool = False,
    ) -> torch.Tensor:
        """Greedy continuation: exactly ``max_new_tokens`` tokens (no early stop) after the prompt, as HF returns."""
        if do_sample:
            raise ValueError("do_sample=True: the ONNX Runtime decoder decodes greedily only")
        ids = input_ids.cpu().numpy()
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.cpu().numpy()
        step_ids, past, produced = ids, self._empty_past(ids.shape[0]), []
        for _ in range(max_new_tokens):
            logits, *past = self._run(step_ids, mask, past)
            step_ids = logits[:, -1].argmax(axis=-1)[:, None]
            produced.append(step_ids)
            mask = np.concatenate([mask, np.ones_like(step_ids)], axis=1)
        return torch.from_numpy(np.concatenate([ids, *produced], axis=1))


def load_onnx(path, threads: int | None = None) -> OnnxModel:
    """An exported ONNX folder or file, served the way its graph allows."""
    session = cpu_session(path, threads)
    decoder = any(node.name.startswith("past_") for node in session.get_inputs())
    return (OnnxCausalLM if decoder else OnnxModel)(path, threads, session)
