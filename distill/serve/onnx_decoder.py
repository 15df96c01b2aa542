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
from transformers.cache_utils import get_layer_types_and_kwargs

from distill.serve.onnx_int8 import OnnxModel, OnnxOutput, cpu_session


def _names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{index}" for index in range(layers) for kind in ("key", "value")]


def attention_windows(model: nn.Module) -> list[int | None]:
    """Each layer's sliding window, ``None`` for full attention, as transformers' own cache reads the config
    (``layer_types``, else ``sliding_window`` for every layer)."""
    layer_types, settings = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ValueError(f"{type(model).__name__}: layer types {unknown} have no mask in the decoder-step graph")
    return [kwargs.get("sliding_window") if kind == "sliding_attention" else None
            for kind, kwargs in zip(layer_types, settings, strict=True)]  # fmt: skip


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


class DecoderStep(nn.Module):
    """(input_ids, attention_mask, past keys/values) -> (logits, present keys/values), traceable.

    The cache holds every past position of every layer, sliding-window layers included: their window is
    applied by the mask, so the presents of all layers grow alike and the graph has one ``past`` axis.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.windows = model, attention_windows(model)
        self.layer_types = getattr(model.config, "layer_types", None)

    def masks(self, new: int, attention_mask: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """The additive mask of each attention type: one tensor where all layers share one, else a dict keyed
        by ``config.layer_types``, the form transformers models with several attention types take."""
        total = attention_mask.shape[1]
        queries, keys = torch.arange(total - new, total)[:, None], torch.arange(total)[None, :]
        allowed = (keys <= queries)[None, None] & attention_mask[:, None, None, :].bool()
        by_window = {
            window: _additive(allowed if window is None else allowed & (keys > queries - window)[None, None])
            for window in set(self.windows)
        }
        if len(by_window) == 1:
            return next(iter(by_window.values()))
        return {kind: by_window[window] for kind, window in zip(self.layer_types, self.windows, strict=True)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        new, total = input_ids.shape[1], attention_mask.shape[1]
        positions = torch.arange(total - new, total)
        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2], strict=True)))
        output = self.model(
            input_ids=input_ids,
            attention_mask=self.masks(new, attention_mask),
            position_ids=positions[None].expand(input_ids.shape[0], -1),
            past_key_values=cache,
            cache_position=positions,
            use_cache=True,
        )
        return output.logits, *[
            tensor for layer in output.past_key_values.layers for tensor in (layer.keys, layer.values)
        ]


def kv_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(KV heads, head size) of each layer, read from the cache a one-token forward returns: configs name
    these differently (or derive them), the cache does not."""
    with torch.no_grad():
        cache = model(input_ids=torch.ones(1, 1, dtype=torch.long), past_key_values=DynamicCache(), use_cache=True)
    return [(layer.keys.shape[1], layer.keys.shape[3]) for layer in cache.past_key_values.layers]


@torch.no_grad()
def export_decoder(model: nn.Module, path) -> None:
    """The fp32 decoder-step graph, dynamic in batch, new tokens and past length."""
    model = model.float().cpu().eval()
    step, shapes = DecoderStep(model).eval(), kv_shapes(model)
    past = [torch.randn(1, heads, 3, size) for heads, size in shapes for _ in ("key", "value")]
    example = (torch.ones(1, 2, dtype=torch.long), torch.ones(1, 5, dtype=torch.long), *past)
    layers = len(shapes)
    inputs, outputs = ["input_ids", "attention_mask", *_names(layers, "past")], ["logits", *_names(layers, "present")]
    axes = {"input_ids": {0: "batch", 1: "new"}, "attention_mask": {0: "batch", 1: "total"}}
    axes |= {"logits": {0: "batch", 1: "new"}} | {name: {0: "batch", 2: "past"} for name in inputs[2:]}
    axes |= {name: {0: "batch", 2: "total"} for name in outputs[1:]}
    try:
        torch.onnx.export(
            # eval: the exporter leaves the model in the wrapper's mode, and a new wrapper is training.
            step, example, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
            opset_version=17, dynamo=False,
        )  # fmt: skip
    except (AssertionError, RuntimeError) as error:  # the exporter's own failures, deep in its symbolic functions
        raise ValueError(f"{type(model).__name__}: torch.onnx cannot trace its decoder step ({error})") from error


class OnnxCausalLM(OnnxModel):
    """A decoder-step graph served as ``model(**batch).logits`` (empty past) and as greedy ``generate``."""

    def __init__(self, path, threads: int | None = None, session: ort.InferenceSession | None = None) -> None:
        super().__init__(path, threads, session)
        past = [node for node in self.session.get_inputs() if node.name.startswith("past_")]
        if not past:
            raise ValueError(f"{path} is not a decoder-step graph (no past_* inputs)")
        self.past_names = [node.name for node in past]
        self.past_shapes = [(node.shape[1], node.shape[3]) for node in past]

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask} | dict(
            zip(self.past_names, past, strict=True)
        )
        return self.session.run(None, feeds)

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, heads, 0, size), np.float32) for heads, size in self.past_shapes]

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
