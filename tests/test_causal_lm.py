"""The causal-LM task: alignment, perplexity, the fused loss path, the token store, the run end to end."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from distill.data.text import TextDataModule
from distill.kernels.sparsity import is_nm_sparse
from distill.losses.kd import kd_loss_terms
from distill.losses.topk import topk_targets
from distill.models.student import check_context, from_pretrained, shared_vocabulary
from distill.models.teacher import Teacher, prepare_teacher
from distill.modules.distillation import DistillationModule
from distill.stores.teacher_logits import precompute_teacher_logits
from distill.tasks import CausalLMTask
from distill.tasks.base import FusedStep
from distill.tasks.causal_lm import Perplexity, next_token_nll, perplexity
from distill.train import train
from distill.utils.keys import EXAMPLE_INDEX
from distill.utils.references import resolve
from tests.callback_helpers import make_trainer
from tests.conftest import tiny_llama


def text_module(corpus: Path, tokenizer: str, cache: Path, **overrides) -> TextDataModule:
    settings = dict(val_files=["work_3.txt"], test_files=["work_4.txt"], block_size=16, batch_size=2, eval_batch_size=2)
    module = TextDataModule(str(corpus), str(cache), tokenizer, **{**settings, **overrides})
    module.prepare_data()
    module.setup("fit")
    return module


def test_align_compares_position_i_with_token_i_plus_1() -> None:
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    student, teacher, targets = CausalLMTask().align(logits, logits + 1, labels)
    assert torch.equal(student, logits[:, :4]) and torch.equal(teacher, logits[:, :4] + 1)
    assert torch.equal(targets, labels[:, 1:])
    stored = topk_targets(logits, 3, 1.0)
    _, shifted, _ = CausalLMTask().align(logits, stored, labels)
    assert shifted.values.shape == (2, 4, 3) and shifted.rest_log_mass.shape == (2, 4)


def test_perplexity_is_token_weighted_over_batches() -> None:
    torch.manual_seed(0)
    batches = [(torch.randn(1, 6, 11), torch.randint(0, 11, (1, 6))) for _ in range(2)]
    batches[1][1][0, 4:] = -100  # padding of a last block
    metric = Perplexity()
    for logits, labels in batches:
        metric.update(*next_token_nll(logits, labels))
    losses = [
        F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="none")[labels[0, 1:] != -100]
        for logits, labels in batches
    ]
    expected = math.exp(torch.cat(losses).mean().item())
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-6)


def module_for(student, teacher, task: CausalLMTask, **settings) -> DistillationModule:
    return DistillationModule(
        student=student,
        teacher=teacher,
        num_labels=None,
        task=task,
        temperature=settings.pop("temperature", 2.0),
        alpha=settings.pop("alpha", 0.3),
        optimizer=torch.optim.SGD,
        **settings,
    )


@pytest.mark.parametrize("fused", [True, False])
def test_differently_padded_vocabularies_compare_the_tokenizers_ids(fused: bool) -> None:
    """A teacher padded to 104 rows and a student to 97, one 97-token tokenizer: the loss is the one on
    the first 97 logits of each (fused head kernel and logit path alike); the padding never counts."""
    teacher, student = tiny_llama(104, layers=4, seed=1), tiny_llama(97, layers=2, seed=2).train()
    batch = {"input_ids": torch.randint(0, 97, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    labels = batch["input_ids"].clone()
    tokenizer = [None] * 97  # only its length matters
    task = CausalLMTask(fused_kd=fused)
    task.vocabulary = shared_vocabulary(Teacher(model=teacher, path="padded", task=task), student, tokenizer)
    assert task.vocabulary == 97
    loss = module_for(student, teacher, task).training_step({**batch, "labels": labels.clone()}, 0)
    student_logits, teacher_logits = student(**batch).logits, teacher(**batch).logits[..., :97]
    expected = kd_loss_terms(*CausalLMTask().align(student_logits, teacher_logits, labels), temperature=2.0, alpha=0.3)
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"the tokenizer's 100 tokens do not fit both"):
        shared_vocabulary(Teacher(model=teacher, path="padded", task=task), student, [None] * 100)


def test_other_divergences_take_the_logit_path() -> None:
    teacher, student = tiny_llama(97, seed=1), tiny_llama(97, layers=2, seed=2)
    batch = {"input_ids": torch.randint(0, 97, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    module = module_for(student, teacher, CausalLMTask(), divergence="reverse_kl", alpha=0.0)
    step = FusedStep(student, module.teacher, stored=None, temperature=2.0, alpha=0.0, divergence="reverse_kl")
    assert module.task.fused_terms(step, batch, batch["input_ids"]) is None
    loss = module.training_step({**batch, "labels": batch["input_ids"].clone()}, 0)
    expected = kd_loss_terms(
        *CausalLMTask().align(student(**batch).logits, teacher(**batch).logits, batch["input_ids"]),
        temperature=2.0,
        alpha=0.0,
        divergence="reverse_kl",
    ).loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_teacher_nll_memo_tells_labellings_of_the_same_inputs_apart() -> None:
    """The teacher's memoised NLL counts the tokens its labels count: a batch whose prompt is masked gets
    its own answer, not the one the same inputs got with every token labelled."""
    teacher = tiny_llama(97, layers=2, seed=1)
    module = module_for(tiny_llama(97, layers=1, seed=2), teacher, CausalLMTask())
    teacher_nll = []

    def record(name: str, batch_size: int, *values: torch.Tensor) -> None:
        if name == "val/teacher_ppl":
            teacher_nll.append(values[0])

    module.update_metric = record
    batch = {"input_ids": torch.randint(0, 97, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    every_token, response_only = batch["input_ids"].clone(), batch["input_ids"].clone()
    response_only[:, :5] = -100
    for labels in (every_token, response_only):
        module.task.evaluate(module, {**batch, "labels": labels}, "val")
    with torch.no_grad():
        fresh, _ = next_token_nll(teacher(**batch).logits, response_only)
    assert teacher_nll[0] != teacher_nll[1]
    assert teacher_nll[1].item() == pytest.approx(fresh.item(), rel=1e-6)


@pytest.mark.slow
def test_token_store_is_compact_and_gives_the_live_targets(lm_teacher_dir: Path, corpus: Path, tmp_path: Path) -> None:
    data = text_module(corpus, str(lm_teacher_dir), tmp_path / "cache")
    teacher = AutoModelForCausalLM.from_pretrained(lm_teacher_dir).eval()
    store = precompute_teacher_logits(
        teacher, data, str(tmp_path / "cache"), topk=8, temperature=2.0, value_dtype="float16"
    )
    assert store.tensors["indices"].dtype == torch.uint16 and store.tensors["values"].dtype == torch.float16
    assert store.bytes_per_position(data.block_size) == 2 * 8 + 2 * 8 + 4
    batch = next(iter(data.dataloader("train", 2, shuffle=True)))
    index = batch.pop(EXAMPLE_INDEX)
    batch.pop("labels")
    live, cached = topk_targets(teacher(**batch).logits, 8, 2.0), store(index)
    assert torch.equal(cached.indices, live.indices)
    offsets = live.values - live.values.amax(-1, keepdim=True)
    torch.testing.assert_close(cached.values, offsets, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(cached.rest_log_mass, live.rest_log_mass)


@pytest.mark.slow
def test_teacher_correction_is_cached(lm_teacher_dir: Path, corpus: Path, tmp_path: Path) -> None:
    data = text_module(corpus, str(lm_teacher_dir), tmp_path / "cache")
    settings = dict(epochs=1, max_steps=2, lr=1e-3, batch_size=2, weight_decay=0.0, warmup_ratio=0.0, seed=0)
    task = CausalLMTask()
    first = prepare_teacher(str(lm_teacher_dir), data, task, True, str(tmp_path / "teachers"), settings)
    second = prepare_teacher(str(lm_teacher_dir), data, task, True, str(tmp_path / "teachers"), settings)
    assert first.metric == "val/ppl" and first.val_score == second.val_score and math.isfinite(first.val_score)
    assert first.path == second.path and json.loads((Path(first.path) / "teacher_info.json").read_text())["steps"] == 2
    assert isinstance(first.model, LlamaForCausalLM)


def test_bad_inputs_are_named(lm_teacher_dir: Path, tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no_such\.gguf"):
        resolve(str(tmp_path / "no_such.gguf"))
    with pytest.raises(FileNotFoundError, match="missing_model"):
        resolve(str(tmp_path / "missing_model"))
    data = text_module(corpus, str(lm_teacher_dir), tmp_path / "cache", block_size=256)
    with pytest.raises(ValueError, match=r"data.block_size=256 exceeds the model's context length of 128"):
        check_context(AutoModelForCausalLM.from_pretrained(lm_teacher_dir), data)
    other = tmp_path / "other_tokenizer"
    AutoModelForCausalLM.from_pretrained(lm_teacher_dir).save_pretrained(other)
    tokenizer = AutoTokenizer.from_pretrained(lm_teacher_dir)
    tokenizer.add_tokens(["<an_extra_token>"])
    tokenizer.save_pretrained(other)
    teacher = Teacher(AutoModelForCausalLM.from_pretrained(lm_teacher_dir), str(lm_teacher_dir), CausalLMTask())
    with pytest.raises(ValueError, match="different tokenizer"):
        from_pretrained(teacher, str(other))


def tiny_run(teacher: Path, corpus: Path) -> list[str]:
    """Overrides that run experiment=smollm2_to_small's pipeline in seconds on the tiny teacher and corpus."""
    return [
        f"teacher.name_or_path={teacher}",
        f"data.data_dir={corpus}",
        "data.pattern=*.txt",
        "data.val_files=[work_3.txt]",
        "data.test_files=[work_4.txt]",
        "data.block_size=16",
        "data.train_limit_blocks=12",
        "student.target_params=null",
        "student.shape.num_layers=2",
        "distill.teacher_cache_topk=8",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false",
        "task.new_tokens=4",
        "logger=csv",
    ]


