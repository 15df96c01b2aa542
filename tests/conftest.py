"""Shared fixtures: config composition, the real SST-2 files and a tiny random teacher.

Tests that need the offline assets read them from the environment the README's test command
sets (HF_HOME, HF_HUB_OFFLINE, DISTILL_DATA_DIR). Missing assets skip those tests locally and
fail them under CI, where skipping would hide a broken setup.
"""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter. Triton reads this when it is first
# imported (torchao imports it early), so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from distill.config.schemas import register_schemas
from distill.data.glue import GlueDataModule

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
TEACHER_ID = "sentence-transformers/all-MiniLM-L6-v2"


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is missing a test asset: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("DISTILL_DATA_DIR", "data"))
    require((path / "sst2" / "train.tsv").is_file(), f"no SST-2 under {path} (set DISTILL_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The offline causal-LM teacher: $DISTILL_LM_TEACHER, else shared/models beside shared/data."""
    default = Path(os.environ.get("DISTILL_DATA_DIR", "data")).parent / "models" / "SmolLM2-135M-Instruct-Q4_1"
    path = Path(os.environ.get("DISTILL_LM_TEACHER", default / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    require(path.is_file(), f"no SmolLM2 GGUF at {path} (set DISTILL_LM_TEACHER or DISTILL_DATA_DIR)")
    return path.resolve()


@pytest.fixture(scope="session")
def smollm2_tiny_student(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """A random 2-layer Llama with SmolLM2's own tokenizer (read from the GGUF), saved like a hub model: a
    student=pretrained that shares the served teacher's tokenizer and needs none of its weights."""
    from distill.utils.references import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_gguf))
    model = tiny_llama(len(tokenizer), layers=2)
    model.config.max_position_embeddings = 256  # a prompt and its response: up to 128 + 16 tokens in debug=smoke
    path = tmp_path_factory.mktemp("smollm2_tiny_student")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_teacher_available() -> str:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(TEACHER_ID, "config.json")
    require(isinstance(found, str), f"{TEACHER_ID} is not in the HF cache (set HF_HOME, HF_HUB_OFFLINE=1)")
    return TEACHER_ID


@pytest.fixture
def glue_module(hf_teacher_available: str) -> Callable[..., GlueDataModule]:
    """Build SST-2 data modules with the real tokenizer: glue_module(data_dir, cache_dir, **overrides)."""

    def _make(data_dir: Path, cache_dir: Path, **overrides) -> GlueDataModule:
        settings = dict(
            task="sst2",
            text_fields=["sentence"],
            data_dir=str(data_dir),
            cache_dir=str(cache_dir),
            tokenizer=hf_teacher_available,
            num_labels=2,
            batch_size=2,
            eval_batch_size=2,
        )
        return GlueDataModule(**{**settings, **overrides})

    return _make


@pytest.fixture
def compose_train() -> Callable[..., DictConfig]:
    """Compose conf/train.yaml with overrides, as `python -m distill.train` would."""
    register_schemas()

    def _compose(*overrides: str, config_name: str = "train") -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, hf_teacher_available: str) -> Path:
    """A randomly initialised 2-layer BERT with the real teacher's tokenizer, saved like a hub model."""
    from transformers import BertForSequenceClassification

    return save_tiny_bert(BertForSequenceClassification, hf_teacher_available, tmp_path_factory.mktemp("tiny_teacher"))


def save_tiny_bert(model_class: type, tokenizer_id: str, path: Path, num_labels: int = 2, positions: int = 128) -> Path:
    """A random 2-layer BERT of ``model_class`` (a head) with ``tokenizer_id``'s tokenizer, saved in ``path``."""
    from transformers import AutoTokenizer, BertConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_id)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=positions,
        num_labels=num_labels,
    )
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_run_overrides(tmp_path: Path, tiny_teacher_dir: Path, data_dir: Path) -> list[str]:
    """Overrides for a seconds-long distillation run on a slice of real SST-2."""
    return [
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.data_dir={data_dir.resolve()}",  # absolute: some tests run from other folders
        f"teacher.name_or_path={tiny_teacher_dir}",
        "teacher.finetune_settings.max_steps=6",
        "teacher.finetune_settings.lr=1e-3",
        "student.layers=[1]",
        "data.train_limit=192",
        "data.val_limit=64",
        "data.max_length=32",
        "data.augment.copies=1",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "logger=csv",
    ]


WORKS = {
    f"work_{i}.txt": f"Act {i}. " + " ".join(f"Line {j} of the tale of king {i}." for j in range(60)) for i in range(5)
}


def tiny_llama(vocab_size: int, layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def lm_teacher_dir(tmp_path_factory: pytest.TempPathFactory, hf_teacher_available: str) -> Path:
    """A random 4-layer Llama with the offline BERT tokenizer, saved like a hub model."""
    tokenizer = AutoTokenizer.from_pretrained(hf_teacher_available)
    path = tmp_path_factory.mktemp("tiny_lm_teacher")
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, text in WORKS.items():
        (folder / name).write_text(text)
    return folder


VERSE = "\n".join(f"Line {j} of the song of king {{work}}, and the hills sing {j}." for j in range(40))
# A chat template of the ChatML kind SmolLM2 uses, for the BERT tokenizer of the tiny teacher.
CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} [SEP]{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def poems(tmp_path: Path) -> Path:
    folder = tmp_path / "poems"
    folder.mkdir()
    for work in range(5):
        (folder / f"work_{work}.txt").write_text(VERSE.format(work=work) + "\n\n")
    return folder


@pytest.fixture(scope="session")
def chat_teacher_dir(tmp_path_factory: pytest.TempPathFactory, lm_teacher_dir: Path) -> Path:
    """The tiny Llama teacher with a chat template on its tokenizer."""
    path = tmp_path_factory.mktemp("chat_teacher")
    AutoModelForCausalLM.from_pretrained(lm_teacher_dir).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(lm_teacher_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def prune_overrides(tmp_path: Path, lm_teacher_dir: Path, corpus: Path) -> list[str]:
    """`python -m distill.prune` of the tiny Llama on the tiny corpus, in seconds."""
    return [
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"model={lm_teacher_dir}",
        f"data.data_dir={corpus}",
        "data.pattern=*.txt",
        "data.val_files=[work_3.txt]",
        "data.test_files=[work_4.txt]",
        "data.block_size=16",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "calibration.samples=5",
        "sparsegpt.block_size=16",
    ]
