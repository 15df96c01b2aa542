"""The causal-LM pipeline over every family of tests/model_families.py (docs/results/architectures.md).

Per family, on a tiny random model built from the family's own config class (tests/model_families.py):
depth and width cuts to a parameter target that reload with the Auto classes as the same function; a few
KD steps from a top-K store through the fused head loss; SparseGPT and Wanda 2:4 one-shot pruning with the
masks held through KD; QAT then the int8 ONNX decoder, whose greedy tokens equal the fp32 graph's, which
equal ``generate``'s. Adding a family is one entry in ``FAMILIES``.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from distill.architectures.layouts import Projection, Sizes, head_dim_is_free, layout_of
from distill.architectures.linears import block_linear_names, block_stack, linear_weight
from distill.callbacks.held_masks import HeldMasks
from distill.callbacks.qat import QuantizationAwareTraining
from distill.data.rows import pack_responses
from distill.data.text import IGNORE_INDEX
from distill.kernels.sparsity import is_nm_sparse
from distill.losses.divergences import DIVERGENCES
from distill.losses.topk import topk_targets
from distill.modules.distillation import DistillationModule
from distill.modules.on_policy import OnPolicy, OnPolicySettings
from distill.pipeline.export import float_student
from distill.pruning.oneshot.sequential import OneShotSettings, prune_oneshot
from distill.pruning.oneshot.solvers import SparsityTarget
from distill.pruning.scores import ImportanceScores
from distill.pruning.shape import FFN_MULTIPLE, PrunedShape, shape_params
from distill.pruning.structured import LayerCut, decoder_layer_params, prune, pruned_student
from distill.serve.onnx_decoder import OnnxCausalLM, export_decoder, load_onnx
from distill.serve.onnx_int8 import save_int8
from distill.tasks import CausalLMTask
from distill.tasks.base import FusedStep
from distill.utils.keys import EXAMPLE_INDEX
from tests.callback_helpers import make_trainer
from tests.model_families import FAMILIES, NO_ONNX_DECODER, NOT_AFFINE, VOCAB, steady_prompt, tiny_causal_lm
from tests.test_onnx_int8 import NoTokenizer, relative_error, token_batch


def calibration(count: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, VOCAB, (2, 16), generator=generator) for _ in range(count)]
    return [{"input_ids": batch, "attention_mask": torch.ones_like(batch)} for batch in ids]


def assert_reloads_as_itself(model: torch.nn.Module, folder: Path) -> None:
    model.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(reloaded) is type(model)
    ids = calibration(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, model.eval()(**ids).logits, rtol=1e-5, atol=1e-5)


def width_cut(family: str) -> torch.nn.Module:
    """The family's teacher cut in width to a parameter target: 60 % of its parameters, or, where the
    config ties head_dim to the width (GPT-2, GPT-NeoX: only the FFN can shrink), the size at FFN 64."""
    teacher = tiny_causal_lm(family)
    teacher_shape = PrunedShape.of(teacher.config)
    if head_dim_is_free(teacher.config):
        target = int(0.6 * teacher.num_parameters())
    else:
        target = shape_params(teacher.config, replace(teacher_shape, intermediate_size=FFN_MULTIPLE))
    student = pruned_student(teacher, calibration(), target_params=target, axes=["width", "heads"])
    assert student.num_parameters() <= target and student.config.num_hidden_layers == teacher_shape.num_layers
    return student


@pytest.mark.parametrize("family", FAMILIES)
def test_depth_cut_to_a_parameter_target_reloads_as_itself(family: str, tmp_path: Path) -> None:
    teacher = tiny_causal_lm(family)
    target = teacher.num_parameters() - decoder_layer_params(teacher) // 2
    student = pruned_student(teacher, calibration(), target_params=target, layer_score="nll")
    assert student.config.num_hidden_layers == 2 and student.num_parameters() <= target
    assert_reloads_as_itself(student, tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_width_cut_to_a_parameter_target_reloads_as_itself(family: str, tmp_path: Path) -> None:
    teacher_shape, student = PrunedShape.of(tiny_causal_lm(family).config), width_cut(family)
    shape = PrunedShape.of(student.config)
    assert shape.intermediate_size < teacher_shape.intermediate_size
    if head_dim_is_free(student.config):
        assert (
            shape.hidden_size < teacher_shape.hidden_size
            and shape.num_attention_heads < teacher_shape.num_attention_heads
        )
    else:  # GPT-2 and GPT-NeoX derive head_dim from the width: hidden and heads stay, said in the log
        assert (shape.hidden_size, shape.num_attention_heads) == (
            teacher_shape.hidden_size,
            teacher_shape.num_attention_heads,
        )
    assert_reloads_as_itself(student, tmp_path)


def silence(model: torch.nn.Module, ffn: torch.Tensor, groups: torch.Tensor) -> ImportanceScores:
    """Zero, in every layer, the output projections' columns of FFN channels ``ffn`` and of the query heads of
    KV groups ``groups``: cutting exactly those leaves the function unchanged. Scores that rank them last."""
    layout, sizes = layout_of(model), Sizes.of(model.config)
    queries_per_group = sizes.heads // sizes.kv_heads
    heads = (groups[:, None] * queries_per_group + torch.arange(queries_per_group)).flatten()
    columns = (heads[:, None] * sizes.head_dim + torch.arange(sizes.head_dim)).flatten()
    _, layers = block_stack(model)
    with torch.no_grad():
        for layer in layers:
            linear_weight(layer.get_submodule(layout.projection("ffn").path))[:, ffn] = 0
            linear_weight(layer.get_submodule(layout.projection("query").path))[:, columns] = 0
    scores = ImportanceScores(
        block_influence=torch.ones(len(layers)),
        nll_increase=None,
        baseline_nll=0.0,
        ffn=torch.ones(len(layers), sizes.intermediate).index_fill(1, ffn, 0),
        heads=torch.ones(len(layers), sizes.heads).index_fill(1, heads, 0),
        hidden=torch.ones(sizes.hidden),
    )
    return scores


@pytest.mark.parametrize("family", FAMILIES)
def test_cutting_silent_channels_and_heads_keeps_the_function(family: str) -> None:
    """The cut takes the right rows and columns of every layout (fused, interleaved, transposed, biased):
    removing FFN channels and KV groups whose outputs are zero changes no logit."""
    model = tiny_causal_lm(family, layers=2)
    teacher = PrunedShape.of(model.config)
    ffn, groups = torch.arange(1, teacher.intermediate_size, 3), torch.tensor([0])
    shared_norm = any(width != "per_head" for _, width in layout_of(model).head_norms)
    # Heads cannot go without the hidden width where head_dim derives from it (note 1 of the doc); OLMo 2
    # normalizes q and k over all heads at once, so removing a head rescales the others by design.
    if not head_dim_is_free(model.config) or shared_norm:
        groups = groups[:0]
    scores = silence(model, ffn, groups)
    kv_heads = teacher.num_key_value_heads - len(groups)
    shape = replace(
        teacher,
        intermediate_size=teacher.intermediate_size - len(ffn),
        num_key_value_heads=kv_heads,
        num_attention_heads=kv_heads * teacher.queries_per_group,
    )
    student = prune(model, shape, scores)
    assert PrunedShape.of(student.config) == shape
    batch = calibration(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(student(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)


def kd_module(student: torch.nn.Module, teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> DistillationModule:
    """Fused-head KD (alpha 0.5, T 1) from the teacher's top-8 logits stored for ``batch``'s two examples."""
    with torch.no_grad():
        stored = topk_targets(teacher(**batch).logits, 8, 1.0)
    return DistillationModule(
        student=student.train(),
        teacher=teacher,
        num_labels=None,
        task=CausalLMTask(fused_kd=True),
        temperature=1.0,
        alpha=0.5,
        optimizer=functools.partial(torch.optim.AdamW, lr=3e-3),
        warmup_ratio=0.0,
        teacher_logits=lambda _: stored,
    )


def training_batches(batch: dict[str, torch.Tensor]) -> DataLoader:
    rows = [
        {"input_ids": ids, "attention_mask": mask, "labels": ids.clone(), EXAMPLE_INDEX: torch.tensor(index)}
        for index, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"], strict=True))
    ]
    return DataLoader(rows, batch_size=len(rows))


class RecordLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        self.losses.append(outputs["loss"].item())


def distil(
    module: DistillationModule, batch: dict[str, torch.Tensor], folder: Path, steps: int, callbacks=()
) -> list[float]:
    """``steps`` optimizer steps on ``batch``; the training losses."""
    recorder = RecordLosses()
    make_trainer(folder, [*callbacks, recorder], steps).fit(module, train_dataloaders=training_batches(batch))
    return recorder.losses


@pytest.mark.slow  # a Lightning fit per family (seconds each): all families together take minutes
@pytest.mark.parametrize("family", FAMILIES)
def test_kd_steps_from_the_topk_store_through_the_fused_head_then_reload(family: str, tmp_path: Path) -> None:
    teacher, student, batch = tiny_causal_lm(family), width_cut(family), calibration(1, seed=4)[0]
    module = kd_module(student, teacher, batch)
    step = FusedStep(student, module.teacher, stored=module.teacher_logits(None), temperature=1.0, alpha=0.5,
                     divergence="forward_kl")  # fmt: skip
    with torch.no_grad():
        fused = module.task.fused_terms(step, batch, batch["input_ids"]) is not None
    assert fused == (family not in NOT_AFFINE)
    losses = distil(module, batch, tmp_path, steps=6)
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert_reloads_as_itself(module.student, tmp_path / "student")


def assert_two_of_four(model: torch.nn.Module, layers: list[str]) -> None:
    for name in layers:
        assert is_nm_sparse(linear_weight(model.get_submodule(name)), 2, 4), name


@pytest.mark.slow  # a Lightning fit per family (seconds each): all families together take minutes
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("family", FAMILIES)
def test_oneshot_two_of_four_masks_hold_through_kd(family: str, method: str, tmp_path: Path) -> None:
    teacher, batch = tiny_causal_lm(family), calibration(1, seed=4)[0]
    student = tiny_causal_lm(family, seed=1)
    settings = OneShotSettings(method=method, target=SparsityTarget.parse(pattern="2:4"), block_size=16)
    masks = prune_oneshot(student, calibration(), settings)
    layers = block_linear_names(student)
    assert sorted(masks) == sorted(f"{name}.weight" for name in layers)
    assert_two_of_four(student, layers)
    save_file({name: mask.contiguous() for name, mask in masks.items()}, str(tmp_path / "masks.safetensors"))
    module = kd_module(student, teacher, batch)
    losses = distil(module, batch, tmp_path, steps=3, callbacks=[HeldMasks(str(tmp_path / "masks.safetensors"))])
    assert len(losses) == 3
    assert_two_of_four(module.student, layers)
    for name, mask in masks.items():
        assert not module.student.get_submodule(name.removesuffix(".weight")).weight[~mask].any(), name


@pytest.mark.slow  # a Lightning fit per family (seconds each): all families together take minutes
@pytest.mark.parametrize("family", FAMILIES)
def test_qat8_int8_decoder_greedy_equals_the_fp32_graph_which_equals_generate(family: str, tmp_path: Path) -> None:
    teacher, batch = tiny_causal_lm(family), calibration(1, seed=4)[0]
    module = kd_module(width_cut(family), teacher, batch)
    distil(module, batch, tmp_path, steps=2, callbacks=[QuantizationAwareTraining()])
    plain = float_student(module.student)
    layers = block_linear_names(plain)
    export = functools.partial(export_decoder, plain)
    if family in NO_ONNX_DECODER:
        with pytest.raises(ValueError, match=NO_ONNX_DECODER[family]):
            export(tmp_path / "fp32.onnx")
        return
    int8 = load_onnx(save_int8(plain, layers, NoTokenizer(), tmp_path / "student_int8", export))
    export(tmp_path / "fp32.onnx")
    fp32 = OnnxCausalLM(tmp_path / "fp32.onnx")
    padded = token_batch(3, 9, seed=4, vocab=VOCAB)  # 9 positions: past the sliding windows of 6
    with torch.no_grad():
        expected = plain(**padded).logits
    real = padded["attention_mask"].bool()
    assert relative_error(fp32(**padded).logits[real], expected[real]) < 1e-5
    prompt = steady_prompt(fp32, int8, new_tokens=10)
    produced = fp32.generate(prompt, max_new_tokens=10)
    plain.generation_config.eos_token_id = None  # the graph decodes exactly max_new_tokens, as generate then does
    with torch.no_grad():
        expected = plain.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False)
    assert torch.equal(produced, expected)
    assert torch.equal(int8.generate(prompt, max_new_tokens=10), produced)


def test_an_interleaved_fused_projection_keeps_whole_heads_of_query_key_and_value() -> None:
    """GPT-NeoX's query_key_value lays out [q, k, v] head by head: keeping head 1 of 3 keeps rows 12-23 (head_dim
    4), where three blocks would keep rows 4-7, 16-19 and 28-31."""
    sizes = Sizes(hidden=12, heads=3, kv_heads=3, head_dim=4, intermediate=8)
    cut = LayerCut(sizes, torch.arange(12), torch.arange(8), torch.tensor([1]), queries_per_group=1)
    fused = Projection("attention.query_key_value", ("query", "kv", "kv"), "hidden", interleaved=True)
    assert cut.rows(fused).tolist() == list(range(12, 24))
    blocks = Projection("self_attn.qkv_proj", ("query", "kv", "kv"), "hidden")
    assert cut.rows(blocks).tolist() == [*range(4, 8), *range(16, 20), *range(28, 32)]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_divergence_and_an_on_policy_resample_run_on_the_family(family: str) -> None:
    """What needs no layout: each divergence's loss on the logits path, with gradients, and a batch whose
    responses the student resamples (on-policy distillation; sequence-level KD generates the same way)."""
    teacher, student = tiny_causal_lm(family, layers=2, seed=1), tiny_causal_lm(family, layers=1, seed=2)
    rows = pack_responses([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], width=8, pad_id=0)
    batch = {name: torch.as_tensor(rows[name]) for name in ("input_ids", "attention_mask")}
    labels = torch.as_tensor(rows["labels"])
    for divergence in DIVERGENCES:
        module = DistillationModule(
            student=student, teacher=teacher, num_labels=None, task=CausalLMTask(), temperature=2.0, alpha=0.0,
            optimizer=torch.optim.SGD, divergence=divergence,
        )  # fmt: skip
        student.zero_grad()
        loss = module.training_step({**batch, "labels": labels.clone()}, 0)
        loss.backward()
        assert torch.isfinite(loss) and loss > 0, divergence
        assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None), divergence
    sampler = OnPolicy(OnPolicySettings(probability=1.0, max_new_tokens=4), pad_id=0, end_ids={2}, seed=1)
    resampled, new_labels = sampler.resample(student, batch, labels)
    for row, prompt in enumerate([[5, 6, 7], [8]]):
        assert resampled["input_ids"][row, : len(prompt)].tolist() == prompt
        assert 1 <= int((new_labels[row] != IGNORE_INDEX).sum()) <= 4
