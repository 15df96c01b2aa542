"""Layer-sequential one-shot pruning (distill/pruning/oneshot/sequential.py) and `python -m distill.prune`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, BertConfig, BertForSequenceClassification

from distill.kernels.sparsity import is_nm_sparse
from distill.prune import MASKS_FILE, prune
from distill.pruning.oneshot import solvers
from distill.pruning.oneshot.sequential import OneShotSettings, prune_oneshot, target_linears
from distill.pruning.oneshot.solvers import SparsityTarget
from tests.conftest import tiny_llama

VOCAB = 100
TWO_FOUR = SparsityTarget(n=2, m=4)


def batches(seed: int = 1, count: int = 3) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(count):
        input_ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, 8:] = 0
        result.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return result


def stack_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: model.get_submodule(name) for name in target_linears(model, None)}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_block_linear_is_exactly_2_4_and_nothing_else_changes(method: str) -> None:
    model, dense = tiny_llama(VOCAB, layers=2), tiny_llama(VOCAB, layers=2)
    masks = prune_oneshot(model, batches(), OneShotSettings(method, TWO_FOUR, block_size=16))
    linears = stack_linears(model)
    assert sorted(masks) == sorted(f"{name}.weight" for name in linears) and len(linears) == 14
    for name, linear in linears.items():
        keep = masks[f"{name}.weight"]
        assert is_nm_sparse(linear.weight) and (keep.reshape(-1, 4).sum(-1) == 2).all()
        assert not linear.weight[~keep].any()
    untouched = {name for name, _ in model.named_parameters()} - set(masks)
    for name in untouched:
        assert torch.equal(model.get_parameter(name), dense.get_parameter(name)), name
    with torch.no_grad():
        assert torch.isfinite(model(**batches()[0]).logits).all()


def test_each_block_is_calibrated_on_the_pruned_outputs_of_the_blocks_before_it() -> None:
    model = tiny_llama(VOCAB, layers=2)
    masks = prune_oneshot(model, batches(), OneShotSettings("wanda", SparsityTarget(sparsity=0.5)))
    # The oracle: block 0 pruned with the masks found, block 1 still dense; block 1's Linear inputs
    # on real tokens give the Wanda norms its masks must come from.
    oracle = tiny_llama(VOCAB, layers=2)
    with torch.no_grad():
        for name, keep in masks.items():
            if ".layers.0." in name:
                oracle.get_parameter(name).mul_(keep)
    norms, handles = {}, []
    for name, linear in stack_linears(oracle).items():
        if ".layers.1." in name:
            norms[name] = torch.zeros(linear.in_features)

            def record(_module, args, name=name):
                norms[name] += (args[0][current["tokens"]] ** 2).sum(0)

            handles.append(linear.register_forward_pre_hook(record))
    current = {}
    with torch.no_grad():
        for batch in batches():
            current["tokens"] = batch["attention_mask"].bool()
            oracle(**batch, use_cache=False)
    for handle in handles:
        handle.remove()
    for name, norm in norms.items():
        _, expected = solvers.wanda(oracle.get_submodule(name).weight, SparsityTarget(sparsity=0.5), norm)
        assert torch.equal(masks[f"{name}.weight"], expected), name


def test_padding_never_enters_the_statistics() -> None:
    padded = batches()
    changed = [{**batch, "input_ids": batch["input_ids"].clone()} for batch in padded]
    for batch in changed:
        batch["input_ids"][1, 8:] = (batch["input_ids"][1, 8:] + 7) % VOCAB
    settings = OneShotSettings("sparsegpt", TWO_FOUR, block_size=16)
    first = prune_oneshot(tiny_llama(VOCAB, layers=2), padded, settings)
    second = prune_oneshot(tiny_llama(VOCAB, layers=2), changed, settings)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_encoder_blocks_are_pruned_and_the_classifier_is_not() -> None:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model = BertForSequenceClassification(config).eval()
    classifier = model.classifier.weight.clone()
    masks = prune_oneshot(model, batches(), OneShotSettings("sparsegpt", SparsityTarget(sparsity=0.5), block_size=16))
    assert len(masks) == 12 and all(name.startswith("bert.encoder.layer.") for name in masks)
    for name, keep in masks.items():
        assert int((~keep).sum()) == keep.numel() // 2 and not model.get_parameter(name)[~keep].any()
    assert torch.equal(model.classifier.weight, classifier)


def test_targets_outside_the_blocks_or_matching_nothing_are_named() -> None:
    model = tiny_llama(VOCAB, layers=2)
    with pytest.raises(ValueError, match=r"include pattern 'lm_head' matches \['lm_head'\], outside the blocks"):
        target_linears(model, ["lm_head"])
    with pytest.raises(ValueError, match=re.escape("include pattern 'model.layers.*.mlp.fc9' matches no Linear")):
        target_linears(model, ["model.layers.*.mlp.fc9"])
    with pytest.raises(ValueError, match="leaves no Linear layer"):
        target_linears(model, ["model.layers.*.mlp.*"], ["*proj"])
    assert len(target_linears(model, ["model.layers.*.mlp.*"], ["*down_proj"])) == 4
    with pytest.raises(ValueError, match="method='obs' must be one of"):
        OneShotSettings("obs", TWO_FOUR)


@pytest.mark.slow
def test_prune_cli_saves_a_reloadable_model_with_its_masks(compose_train, prune_overrides, tmp_path: Path) -> None:
    report = prune(compose_train(*prune_overrides, config_name="prune"))
    folder = tmp_path / "run" / "model"
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    masks = load_file(str(folder / MASKS_FILE))
    assert len(masks) == report["pruned_layers"] == 28 and report["layer_sparsity"] == 0.5
    for name, keep in masks.items():
        assert is_nm_sparse(reloaded.get_parameter(name)) and not reloaded.get_parameter(name)[~keep].any()
    assert report["calibration_tokens"] == 5 * 16
    assert 1 < report["pruned"]["test_ppl"] != report["dense"]["test_ppl"] > 1  # a random model: either way
    assert report["peak_memory_mib"] > 0 and report["prune_seconds"] > 0
    assert json.loads((tmp_path / "run" / "prune.json").read_text())["target"] == "2:4"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("calibration.samples=500", "calibration.samples=500 is more than the"),
        pytest.param(
            "pattern=5:12 sparsegpt.block_size=12",
            "pattern 5:12 needs model.layers.0.self_attn.q_proj's input width",
            marks=pytest.mark.slow,
        ),
        ("sparsity=1.5", "sparsity=1.5 and pattern='2:4' are both set: give one, e.g. sparsity=1.5 pattern=null"),
        ("method=obs", "method='obs' must be one of"),
    ],
)
def test_prune_cli_names_bad_input_and_writes_nothing(compose_train, prune_overrides, override, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        prune(compose_train(*prune_overrides, *override.split(), config_name="prune"))
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.slow
def test_distilling_the_pruned_model_holds_the_pruners_masks(
    compose_train, prune_overrides, lm_teacher_dir: Path, corpus: Path, tmp_path: Path, monkeypatch
) -> None:
    """prune (SparseGPT 2:4) -> distil from the dense teacher with compression=hold_masks_qat8: the
    exported student has exactly the pruner's zeros, and its int8 copy is scored."""
    from distill.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    prune(compose_train(*prune_overrides, config_name="prune"))
    pruned = tmp_path / "run" / "model"
    saved = load_file(str(pruned / MASKS_FILE))
    data = [override for override in prune_overrides if override.startswith("data.")]
    cfg = compose_train(
        "experiment=smollm2_sparse_recover",
        "debug=smoke",
        f"student.name_or_path={pruned}",
        "compression=hold_masks_qat8",
        f"teacher.name_or_path={lm_teacher_dir}",
        f"paths.output_dir={tmp_path / 'distil'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *data,
        "data.train_limit_blocks=12",
        "distill.teacher_cache_topk=8",
        "distill.optimizer.lr=0.05",  # large steps: a mask that did not hold would show
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false",
        "task.new_tokens=4",
        "logger=csv",
    )
    metrics = train(cfg)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "distil" / "student")
    assert len(saved) == 28
    for name, keep in saved.items():
        weight = student.get_parameter(name)
        assert not weight[~keep].any(), name
        assert weight[keep].count_nonzero() > 0.99 * keep.sum(), name  # the kept weights trained, not zeroed
    dense = AutoModelForCausalLM.from_pretrained(pruned)
    assert not torch.equal(student.get_parameter(next(iter(saved))), dense.get_parameter(next(iter(saved))))
    assert metrics["student_int8/test_ppl"] > 1 and metrics["compression/quantized_layers"] == 28


