"""Dataclass schemas for the config groups that distill owns.

Group YAML files list ``<name>_schema`` first in their defaults, so a mistyped key in
a preset or on the command line fails while Hydra composes the config, and types are
checked. Value ranges are checked by :func:`validate`, before any data is loaded.
``register_schemas`` is called by the entry points; nothing registers at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from distill.losses.divergences import check_divergence_args
from distill.serve.generation import SamplingSettings


@dataclass
class FinetuneSettings:
    epochs: int = 1
    max_steps: int = -1
    lr: float = 5e-5
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    seed: int = 0
    val_checks_per_epoch: int = 1
    dropout: float | None = None


@dataclass
class TeacherSchema:
    _target_: str = "distill.models.teacher.prepare_teacher"
    name_or_path: str = MISSING
    finetune: bool = False
    cache_dir: str = MISSING
    finetune_settings: FinetuneSettings = field(default_factory=FinetuneSettings)


@dataclass
class FromTeacherSchema:
    _target_: str = "distill.models.student.from_teacher"
    layers: list[int] = MISSING


@dataclass
class FromConfigSchema:
    _target_: str = "distill.models.student.from_config"
    num_hidden_layers: int = MISSING
    hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    intermediate_size: int = MISSING


@dataclass
class PretrainedSchema:
    _target_: str = "distill.models.student.from_pretrained"
    name_or_path: str = MISSING


@dataclass
class PrunedShapeSchema:
    """An explicit student shape; unset fields keep the teacher's."""

    num_layers: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None


@dataclass
class PrunedSchema:
    """A smaller dense student cut from the teacher by measured importance (distill/pruning/structured.py)."""

    _target_: str = "distill.models.student.pruned"
    # A parameter count to reach by shrinking `axes`, or an explicit (partial) shape; one of the two.
    target_params: int | None = None
    shape: PrunedShapeSchema = field(default_factory=PrunedShapeSchema)
    axes: list[str] = field(default_factory=lambda: ["depth"])
    layer_score: str = "nll"
    calibration_batches: int = 8
    report_path: str | None = None
    # Where cut students are kept for reuse (distill/stores/pruned_students.py); null prunes every run.
    cache_dir: str | None = None


@dataclass
class ClassificationTaskSchema:
    _target_: str = "distill.tasks.ClassificationTask"
    num_labels: int = MISSING


@dataclass
class TokenClassificationTaskSchema:
    _target_: str = "distill.tasks.token_classification.TokenClassificationTask"
    label_names: list[str] = MISSING


@dataclass
class CausalLMTaskSchema:
    _target_: str = "distill.tasks.CausalLMTask"
    fused_kd: bool = True
    samples: int = 4
    prompt_tokens: int = 32
    new_tokens: int = 48


@dataclass
class OnPolicySchema:
    """GKD's on-policy steps (distill/modules/on_policy.py); probability (λ) 0 turns them off."""

    probability: float = 0.0
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class DistillSchema:
    temperature: float = 2.0
    alpha: float = 0.5
    divergence: str = "forward_kl"
    beta: float = 0.5
    warmup_ratio: float = 0.06
    hidden_weight: float = 0.0
    hidden_layers: list[int] | None = None
    teacher_cache: str = "none"
    # With teacher_cache=precompute: store only the teacher's K largest logits per example (distill.losses.topk).
    teacher_cache_topk: int | None = None
    # float16: top-K values stored in half precision (token-level stores: 260 bytes per token at K=64).
    teacher_cache_dtype: str = "float32"
    optimizer: Any = MISSING
    on_policy: OnPolicySchema = field(default_factory=OnPolicySchema)


@dataclass
class AugmentSchema:
    """Perturbed, unlabelled copies of each training example (distill.data.augment); 0 copies = off."""

    copies: int = 0
    mask_prob: float = 0.1
    replace_prob: float = 0.1
    span_prob: float = 0.25
    max_span: int = 5


