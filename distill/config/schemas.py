"""Structured-config schemas for the config groups that distill owns, and the checks run before any stage.

Group YAML files list ``<name>_schema`` first in their defaults, so a mistyped key in a preset or on the
command line fails while Hydra composes the config, and types are checked. A component's schema is read
off the signature of the callable its ``_target_`` names (:func:`schema_of`): the keys, types and defaults
are the constructor's own, its nested settings are the dataclasses it takes, so each default is stated
once and the YAML states what differs. The commands without a constructor (``python -m distill.prune``,
``quantize``, ``eval``, ``generate``, ``serve_bench``) have their dataclass here, as their one source.
:func:`validate` runs each component's own range checks on its config node, before any data is loaded.
``register_schemas`` is called by the entry points; nothing registers at import time.
"""

from __future__ import annotations

import collections.abc as abc
import copy
import functools
import inspect
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from enum import Enum
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf

# Every student builder is handed the prepared teacher and the data module; the module, the run's objects.
STUDENT_RUNTIME = ("teacher", "datamodule")
MODULE_RUNTIME = ("student", "teacher", "num_labels", "teacher_logits", "task", "teacher_memo", "on_policy")

# (group, name) -> the `_target_` the schema is read from, the arguments the run passes when it instantiates
# the node (objects, not settings: left out), and schema_of's other options.
DERIVED: dict[tuple[str, str], tuple[str, tuple[str, ...], dict[str, Any]]] = {
    ("teacher", "teacher_schema"): ("distill.models.teacher.prepare_teacher", ("datamodule", "task"), {}),
    ("teacher", "endpoint_schema"): ("distill.models.served_teacher.served_teacher", ("datamodule", "task"), {}),
    ("student", "from_teacher_schema"): ("distill.models.student.from_teacher", STUDENT_RUNTIME, {}),
    ("student", "from_config_schema"): ("distill.models.student.from_config", STUDENT_RUNTIME, {}),
    ("student", "pretrained_schema"): ("distill.models.student.from_pretrained", STUDENT_RUNTIME, {}),
    ("student", "pruned_schema"): (
        "distill.models.student.pruned",
        STUDENT_RUNTIME,
        {"forwards": "distill.pruning.structured.pruned_student"},
    ),
    ("task", "classification_schema"): ("distill.tasks.ClassificationTask", (), {}),
    ("task", "causal_lm_schema"): ("distill.tasks.CausalLMTask", (), {}),
    ("task", "token_classification_schema"): ("distill.tasks.token_classification.TokenClassificationTask", (), {}),
    ("data", "data_schema"): ("distill.data.glue.GlueDataModule", (), {}),
    ("data", "text_data_schema"): ("distill.data.text.TextDataModule", (), {}),
    ("data", "prompt_data_schema"): ("distill.data.prompts.PromptResponseDataModule", (), {}),
    ("data", "chat_data_schema"): ("distill.data.chat.ChatDataModule", (), {}),
    ("data", "tagged_data_schema"): ("distill.data.tagged.TaggedDataModule", (), {}),
    # `distill` also holds the stages' keys (the teacher-logit store, the on-policy sampler): build_module
    # leaves them out of the partial module it instantiates.
    ("distill", "distill_schema"): (
        "distill.modules.distillation.DistillationModule",
        MODULE_RUNTIME,
        {"partial": True, "extra": "distill.pipeline.stages.StageSettings"},
    ),
    ("compression_schema", "magnitude_pruning"): ("distill.callbacks.magnitude_pruning.MagnitudePruning", (), {}),
    ("compression_schema", "nm_sparsity"): ("distill.callbacks.nm_sparsity.NMSparsity", (), {}),
    ("compression_schema", "qat"): ("distill.callbacks.qat.QuantizationAwareTraining", (), {}),
    ("compression_schema", "held_masks"): (
        "distill.callbacks.held_masks.HeldMasks",
        (),
        {"forwards": "distill.callbacks.masking.MaskingCallback"},
    ),
}

_SCALARS = (int, float, bool, str, bytes, Path)
_SEQUENCES = (list, tuple, set, frozenset, abc.Sequence, abc.MutableSequence, abc.Iterable, abc.Collection, abc.Set)
_MAPPINGS = (dict, abc.Mapping, abc.MutableMapping)