def test_held_masks_name_a_missing_file(compose_train, tmp_path: Path) -> None:
    from distill.callbacks.held_masks import read_masks

    with pytest.raises(FileNotFoundError, match=r"masks_file '.*/nothing/sparsity_masks\.safetensors' does not exist"):
        read_masks(tmp_path / "nothing" / MASKS_FILE)


@pytest.mark.slow
def test_prune_cli_on_a_sequence_classifier(compose_train, tiny_teacher_dir: Path, data_dir: Path, tmp_path: Path):
    """task=classification data=sst2: calibration from SST-2's training sentences (padded), dev accuracy."""
    from transformers import AutoModelForSequenceClassification

    cfg = compose_train(
        "task=classification",
        "data=sst2",
        f"model={tiny_teacher_dir}",
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.data_dir={data_dir}",
        "data.train_limit=64",
        "data.val_limit=64",
        "data.batch_size=16",
        "calibration.samples=20",
        "method=wanda",
        config_name="prune",
    )
    report = prune(cfg)
    assert 0 <= report["pruned"]["val_acc"] <= 1 and 0 <= report["dense"]["val_acc"] <= 1
    assert report["pruned_layers"] == 12 and report["layer_sparsity"] == 0.5
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model")
    assert all(
        is_nm_sparse(student.get_parameter(name)) for name in load_file(str(tmp_path / "run" / "model" / MASKS_FILE))
    )


@pytest.mark.parametrize(
    ("setting", "message"), [("gpu0", "device='gpu0' is not a device"), ("cuda", "torch sees no CUDA GPU")]
)
def test_a_bad_or_absent_device_is_named(setting: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from distill.prune import device_of

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=message):
        device_of(setting)
    assert device_of("auto").type == "cpu"