@pytest.mark.slow
def test_pruned_student_run_end_to_end(
    compose_train, lm_teacher_dir: Path, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """experiment=smollm2_to_small's pipeline on a tiny teacher: prune, store, distil, test, export."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    cfg = compose_train(
        "experiment=smollm2_to_small",
        "debug=smoke",
        f"paths.output_dir={run}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *tiny_run(lm_teacher_dir, corpus),
    )
    metrics = train(cfg)
    assert metrics["student/layer_params"] * 2 == metrics["teacher/layer_params"]
    for key in ("student/test_ppl", "teacher/test_ppl", "student_before_fit/ppl"):
        assert math.isfinite(metrics[key]), key
    assert metrics["student_before_fit/teacher_ppl"] == pytest.approx(metrics["teacher/test_ppl"])
    assert metrics["teacher_store/bytes_per_token"] == 2 * 8 + 2 * 8 + 4
    # Every step's tokens, although the tested checkpoint is an earlier one (the best check).
    assert metrics["student/trained_tokens"] == metrics["global_step"] * cfg.data.batch_size * 15
    assert json.loads((run / "pruning.json").read_text())["student_shape"]["num_layers"] == 2
    samples = json.loads((run / "generations.json").read_text())["samples"]
    assert len(samples) == cfg.task.samples and all({"prompt", "student", "teacher"} <= set(row) for row in samples)
    reloaded = AutoModelForCausalLM.from_pretrained(run / "student")
    data = text_module(corpus, str(run / "student"), tmp_path / "cache", test_limit_blocks=cfg.data.test_limit_blocks)
    assert perplexity(reloaded, data.test_dataloader()) == pytest.approx(metrics["student/test_ppl"], rel=1e-4)
    restored = DistillationModule.load_student(str(run / "checkpoints" / "last.ckpt"))
    assert isinstance(restored, LlamaForCausalLM) and restored.config.num_hidden_layers == 2


@pytest.mark.slow
def test_decoder_compression_nm24_qat8(
    compose_train, lm_teacher_dir: Path, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compression=nm24_qat8 on the decoder layers: held-out perplexity, exact 2:4 exports, int8 perplexity."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    cfg = compose_train(
        "experiment=smollm2_to_small",
        "debug=smoke",
        "compression=nm24_qat8",
        f"paths.output_dir={run}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *tiny_run(lm_teacher_dir, corpus),
    )
    metrics = train(cfg)
    assert math.isfinite(metrics["student/test_ppl"]) and math.isfinite(metrics["student_int8/test_ppl"])
    assert metrics["compression/nm24_valid_layers"] == 2 * 7  # q, k, v, o, gate, up, down per layer
    student = AutoModelForCausalLM.from_pretrained(run / "student")
    decoder_linears = [
        m for n, m in student.named_modules() if n.startswith("model.layers.") and hasattr(m, "in_features")
    ]
    assert len(decoder_linears) == 14 and all(is_nm_sparse(m.weight, 2, 4) for m in decoder_linears)
    assert not is_nm_sparse(student.lm_head.weight, 2, 4)  # the tied embedding / LM head is left alone


class DumpStudent(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, module) -> None:
        weights = {name: value.cpu() for name, value in module.student.state_dict().items()}
        torch.save(weights, self.folder / f"rank{trainer.global_rank}.pt")


def student_after_one_step(
    items: list[dict], folder: Path, vocab: int, devices: int, batch_size: int, accumulate: int
) -> dict[str, torch.Tensor]:
    """A 1-layer student's weights after one SGD step (CE only, lr 1) on ``items``, in order, unshuffled
    (the ranks' DistributedSampler interleaves, which the token mean ignores)."""
    folder.mkdir()
    module = DistillationModule(
        student=tiny_llama(vocab, layers=1, seed=3).train(),
        teacher=None,
        num_labels=None,
        task=CausalLMTask(),
        temperature=1.0,
        alpha=1.0,
        optimizer=functools.partial(torch.optim.SGD, lr=1.0),
        warmup_ratio=0.0,
    )
    strategy = "ddp_spawn" if devices > 1 else "auto"
    trainer = make_trainer(
        folder, [DumpStudent(folder)], 1, devices=devices, strategy=strategy, accumulate_grad_batches=accumulate
    )
    trainer.fit(module, train_dataloaders=DataLoader(items, batch_size=batch_size))
    return torch.load(folder / "rank0.pt")


@pytest.mark.distributed
def test_token_mean_is_over_the_whole_step_across_ranks_and_accumulated_batches(tmp_path: Path) -> None:
    """Micro-batches and ranks with very different token counts take the step one process takes on
    the whole batch: two ranks, two accumulated micro-batches, and both at once."""
    ids = torch.randint(0, 97, (4, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, 3:] = -100  # 2 counted tokens against 9
    labels[2, 7:] = -100  # 6
    items = [
        {"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": labels[i]} for i in range(4)
    ]
    arms = {  # name: (ranks, batch size, accumulated micro-batches); the reference takes all 4 at once
        "single": (1, 4, 1),
        "ddp": (2, 2, 1),
        "accumulated": (1, 1, 4),
        "ddp_accumulated": (2, 1, 2),
    }
    results = {name: student_after_one_step(items, tmp_path / name, 97, *arm) for name, arm in arms.items()}
    for name in ("ddp", "accumulated", "ddp_accumulated"):
        for key, value in results["single"].items():
            torch.testing.assert_close(results[name][key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