def config_type(hint: Any) -> Any:
    """``hint`` as OmegaConf can type a node: ``X | None`` is ``Optional[X]``, sequences are lists, mappings
    dicts; scalars, enums and dataclasses stay; anything else (a model, a data module, a callable) is Any."""
    if hint in _SCALARS or hint is Any or is_dataclass(hint) or (isinstance(hint, type) and issubclass(hint, Enum)):
        return hint
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        members = _not_none(hint)
        inner = config_type(members[0]) if len(members) == 1 else Any
        # typing's Optional: every OmegaConf version reads it.
        return inner if inner is Any else Optional[inner]  # noqa: UP045
    if origin in _SEQUENCES or hint in _SEQUENCES:
        return list[config_type(args[0])] if args else list[Any]
    if origin in _MAPPINGS or hint in _MAPPINGS:
        return dict[config_type(args[0]), config_type(args[1])] if args else dict[str, Any]
    return Any


def _not_none(hint: Any) -> list[Any]:
    """The members of a union but None; ``[hint]`` for anything else."""
    return [arg for arg in get_args(hint) if arg is not NoneType] if get_origin(hint) in (Union, UnionType) else [hint]


def _settings_class(hint: Any) -> type | None:
    """The dataclass a parameter takes (``X`` or ``X | None``): its nested settings."""
    members = _not_none(hint)
    return members[0] if len(members) == 1 and isinstance(members[0], type) and is_dataclass(members[0]) else None


def _annotations(function: Callable) -> dict[str, Any]:
    """Each parameter's annotation, evaluated where ``function`` is defined (Any where it cannot be)."""
    code = function.__init__ if isinstance(function, type) else function
    namespace = getattr(code, "__globals__", {})
    hints = {}
    for name, parameter in inspect.signature(function).parameters.items():
        hint = parameter.annotation
        if isinstance(hint, str):  # `from __future__ import annotations`: evaluated as typing.get_type_hints would
            try:
                hint = eval(hint, namespace)
            except Exception:  # a name imported only for type checkers
                hint = Any
        hints[name] = Any if hint is inspect.Parameter.empty else hint
    return hints


def _schema_field(parameter: inspect.Parameter, hint: Any) -> tuple[str, Any, Any]:
    """A dataclass field for ``parameter``: nested settings get their dataclass's defaults, a parameter
    without a default is ``???``, sequences become lists."""
    default, settings, kind = parameter.default, _settings_class(hint), config_type(hint)
    if settings is not None and (default is None or isinstance(default, settings)):
        factory = settings if default is None else functools.partial(copy.deepcopy, default)
        return parameter.name, settings, field(default_factory=factory)
    if default is inspect.Parameter.empty:
        return parameter.name, kind, field(default=MISSING)
    if isinstance(default, (list, tuple, set, frozenset)):
        return parameter.name, kind, field(default_factory=functools.partial(list, default))
    if isinstance(default, dict):
        return parameter.name, kind, field(default_factory=functools.partial(dict, default))
    return parameter.name, kind, field(default=default)


def _settings_parameters(function: Callable, skip: Iterable[str] = ()) -> list[tuple[inspect.Parameter, Any]]:
    hints, skip = _annotations(function), set(skip)
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [
        (parameter, hints[name])
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind in keyword and name not in skip
    ]


def schema_of(
    target: str,
    runtime: Iterable[str] = (),
    *,
    forwards: str | None = None,
    partial: bool = False,
    extra: str | None = None,
    name: str | None = None,
) -> type:
    """The structured-config dataclass of the callable ``target`` names, read off its signature.

    Args:
        target: the ``_target_`` (a class or a function); its keyword parameters are the keys, their
            annotations (made OmegaConf's) the types, their defaults the defaults; a parameter without a
            default is ``???``, one that takes a settings dataclass (``X | None = None``) a nested node
            with that dataclass's defaults.
        runtime: parameters the run passes at instantiate time (the teacher, the data module, ...): not keys.
        forwards: where ``target`` sends its ``**settings``: that callable's parameters with defaults that
            ``target`` does not name become keys too.
        partial: the node instantiates with ``_partial_: true`` (the run adds ``runtime`` to the partial).
        extra: a dataclass whose fields the node also holds for the run (not ``target``'s: the run removes
            them before instantiating).
        name: the class name (OmegaConf's errors name it).
    """
    runtime = tuple(runtime)
    component = get_object(target)
    parameters = inspect.signature(component).parameters
    unknown = [argument for argument in runtime if argument not in parameters]
    if unknown:
        raise TypeError(f"{target} takes no {unknown}: the runtime arguments must be its parameters")
    settings = _settings_parameters(component, runtime)
    if forwards is not None:
        if not any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
            raise TypeError(f"{target} takes no **settings to forward to {forwards}")
        forwarded = _settings_parameters(get_object(forwards), parameters)
        settings += [(parameter, hint) for parameter, hint in forwarded if parameter.default is not parameter.empty]
    keys = [("_target_", str, field(default=target))]
    keys += [("_partial_", bool, field(default=True))] if partial else []
    keys += [_schema_field(parameter, hint) for parameter, hint in settings]
    extra_class = get_object(extra) if extra is not None else None
    keys += _copied_fields(extra_class) if extra_class is not None else []
    # Not fields: what validate checks a node with (the component's check_settings, the extra's __post_init__).
    namespace = {"builds": component, "extra": extra_class}
    return make_dataclass(name or f"{component.__name__}Schema", keys, namespace=namespace)


