"""The config tree composes, and bad keys or values fail before any training."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from distill.config.schemas import validate

PRESETS = [
    [],
    ["experiment=bert_to_tiny"],
    ["experiment=bert_to_tiny", "debug=smoke"],
    ["student=bert_config"],
    ["student=pretrained", "student.name_or_path=x"],
    ["experiment=bert_to_tiny", "student=pretrained", "student.name_or_path=x"],
    ["experiment=bert_to_tiny_gmp80", "student.name_or_path=x"],
    ["experiment=bert_to_tiny_nm24", "student.name_or_path=x"],
    ["logger=csv", "callbacks=none", "trainer=cpu"],
]


@pytest.mark.parametrize("overrides", PRESETS, ids=lambda o: " ".join(o) or "defaults")
def test_presets_compose_and_validate(compose_train, overrides: list[str]) -> None:
    cfg = compose_train(*overrides, "paths.output_dir=/tmp/unused")
    validate(cfg)
    OmegaConf.resolve(cfg)
    for group in ("data", "teacher", "student", "trainer"):
        assert "_target_" in cfg[group]


def test_experiment_only_overrides(compose_train) -> None:
    base = compose_train("paths.output_dir=/tmp/unused")
    experiment = compose_train("experiment=bert_to_tiny", "paths.output_dir=/tmp/unused")
    base_keys = set(OmegaConf.to_container(base, resolve=False))
    assert set(OmegaConf.to_container(experiment, resolve=False)) == base_keys
    assert experiment.student.layers == [0, 5]


def test_the_pruning_stage_prunes_a_given_student_with_the_first_stages_recipe(compose_train) -> None:
    first = compose_train("experiment=bert_to_tiny", "paths.output_dir=/tmp/unused")
    second = compose_train("experiment=bert_to_tiny_gmp80", "student.name_or_path=run/student")
    assert second.student.name_or_path == "run/student" and second.compression.magnitude_pruning.final_sparsity == 0.8
    assert second.data == first.data and second.distill.temperature == first.distill.temperature
    assert (first.trainer.max_epochs, second.trainer.max_epochs) == (2, 2)
    with pytest.raises(ValueError, match=r"student\.name_or_path must be set .*student\.name_or_path=<value>"):
        validate(compose_train("experiment=bert_to_tiny_gmp80"))


def test_the_2_4_stage_masks_the_given_student_once_and_recovers_for_one_epoch(compose_train) -> None:
    pruning = compose_train("experiment=bert_to_tiny_gmp80", "student.name_or_path=run/student")
    masking = compose_train("experiment=bert_to_tiny_nm24", "student.name_or_path=run/student")
    assert list(masking.compression) == ["nm_sparsity"] and masking.compression.nm_sparsity.prune_step == 0
    assert (masking.compression.nm_sparsity.n, masking.compression.nm_sparsity.m) == (2, 4)
    assert masking.trainer.max_epochs == 1 and masking.task_name == "bert_to_tiny_nm24"
    for group in ("data", "distill", "student", "teacher"):
        assert masking[group] == pruning[group], group


MISTYPED = ["distill.temprature=3", "teacher.finetune_setings.lr=1", "data.batchsize=4", "data.augment.copys=1"]


@pytest.mark.parametrize("override", MISTYPED)
def test_mistyped_command_line_keys_fail_at_compose_time(compose_train, override: str) -> None:
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0]):
        compose_train(override)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("distill:\n  temprature: 3.0", "temprature"),
        ("teacher:\n  finetune_setings:\n    lr: 1.0", "finetune_setings"),
        ("data:\n  batchsize: 4", "batchsize"),
    ],
)
def test_mistyped_keys_in_a_preset_fail_at_compose_time(compose_train, tmp_path: Path, body: str, key: str) -> None:
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\n" + body + "\n")
    with pytest.raises(ConfigCompositionException) as error:
        compose_train(f"hydra.searchpath=[file://{tmp_path}]", "experiment=typo")
    assert f"Key '{key}' not in" in str(error.value)


def test_wrong_type_fails_at_compose_time(compose_train) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_train("distill.alpha=high")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distill.temperature=0", r"distill.temperature=0.0 must be > 0"),
        ("distill.temperature=-2", r"distill.temperature=-2.0 must be > 0"),
        ("distill.alpha=1.5", r"distill.alpha=1.5 is outside \[0.0, 1.0\]"),
        ("distill.alpha=-0.1", r"distill.alpha=-0.1 is outside \[0.0, 1.0\]"),
        ("distill.hidden_weight=-1", r"distill.hidden_weight=-1.0 must be >= 0"),
        ("distill.teacher_cache_topk=1", r"distill.teacher_cache_topk=1 needs distill.teacher_cache=precompute"),
    ],
)
def test_out_of_range_values_are_named(compose_train, override: str, message: str) -> None:
    cfg = compose_train(override, "paths.output_dir=/tmp/unused")
    with pytest.raises(ValueError, match=message):
        validate(cfg)


@pytest.mark.parametrize("topk", [0, 3])
def test_top_k_store_size_is_checked_against_the_classes(compose_train, topk: int) -> None:
    cfg = compose_train("distill.teacher_cache=precompute", f"distill.teacher_cache_topk={topk}")
    with pytest.raises(ValueError, match=rf"distill.teacher_cache_topk={topk} must be in \[1, data.num_labels=2\]"):
        validate(cfg)


def test_eval_config_composes_and_resolves(compose_train) -> None:
    cfg = compose_train("student_path=some/student", "paths.output_dir=/tmp/unused", config_name="eval")
    OmegaConf.resolve(cfg)
    assert cfg.data.tokenizer == "some/student" and list(cfg.latency.batch_sizes) == [1, 32]