@dataclass
class DataSchema:
    _target_: str = "distill.data.glue.GlueDataModule"
    task: str = MISSING
    text_fields: list[str] = MISSING
    label_field: str = "label"
    num_labels: int = MISSING
    label_names: list[str] | None = None
    data_dir: str = MISSING
    cache_dir: str = MISSING
    tokenizer: str = MISSING
    max_length: int = 128
    batch_size: int = 32
    eval_batch_size: int = 128
    num_workers: int = 0
    train_limit: int | None = None
    val_limit: int | None = None
    seed: int = 0
    group_by_length: bool = False
    augment: AugmentSchema = field(default_factory=AugmentSchema)


@dataclass
class TaggedDataSchema:
    """Tagged sentences for token classification (distill/data/tagged.py)."""

    _target_: str = "distill.data.tagged.TaggedDataModule"
    name: str = MISSING
    label_names: list[str] = MISSING
    data_dir: str = MISSING
    tokenizer: str = MISSING
    max_length: int = 64
    batch_size: int = 16
    eval_batch_size: int = 64
    num_workers: int = 0
    seed: int = 0


@dataclass
class TextDataSchema:
    """Plain-text documents packed into blocks for causal LMs (distill/data/text.py)."""

    _target_: str = "distill.data.text.TextDataModule"
    data_dir: str = MISSING
    pattern: str = "*.txt"
    hub_dataset: str | None = None
    hub_config: str | None = None
    text_field: str = "text"
    add_bos: bool = False
    val_files: list[str] = MISSING
    test_files: list[str] = MISSING
    cache_dir: str = MISSING
    tokenizer: str = MISSING
    block_size: int = 512
    batch_size: int = 8
    eval_batch_size: int = 8
    num_workers: int = 0
    seed: int = 0
    slice_seed: int = 0
    train_limit_blocks: int | None = None
    val_limit_blocks: int | None = None
    test_limit_blocks: int | None = None


@dataclass
class PromptDataSchema:
    """Prompts cut from a corpus and the teacher's responses (distill/data/prompts.py)."""

    _target_: str = "distill.data.prompts.PromptResponseDataModule"
    corpus: TextDataSchema = field(default_factory=TextDataSchema)
    cache_dir: str = MISSING
    instruction: str = "{passage}"
    prompts: dict[str, int] = field(default_factory=lambda: {"train": 1024, "validation": 64, "test": 128})
    passage_tokens: int = 48
    max_prompt_tokens: int = 128
    chat_template: bool = True
    generation: SamplingSettings = field(default_factory=SamplingSettings)
    shard_size: int = 256
    generation_batch_size: int = 16
    train_on: str = "responses"
    train_tokens: int | None = None
    batch_size: int = 8
    eval_batch_size: int = 16
    seed: int = 0
    pool_seed: int = 0


ENCODER_LINEARS = ["student.*encoder.layer.*"]


@dataclass
class TargetsSchema:
    """Which Linear layers a compression callback touches (module-name globs)."""

    include: list[str] = field(default_factory=lambda: list(ENCODER_LINEARS))
    exclude: list[str] = field(default_factory=list)


@dataclass
class MaskingSchema(TargetsSchema):
    zero_optimizer_state: bool = True
    allow_overlap: bool = False


@dataclass
class MagnitudePruningSchema(MaskingSchema):
    _target_: str = "distill.callbacks.magnitude_pruning.MagnitudePruning"
    final_sparsity: float = MISSING
    start_step: int = MISSING
    end_step: int = MISSING
    frequency: int = 100
    initial_sparsity: float = 0.0
    scope: str = "layer"


@dataclass
class NMSparsitySchema(MaskingSchema):
    _target_: str = "distill.callbacks.nm_sparsity.NMSparsity"
    n: int = 2
    m: int = 4
    prune_step: int = 0
    backend: str = "auto"


@dataclass
class HeldMasksSchema(MaskingSchema):
    _target_: str = "distill.callbacks.held_masks.HeldMasks"
    masks_file: str = MISSING
    prefix: str = "student."