def _copied_fields(settings: type) -> list[tuple[str, Any, Any]]:
    """The fields of the dataclass ``settings``, typed for OmegaConf, with its defaults."""
    hints = get_type_hints(settings)
    return [
        (key.name, config_type(hints[key.name]), field(default=key.default, default_factory=key.default_factory))
        for key in fields(settings)
    ]


@dataclass
class CommandSchema:
    """The root keys of every command: its groups (chosen in its YAML), its run folder's name and its seed."""

    paths: Any = MISSING
    data: Any = MISSING
    task_name: str = MISSING
    seed: int = 0


@dataclass
class CalibrationSchema:
    # Training sequences (packed blocks or sentences) whose activations the solvers see.
    samples: int = 64


@dataclass
class SparseGPTSchema:
    block_size: int = 128
    # Fraction of mean(diag H) added to H's diagonal before it is inverted.
    damp: float = 0.01
    hessian_dtype: str = "float32"


@dataclass
class PruneSchema(CommandSchema):
    """``python -m distill.prune`` (conf/prune.yaml): one-shot pruning of one model."""

    task: Any = MISSING
    task_name: str = "prune"
    # A hub id, a save_pretrained folder or a GGUF file (distill/utils/references.py).
    model: str = MISSING
    # sparsegpt, wanda or magnitude.
    method: str = "sparsegpt"
    # Exactly one: unstructured sparsity in [0, 1), or N:M along the input dimension ("2:4", "4:8").
    sparsity: float | None = None
    pattern: str | None = "2:4"
    # Module-name globs of the Linear layers to prune; None = every Linear of the model's blocks
    # (decoder or encoder layers), never the embeddings, the LM head or a classifier.
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    calibration: CalibrationSchema = field(default_factory=CalibrationSchema)
    sparsegpt: SparseGPTSchema = field(default_factory=SparseGPTSchema)
    # Score the model before and after pruning (held-out perplexity / dev accuracy).
    evaluate: bool = True
    # Where pruning and scoring run: auto = the first CUDA GPU if there is one, else the CPU; or cpu, cuda,
    # cuda:1. The saved model and masks are the same either way (up to float rounding in the SparseGPT updates).
    device: str = "auto"


@dataclass
class GenerationBenchSchema:
    prompt_tokens: int = 32
    new_tokens: int = 32


@dataclass
class ServeBenchSchema(CommandSchema):
    """``python -m distill.serve_bench`` (conf/serve_bench.yaml): serving latency and energy of a run."""

    task_name: str = "serve_bench"
    # A run folder with student/ (and student_int8/ after QAT).
    run_dir: str = MISSING
    # The run's task (conf/task/); None = the one in run_dir/.hydra/config.yaml.
    task: Any = None
    # The teacher to compare against: a save_pretrained folder, hub id or (causal LMs) GGUF file; None = none.
    teacher_path: str | None = None
    # An int8 export to serve as student_int8 (a folder with model.onnx, e.g. distill.quantize's model_int8/);
    # None = the run's own student_int8/ (QAT runs), if it has one.
    int8_path: str | None = None
    # Each thread count is measured separately (torch and ONNX Runtime both use that many).
    threads: list[int] = field(default_factory=lambda: [1, 2])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    warmup: int = 3
    repeats: int = 20
    generation: GenerationBenchSchema = field(default_factory=GenerationBenchSchema)
    # Causal LMs: the PyTorch fp32 teacher and student arms (seconds per request on a CPU: an LM frontier of
    # llama.cpp and ONNX Runtime arms can leave them out).
    torch_arms: bool = True
    # Causal LMs: more GGUF files served by llama.cpp, arm name -> file (e.g. the teacher re-exported at f16 or
    # q8_0), beside the teacher's own GGUF (teacher_path) and the run's student_gguf/*.gguf.
    gguf_arms: dict[str, str] = field(default_factory=dict)
    # Causal LMs: each count P adds an arm <arm>/parallel<P> per llama.cpp arm, P requests at once.
    parallel: list[int] = field(default_factory=lambda: [4])
    # Causal LMs: held-out perplexity of every artifact in its own runtime over the first N test blocks; None = all.
    perplexity_blocks: int | None = 16


