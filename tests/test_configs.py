"""The config tree composes, and bad keys or values fail before any training."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import PreTrainedModel

from distill.config.schemas import COMMANDS, config_type, derived_schemas, register_schemas, validate
from distill.data.augment import AugmentSettings
from distill.data.glue import GlueDataModule
from distill.data.text import TextDataModule
from distill.models.teacher import FinetuneSettings, prepare_teacher
from distill.modules.distillation import DistillationModule
from distill.pipeline.stages import STAGE_KEYS, StageSettings, module_partial
from tests.conftest import CONF_DIR

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


@pytest.mark.parametrize("sweep", sorted(path.stem for path in (CONF_DIR / "sweep").glob("*.yaml")))
def test_sweeps_compose_with_the_lm_experiment(compose_train, sweep: str) -> None:
    """Every sweep applies to the causal-LM preset too; its temperatures, if it sweeps any, share one store."""
    cfg = compose_train("experiment=smollm2_to_small", f"sweep={sweep}", "paths.output_dir=/tmp/unused")
    validate(cfg)
    module_partial(cfg.distill)  # the stages' keys, the store's temperatures among them, are not the module's
    sweep_file = OmegaConf.load(CONF_DIR / "sweep" / f"{sweep}.yaml")
    temperatures = str(sweep_file.hydra.sweeper.params.get("distill.temperature", ""))
    if temperatures and "interval" not in temperatures:
        listed = {float(value) for value in temperatures.split(",")}
        assert listed <= set(map(float, cfg.distill.teacher_cache_temperatures))


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
    message = rf"distill.teacher_cache_topk={topk} must be in \[1, 2\] \(data.num_labels=2\)"
    with pytest.raises(ValueError, match=message):
        validate(cfg)


def test_eval_config_composes_and_resolves(compose_train) -> None:
    cfg = compose_train("student_path=some/student", "paths.output_dir=/tmp/unused", config_name="eval")
    OmegaConf.resolve(cfg)
    assert cfg.data.tokenizer == "some/student" and list(cfg.latency.batch_sizes) == [1, 32]


# Keys of the schemas read off a signature, nested settings dataclasses included.
@pytest.mark.parametrize(
    "overrides",
    [
        ["distill.alpah=0.5"],
        ["data.batch_sise=8"],
        ["compression=nm24", "compression.nm_sparsity.n_=2"],
        ["distill.on_policy.probabilty=0.5"],
        ["student=pruned", "student.shape.num_layer=3"],
        ["experiment=smollm2_seqkd", "data.generation.temprature=0.5"],
        ["experiment=smollm2_seqkd", "data.corpus.block_sise=64"],
    ],
    ids=lambda overrides: overrides[-1],
)
def test_mistyped_keys_of_derived_schemas_fail_at_compose_time(compose_train, overrides: list[str]) -> None:
    with pytest.raises(ConfigCompositionException, match=re.escape(overrides[-1].split("=")[0])):
        compose_train(*overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distill.warmup_ratio=1.5"], r"distill.warmup_ratio=1.5 is outside \[0.0, 1.0\]"),
        (["distill.divergence=kl"], r"distill.divergence='kl' is not one of forward_kl"),
        (["distill.divergence=skew_kl", "distill.beta=1"], r"distill.beta=1.0 must be in \[0, 1\) for"),
        (["distill.teacher_cache=disk"], r"distill.teacher_cache='disk' must be 'none' or 'precompute'"),
        (
            ["distill.teacher_cache_dtype=float16"],
            r"distill.teacher_cache_dtype='float16' needs distill.teacher_cache_topk",
        ),
        (["distill.on_policy.probability=1.5"], r"distill.on_policy.probability=1.5 must be in \[0, 1\]"),
        (["distill.on_policy.top_p=0"], r"distill.on_policy.top_p=0.0 must be in \(0, 1\]"),
        (["teacher.finetune_settings.warmup_ratio=2"], r"teacher.finetune_settings.warmup_ratio=2.0 is outside"),
        (["data.batch_size=0"], r"data.batch_size=0 must be >= 1"),
        (["data.max_length=1"], r"data.max_length=1 must be >= 2"),
        (["data.augment.mask_prob=1.5"], r"data.augment.mask_prob=1.5 must be in \[0, 1\]"),
        (["data=shakespeare", "data.block_size=1"], r"data.block_size=1 must be at least 2"),
        (["data=shakespeare", "data.val_limit_blocks=0"], r"data.val_limit_blocks=0 must be a positive number"),
        (["experiment=smollm2_seqkd", "data.corpus.eval_batch_size=0"], r"data.corpus.eval_batch_size=0 must be"),
        (["experiment=smollm2_seqkd", "data.max_prompt_tokens=1"], r"data.max_prompt_tokens=1 must be >= 2"),
        (["experiment=smollm2_seqkd", "data.train_on=text"], r"data.train_on='text' must be one of"),
        (["experiment=smollm2_seqkd", "data.generation.temperature=0"], r"data.generation.temperature=0.0 must be > 0"),
    ],
)
def test_each_components_own_checks_run_before_any_stage(compose_train, overrides: list[str], message: str) -> None:
    cfg = compose_train(*overrides, "paths.output_dir=/tmp/unused")
    with pytest.raises(ValueError, match=message):
        validate(cfg)


def test_the_constructors_raise_what_validate_reports() -> None:
    with pytest.raises(ValueError, match=r"^warmup_ratio=1.5 is outside \[0.0, 1.0\]"):
        DistillationModule(nn.Linear(2, 2), None, 2, 1.0, 1.0, torch.optim.AdamW, warmup_ratio=1.5)
    with pytest.raises(ValueError, match=r"^hidden_weight=-1 must be >= 0"):
        DistillationModule.check_settings(2.0, 0.5, "forward_kl", 0.5, 0.06, -1)
    with pytest.raises(ValueError, match=r"^warmup_ratio=2 is outside"):
        prepare_teacher("unused", None, object(), True, "", {"warmup_ratio": 2})
    with pytest.raises(ValueError, match=r"^distill.teacher_cache_topk=8 needs distill.teacher_cache=precompute"):
        StageSettings(teacher_cache_topk=8)
    with pytest.raises(ValueError, match=r"^batch_size=0 must be >= 1"):
        TextDataModule.check_settings(64, 0, 1, None, None, None)


def test_config_types_are_omegaconfs() -> None:
    assert config_type(int | None) == Optional[int]  # noqa: UP045
    assert config_type(Sequence[str]) == list[str]
    assert config_type(dict[str, Any] | None) == Optional[dict[str, Any]]  # noqa: UP045
    assert config_type(PreTrainedModel) is Any and config_type(PreTrainedModel | None) is Any
    assert config_type(Callable[..., torch.optim.Optimizer]) is Any and config_type(str | int) is Any


def test_schemas_are_read_off_the_constructors_signatures() -> None:
    schemas = derived_schemas()
    data = OmegaConf.structured(schemas["data", "data_schema"])
    parameters = inspect.signature(GlueDataModule).parameters
    assert list(data) == ["_target_", *parameters] and data._target_ == "distill.data.glue.GlueDataModule"
    for name in ("task", "text_fields", "data_dir", "cache_dir", "tokenizer", "num_labels"):
        assert OmegaConf.is_missing(data, name) and parameters[name].default is inspect.Parameter.empty
    assert data.max_length == parameters["max_length"].default and data.label_names is None
    assert data.augment == OmegaConf.structured(AugmentSettings)  # nested: the settings dataclass's defaults
    teacher = OmegaConf.structured(schemas["teacher", "teacher_schema"])
    assert "datamodule" not in teacher and "task" not in teacher  # passed by the run
    assert teacher.finetune_settings == OmegaConf.structured(FinetuneSettings)
    # **settings forwarded: HeldMasks's to MaskingCallback, the pruned student's to pruned_student.
    assert {"exclude", "zero_optimizer_state", "allow_overlap"} <= set(
        OmegaConf.structured(schemas["compression_schema", "held_masks"])
    )
    pruned = OmegaConf.structured(schemas["student", "pruned_schema"])
    assert (pruned.axes, pruned.layer_score, pruned.target_params) == (["depth"], "nll", None)


def test_the_module_is_built_from_distills_target_without_the_stages_keys(compose_train) -> None:
    cfg = compose_train("experiment=smollm2_seqkd", "recipe=onpolicy")
    module = module_partial(cfg.distill)
    assert (
        module.func is DistillationModule and cfg.distill._target_ == "distill.modules.distillation.DistillationModule"
    )
    module_keys = {"temperature", "alpha", "optimizer", "warmup_ratio", "hidden_weight", "hidden_layers", "divergence"}
    assert set(module.keywords) == module_keys | {"beta"} and not set(module.keywords) & set(STAGE_KEYS)
    assert (
        module.keywords["optimizer"].func is torch.optim.AdamW and module.keywords["optimizer"].keywords["lr"] == 2e-4
    )
    assert cfg.distill.on_policy.probability == 0.5 and cfg.distill.teacher_cache_topk == 64  # key paths kept


def _stated_against(path: Path) -> tuple[DictConfig, dict]:
    """The defaults a config file's body is stated against (its schemas', its parent option's), and its body."""
    body = yaml.safe_load(path.read_text()) or {}
    reference = OmegaConf.create()
    for entry in body.pop("defaults", []):
        if not isinstance(entry, str) or entry == "_self_":  # root configs' group choices
            continue
        name, _, package = entry.partition("@")
        group = None if path.parent == CONF_DIR else path.parent.name
        if name.startswith("/"):
            group, name = name.strip("/").split("/")
        if name.endswith("_schema") or group == "compression_schema":
            node = OmegaConf.structured(derived_schemas()[group, name] if group else COMMANDS[name])
        else:
            node = OmegaConf.merge(*_stated_against(path.parent / f"{name}.yaml"))
        reference = OmegaConf.merge(reference, {package: node} if package else node)
    return reference, body


def _restated(reference: Any, body: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in body.items():
        if key in ("_target_", "_partial_") or not isinstance(reference, dict) or key not in reference:
            continue
        if isinstance(value, dict):
            found += _restated(reference[key], value, f"{prefix}{key}.")
        elif value == reference[key]:
            found.append(f"{prefix}{key}={value!r}")
    return found


SCHEMA_BACKED = [
    *(
        path
        for group in ("data", "teacher", "student", "task", "distill", "compression")
        for path in CONF_DIR.glob(f"{group}/*.yaml")
    ),
    *(CONF_DIR / f"{command}.yaml" for command in ("prune", "quantize", "eval", "generate", "serve_bench")),
]


@pytest.mark.parametrize("path", SCHEMA_BACKED, ids=lambda path: str(path.relative_to(CONF_DIR)))
def test_yaml_states_only_what_differs_from_the_defaults(path: Path) -> None:
    register_schemas()
    reference, body = _stated_against(path)
    assert _restated(OmegaConf.to_container(reference, resolve=False), body) == []