@dataclass
class QATSchema(TargetsSchema):
    _target_: str = "distill.callbacks.qat.QuantizationAwareTraining"
    start_step: int = 0


@dataclass
class CalibrationSchema:
    # Training sequences (packed blocks or sentences) whose activations the solvers see.
    samples: int = 64


@dataclass
class SparseGPTSchema:
    block_size: int = 128
    damp: float = 0.01
    hessian_dtype: str = "float32"


@dataclass
class PruneSchema:
    """``python -m distill.prune`` (conf/prune.yaml): one-shot pruning of one model."""

    paths: Any = MISSING
    data: Any = MISSING
    task: Any = MISSING
    task_name: str = "prune"
    seed: int = 0
    model: str = MISSING
    method: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str | None = None
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    calibration: CalibrationSchema = field(default_factory=CalibrationSchema)
    sparsegpt: SparseGPTSchema = field(default_factory=SparseGPTSchema)
    evaluate: bool = True
    device: str = "auto"


@dataclass
class GenerationBenchSchema:
    prompt_tokens: int = 32
    new_tokens: int = 32


@dataclass
class ServeBenchSchema:
    """``python -m distill.serve_bench`` (conf/serve_bench.yaml): serving latency and energy of a run."""

    paths: Any = MISSING
    data: Any = MISSING
    task_name: str = "serve_bench"
    seed: int = 0
    run_dir: str = MISSING
    task: Any = None
    teacher_path: str | None = None
    int8_path: str | None = None
    threads: list[int] = field(default_factory=lambda: [1, 2])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    warmup: int = 3
    repeats: int = 20
    generation: GenerationBenchSchema = field(default_factory=GenerationBenchSchema)


@dataclass
class QuantizeSchema:
    """``python -m distill.quantize`` (conf/quantize.yaml): post-training int8 export for ONNX Runtime."""

    paths: Any = MISSING
    data: Any = MISSING
    task: Any = MISSING
    task_name: str = "quantize"
    seed: int = 0
    model: str = MISSING
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    evaluate: bool = True


@dataclass
class GenerateSchema:
    """``python -m distill.generate`` (conf/generate.yaml): the teacher's responses to a prompt pool."""

    paths: Any = MISSING
    data: Any = MISSING
    task_name: str = "generate"
    seed: int = 0
    model: str = MISSING


_SCHEMAS = {
    ("teacher", "teacher_schema"): TeacherSchema,
    ("student", "from_teacher_schema"): FromTeacherSchema,
    ("student", "from_config_schema"): FromConfigSchema,
    ("student", "pretrained_schema"): PretrainedSchema,
    ("student", "pruned_schema"): PrunedSchema,
    ("task", "classification_schema"): ClassificationTaskSchema,
    ("task", "causal_lm_schema"): CausalLMTaskSchema,
    ("task", "token_classification_schema"): TokenClassificationTaskSchema,
    ("data", "tagged_data_schema"): TaggedDataSchema,
    ("data", "text_data_schema"): TextDataSchema,
    ("data", "prompt_data_schema"): PromptDataSchema,
    ("distill", "distill_schema"): DistillSchema,
    ("data", "data_schema"): DataSchema,
    ("compression_schema", "magnitude_pruning"): MagnitudePruningSchema,
    ("compression_schema", "nm_sparsity"): NMSparsitySchema,
    ("compression_schema", "qat"): QATSchema,
    ("compression_schema", "held_masks"): HeldMasksSchema,
    (None, "prune_schema"): PruneSchema,
    (None, "serve_bench_schema"): ServeBenchSchema,
    (None, "quantize_schema"): QuantizeSchema,
    (None, "generate_schema"): GenerateSchema,
}


def register_schemas() -> None:
    """Make the schemas available to Hydra's defaults lists (idempotent)."""
    store = ConfigStore.instance()
    for (group, name), schema in _SCHEMAS.items():
        store.store(group=group, name=name, node=schema)