@dataclass
class QuantizeSchema(CommandSchema):
    """``python -m distill.quantize`` (conf/quantize.yaml): post-training int8 export for ONNX Runtime."""

    task: Any = MISSING
    task_name: str = "quantize"
    # A save_pretrained folder, hub id or GGUF file (distill/utils/references.py).
    model: str = MISSING
    # Module-name globs of the Linear layers to quantize; None = every Linear of the model's blocks (decoder or
    # encoder layers), never the embeddings, the LM head or a classifier: what compression=qat8 targets.
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    evaluate: bool = True


@dataclass
class ExportGGUFSchema(CommandSchema):
    """``python -m distill.export_gguf`` (conf/export_gguf.yaml): GGUF files of a causal LM for llama.cpp."""

    task_name: str = "export_gguf"
    # A save_pretrained folder (a run's student/), hub id or GGUF file (distill/utils/references.py).
    model: str = MISSING
    # llama-quantize's preset names (distill.serve.gguf_types): f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1,
    # q4_k_m, q5_k_m, q6_k. The K-quants need the gguf extra (llama.cpp's own quantizer).
    quant: list[str] = field(default_factory=lambda: ["f16", "q8_0", "q4_1", "q4_k_m"])
    # Where the files go; None = beside the model folder (<run>/student -> <run>/student_gguf/, where
    # distill.serve_bench finds them), or the command's run folder for a hub id or a GGUF file.
    out_dir: str | None = None
    # Check each file in llama.cpp: held-out perplexity on the first `perplexity_blocks` test blocks (None = all),
    # against PyTorch's on the same windows, and greedy tokens of the float presets against PyTorch's.
    check: bool = True
    perplexity_blocks: int | None = None
    prompts: int = 4
    prompt_tokens: int = 32
    new_tokens: int = 32
    threads: int = 2


@dataclass
class GenerateSchema(CommandSchema):
    """``python -m distill.generate`` (conf/generate.yaml): the teacher's responses to a prompt pool."""

    task_name: str = "generate"
    # Sampled responses draw from it (greedy ones do not depend on it): train.yaml's, as the runs that read them.
    seed: int = 42
    # The model that answers (the teacher): a hub id, a save_pretrained folder or a GGUF file.
    model: str = MISSING


@dataclass
class LatencySchema:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    warmup: int = 3
    repeats: int = 20
    # CPU threads torch uses; None = its default.
    threads: int | None = None


@dataclass
class HarnessSchema:
    """``harness`` of train.yaml and eval.yaml: lm-evaluation-harness tasks on saved models (pipeline/harness.py)."""

    # lm-eval task names: registered ones (downloaded online) or those of the YAMLs in include_path. Empty: off.
    tasks: list[str] = field(default_factory=list)
    # A folder of task YAMLs; None = conf/harness_tasks/ (offline tasks over ${DISTILL_DATA_DIR}).
    include_path: str | None = None
    # Documents per task (lm-eval's limit); None = all.
    limit: int | None = None
    batch_size: int = 8
    # Which of the run's models are scored: student (the exported student/), teacher (its resolved folder).
    models: list[str] = field(default_factory=lambda: ["student", "teacher"])

    def __post_init__(self) -> None:
        unknown = sorted(set(self.models) - {"student", "teacher"})
        if unknown:
            raise ValueError(f"models={unknown} unknown: harness.models takes student and teacher")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} must be at least 1, or null for every document")


@dataclass
class EvalSchema(CommandSchema):
    """``python -m distill.eval`` (conf/eval.yaml): dev accuracy, parameter counts and CPU latency of a student."""

    task: Any = MISSING
    task_name: str = "eval"
    # A save_pretrained folder (the run folder's student/) or any HF model id of the task's class.
    student_path: str = MISSING
    latency: LatencySchema = field(default_factory=LatencySchema)
    # Its models: student (student_path) and teacher (teacher_path).
    harness: HarnessSchema = field(default_factory=HarnessSchema)
    # The teacher the harness scores beside the student (a folder, hub id or GGUF file); None = none.
    teacher_path: str | None = None


COMMANDS = {
    "prune_schema": PruneSchema,
    "serve_bench_schema": ServeBenchSchema,
    "quantize_schema": QuantizeSchema,
    "generate_schema": GenerateSchema,
    "export_gguf_schema": ExportGGUFSchema,
    "eval_schema": EvalSchema,
}


