"""The LM head of every model family: logits from the last hidden state, and the fused KD loss built on that."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.architectures.head import head_scale
from distill.losses.kd import kd_loss_terms
from distill.losses.topk import topk_targets
from distill.tasks import CausalLMTask
from distill.tasks.base import FusedStep
from distill.utils.keys import EXAMPLE_INDEX
from tests.model_families import FAMILIES, NOT_AFFINE, VOCAB, tiny_causal_lm
from tests.test_causal_lm import module_for


def batch_and_labels() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[1, 6:] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def teacher_and_student(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    # Both stay in eval mode: GPT-2's dropout (0.1) would make the fused and the reference pass two functions.
    return tiny_causal_lm(family, layers=2, seed=1), tiny_causal_lm(family, layers=1, seed=2)


def takes_fused_path(student, module, batch, labels, stored=None) -> bool:
    step = FusedStep(student, module.teacher, stored=stored, temperature=2.0, alpha=0.3, divergence="forward_kl")
    with torch.no_grad():
        return module.task.fused_terms(step, batch, labels) is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_the_scaled_head_of_the_last_hidden_state_gives_the_logits(family: str) -> None:
    """``last_hidden_state`` is what the head reads (final norm applied: GPT-NeoX's final_layer_norm,
    GPT-2's ln_f), and ``head_scale`` is the rest of the head, or ``None`` where the rest is not linear."""
    model = tiny_causal_lm(family, layers=2)
    batch, _ = batch_and_labels()
    head, scale = model.get_output_embeddings(), head_scale(model.config)
    with torch.no_grad():
        logits = model(**batch).logits
        linear = F.linear(model.base_model(**batch).last_hidden_state, head.weight, head.bias)
    assert (scale is None) == (family in NOT_AFFINE)
    if scale is None:  # Gemma 2: cap * tanh(logits / cap)
        cap = model.config.final_logit_softcapping
        torch.testing.assert_close(cap * torch.tanh(linear / cap), logits, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(linear * scale, logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_loss_with_the_live_teacher_gives_the_reference_loss_and_gradients(family: str) -> None:
    teacher, student = teacher_and_student(family)
    batch, labels = batch_and_labels()
    results = []
    for fused in (True, False):
        module = module_for(student, teacher, CausalLMTask(fused_kd=fused))
        student.zero_grad()
        loss = module.training_step({**batch, "labels": labels.clone()}, 0)
        loss.backward()
        results.append((loss.detach(), [parameter.grad.clone() for parameter in student.parameters()]))
    (fused_loss, fused_grads), (reference_loss, reference_grads) = results
    expected = kd_loss_terms(
        *CausalLMTask().align(student(**batch).logits, teacher(**batch).logits, labels), temperature=2.0, alpha=0.3
    ).loss
    fused_module = module_for(student, teacher, CausalLMTask(fused_kd=True))
    assert takes_fused_path(student, fused_module, batch, labels) == (family not in NOT_AFFINE)
    assert reference_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert fused_loss.item() == pytest.approx(reference_loss.item(), rel=1e-5)
    for fused_grad, reference_grad in zip(fused_grads, reference_grads, strict=True):
        torch.testing.assert_close(fused_grad, reference_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_loss_with_stored_topk_targets_gives_the_reference_loss(family: str) -> None:
    teacher, student = teacher_and_student(family)
    batch, labels = batch_and_labels()
    with torch.no_grad():
        stored = topk_targets(teacher(**batch).logits, 8, 1.0)
    losses = []
    for fused in (True, False):
        module = module_for(
            student, teacher, CausalLMTask(fused_kd=fused), temperature=1.0, teacher_logits=lambda _: stored
        )
        step = {**batch, "labels": labels.clone(), EXAMPLE_INDEX: torch.tensor([0, 1])}
        losses.append(module.training_step(step, 0).item())
    assert takes_fused_path(student, module_for(student, teacher, CausalLMTask()), batch, labels, stored) == (
        family not in NOT_AFFINE
    )
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_scaled_teacher_and_an_unscaled_student_fold_each_their_own_scale() -> None:
    """Granite's 1/logits_scaling on the teacher's side only: each head's scale is its own."""
    teacher, student = tiny_causal_lm("granite", layers=2, seed=1), tiny_causal_lm("llama", layers=1, seed=2)
    batch, labels = batch_and_labels()
    losses = [
        module_for(student, teacher, CausalLMTask(fused_kd=fused)).training_step({**batch, "labels": labels}, 0)
        for fused in (True, False)
    ]
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)


def test_head_scale_reads_multipliers_and_declines_keys_it_does_not_know() -> None:
    from transformers import CohereConfig, Gemma3TextConfig, HyperCLOVAXConfig

    assert head_scale(CohereConfig(logit_scale=0.5)) == 0.5
    assert head_scale(Gemma3TextConfig(final_logit_softcapping=None)) == 1.0
    assert head_scale(Gemma3TextConfig(final_logit_softcapping=30.0)) is None
    # HyperCLOVA X multiplies by its logits_scaling where Granite divides: not a key read the Granite way.
    assert head_scale(HyperCLOVAXConfig(logits_scaling=2.0)) is None