def _check_range(name: str, value: float, low: float, high: float, *, open_low: bool = False) -> None:
    too_low = value <= low if open_low else value < low
    if too_low or value > high:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name}={value!r} is outside {bracket}{low}, {high}]")


def unset_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is still ``???`` in an unresolved config container."""
    if isinstance(node, dict):
        return [key for name, value in node.items() for key in unset_keys(value, f"{prefix}{name}.")]
    if isinstance(node, list):
        return [key for i, value in enumerate(node) for key in unset_keys(value, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if node == MISSING else []


def validate(cfg: DictConfig) -> None:
    """Reject out-of-range values that types alone cannot catch, naming the bad value."""
    missing = unset_keys(OmegaConf.to_container(cfg, resolve=False))
    if missing:  # before any stage runs: a `???` found at instantiation would come after the teacher's
        raise ValueError(f"{', '.join(missing)} must be set (the config leaves it `???`), e.g. {missing[0]}=<value>")
    if cfg.distill.temperature <= 0:
        raise ValueError(f"distill.temperature={cfg.distill.temperature!r} must be > 0")
    _check_range("distill.alpha", cfg.distill.alpha, 0.0, 1.0)
    if cfg.distill.teacher_cache not in ("none", "precompute"):
        raise ValueError(f"distill.teacher_cache={cfg.distill.teacher_cache!r} must be 'none' or 'precompute'")
    _check_teacher_cache_topk(cfg)
    if cfg.distill.hidden_weight < 0:
        raise ValueError(f"distill.hidden_weight={cfg.distill.hidden_weight!r} must be >= 0")
    _check_range("distill.warmup_ratio", cfg.distill.warmup_ratio, 0.0, 1.0)
    _check_range("teacher.finetune_settings.warmup_ratio", cfg.teacher.finetune_settings.warmup_ratio, 0.0, 1.0)
    check_divergence_args(cfg.distill.divergence, cfg.distill.beta)
    for length_key in ("max_length", "block_size", "max_prompt_tokens"):
        if length_key in cfg.data and cfg.data[length_key] < 2:
            raise ValueError(f"data.{length_key}={cfg.data[length_key]!r} must be >= 2")
    for key in ("batch_size", "eval_batch_size"):
        if cfg.data[key] < 1:
            raise ValueError(f"data.{key}={cfg.data[key]!r} must be >= 1")
    _check_sharded_compression(cfg)


FSDP_TARGET = "distill.utils.strategies.fsdp"


def _check_sharded_compression(cfg: DictConfig) -> None:
    # The compression callbacks mask and fake-quantize whole weight matrices; FSDP holds only shards.
    compression = sorted(cfg.get("compression") or {})
    if compression and OmegaConf.select(cfg, "trainer.strategy._target_") == FSDP_TARGET:
        raise ValueError(
            f"compression {compression} cannot run under trainer=fsdp, which shards every weight matrix: compress"
            " under trainer=ddp (or ddp_cpu), or distil under fsdp and compress the exported student in a second run"
        )


def _check_teacher_cache_topk(cfg: DictConfig) -> None:
    topk = cfg.distill.teacher_cache_topk
    if cfg.distill.teacher_cache_dtype != "float32" and topk is None:
        raise ValueError(
            f"distill.teacher_cache_dtype={cfg.distill.teacher_cache_dtype!r} needs distill.teacher_cache_topk"
        )
    if topk is None:
        return
    if cfg.distill.teacher_cache != "precompute":
        raise ValueError(f"distill.teacher_cache_topk={topk!r} needs distill.teacher_cache=precompute")
    classes = cfg.data.get("num_labels")  # a vocabulary is only known once the tokenizer loads
    if topk < 1 or (classes is not None and topk > classes):
        raise ValueError(f"distill.teacher_cache_topk={topk!r} must be in [1, data.num_labels={classes}]")