def _class_name(name: str) -> str:
    words = "".join(word.title() for word in name.split("_"))
    return words if words.endswith("Schema") else f"{words}Schema"


@functools.cache
def derived_schemas() -> dict[tuple[str, str], type]:
    """The schemas of :data:`DERIVED`, read off their targets' signatures (imports them)."""
    return {
        (group, name): schema_of(target, runtime, name=_class_name(name), **options)
        for (group, name), (target, runtime, options) in DERIVED.items()
    }


def register_schemas() -> None:
    """Make the schemas available to Hydra's defaults lists (idempotent)."""
    store = ConfigStore.instance()
    for (group, name), schema in derived_schemas().items():
        store.store(group=group, name=name, node=schema)
    for name, schema in COMMANDS.items():
        store.store(name=name, node=schema)
    store.store(group="harness", name="harness_schema", node=HarnessSchema)


def unset_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is still ``???`` in an unresolved config container."""
    if isinstance(node, dict):
        return [key for name, value in node.items() for key in unset_keys(value, f"{prefix}{name}.")]
    if isinstance(node, list):
        return [key for i, value in enumerate(node) for key in unset_keys(value, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if node == MISSING else []


def validate(cfg: DictConfig) -> None:
    """Reject, before any stage runs, unset keys and the values each component's own checks refuse."""
    missing = unset_keys(OmegaConf.to_container(cfg, resolve=False))
    if missing:  # before any stage runs: a `???` found at instantiation would come after the teacher's
        raise ValueError(f"{', '.join(missing)} must be set (the config leaves it `???`), e.g. {missing[0]}=<value>")
    check_components(cfg)
    check_teacher_cache_topk(cfg.distill.teacher_cache_topk, cfg.data.get("num_labels"), "data.num_labels")
    _check_sharded_compression(cfg)


def check_components(node: DictConfig, key: str = "") -> None:
    """Run on every structured node under ``node`` the checks of what it configures: the ``check_settings``
    of the component a derived schema builds (its constructor's range checks, without building it), and the
    ``__post_init__`` of a settings dataclass (by building it from the node), nested nodes included."""
    for name, child in node.items_ex(resolve=False):
        if not isinstance(child, DictConfig) or child._is_none() or child._is_missing():
            continue
        path = f"{key}.{name}" if key else str(name)
        for check in _checks_of(child):
            arguments = [argument for argument in inspect.signature(check).parameters if argument in child]
            with _named(path):
                check(**{argument: child[argument] for argument in arguments})
        check_components(child, path)


def _checks_of(node: DictConfig) -> list[Callable[..., Any]]:
    kind = OmegaConf.get_type(node)
    checks = []
    if hasattr(kind, "builds") and node.get("_target_") == kind._target_:  # a node that builds its schema's target
        checks += [getattr(kind.builds, "check_settings", None), kind.extra]
    if is_dataclass(kind) and hasattr(kind, "__post_init__"):  # a settings dataclass
        checks.append(kind)
    return [check for check in checks if check is not None]


_BARE_ARGUMENT = re.compile(r"\w+=")


@contextmanager
def _named(key: str) -> Iterator[None]:
    """A check's message that names a bare argument (``alpha=1.5 is ...``) gets the node's dotted key in front
    (``distill.alpha=1.5 is ...``); one that names its config key already (``data.block_size=...``) is kept."""
    try:
        yield
    except ValueError as error:
        if not _BARE_ARGUMENT.match(str(error)):
            raise
        raise ValueError(f"{key}.{error}") from error


FSDP_TARGET = "distill.utils.strategies.fsdp"


def _check_sharded_compression(cfg: DictConfig) -> None:
    # The compression callbacks mask and fake-quantize whole weight matrices; FSDP holds only shards.
    compression = sorted(cfg.get("compression") or {})
    if compression and OmegaConf.select(cfg, "trainer.strategy._target_") == FSDP_TARGET:
        raise ValueError(
            f"compression {compression} cannot run under trainer=fsdp, which shards every weight matrix: compress"
            " under trainer=ddp (or ddp_cpu), or distil under fsdp and compress the exported student in a second run"
        )


def check_teacher_cache_topk(topk: int | None, classes: int | None, bound: str) -> None:
    """K of a top-K store is at most the ``classes`` (``bound`` names them): a classifier's labels, a causal
    LM's vocabulary (known from the teacher's config: the check phase checks it, distill.pipeline.checks)."""
    if topk is None or classes is None:  # a vocabulary not yet known: the check phase brings it
        return
    if not 1 <= topk <= classes:
        raise ValueError(f"distill.teacher_cache_topk={topk!r} must be in [1, {classes}] ({bound}={classes})")
