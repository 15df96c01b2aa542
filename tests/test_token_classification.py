"""A third task through the same train(): token classification on synthetic tagged sentences, tiny models.

It touches only its own task file (distill/tasks/token_classification.py), data module
(distill/data/tagged.py) and YAML (conf/task/token_classification.yaml, conf/data/tagged.yaml), registered
in distill/config/schemas.py: the module, stages, stores and export serve it as they serve the others.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForTokenClassification, BertForTokenClassification

from distill.config.schemas import validate
from distill.data.tagged import TaggedDataModule, read_tagged
from distill.tasks.classification import accuracy
from distill.tasks.token_classification import TokenClassificationTask
from distill.train import train
from tests.conftest import save_tiny_bert

TAGS = ["O", "NAME", "NUM"]
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank"]
WORDS = ["the", "cat", "saw", "a", "dog", "on", "day", "and", "ran", "home", "with"]


def sentence(rng: random.Random) -> dict[str, list[str]]:
    words = [rng.choice(WORDS + NAMES + ["7", "42", "1999"]) for _ in range(rng.randint(4, 10))]
    tags = ["NAME" if word in NAMES else "NUM" if word.isdigit() else "O" for word in words]
    return {"tokens": words, "tags": tags}


@pytest.fixture
def tagged_dir(tmp_path: Path) -> Path:
    rng = random.Random(0)
    folder = tmp_path / "data" / "tags"
    folder.mkdir(parents=True)
    for file, count in (("train.jsonl", 256), ("dev.jsonl", 48)):
        (folder / file).write_text("".join(json.dumps(sentence(rng)) + "\n" for _ in range(count)))
    return tmp_path / "data"


@pytest.fixture
def tagger_dir(tmp_path: Path, hf_teacher_available: str) -> Path:
    """A random 2-layer BERT tagger with the offline teacher's tokenizer, saved like a hub model."""
    torch.manual_seed(0)
    return save_tiny_bert(BertForTokenClassification, hf_teacher_available, tmp_path / "tagger", len(TAGS), 64)


def test_tags_go_to_first_subwords_and_bad_lines_are_named(tagged_dir: Path, tagger_dir: Path) -> None:
    data = TaggedDataModule("tags", TAGS, str(tagged_dir), str(tagger_dir), max_length=16)
    data.setup("fit")
    row = data.splits["train"][0]
    words = read_tagged(tagged_dir / "tags" / "train.jsonl", TAGS)[0]
    counted = row["labels"][row["labels"] != -100].tolist()
    assert counted == words["tags"][: len(counted)] and row["labels"][0] == -100  # [CLS] is not a word
    bad = tagged_dir / "tags" / "bad.jsonl"
    bad.write_text('{"tokens": ["a", "b"], "tags": ["O"]}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1 needs 'tokens' and 'tags'"):
        read_tagged(bad, TAGS)
    bad.write_text('{"tokens": ["a"], "tags": ["VERB"]}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1 has tags \['VERB'\] outside data.label_names"):
        read_tagged(bad, TAGS)
    with pytest.raises(ValueError, match=r"data.max_length=16 exceeds the model's 8 positions"):
        data.check_context(8)


def test_bad_tagged_settings_fail_when_the_config_is_checked(compose_train) -> None:
    cfg = compose_train("task=token_classification", "data=tagged", "data.name=tags", "data.label_names=[O,O]")
    with pytest.raises(ValueError, match=r"^data.label_names=\['O', 'O'\] must be distinct tags"):
        validate(cfg)
    with pytest.raises(ValueError, match=r"^data.max_length=1 must be >= 2"):
        validate(
            compose_train(
                "task=token_classification", "data=tagged", "data.name=t", "data.label_names=[O]", "data.max_length=1"
            )
        )


@pytest.mark.slow
def test_a_third_task_trains_tests_and_exports_through_train(
    compose_train, tagged_dir: Path, tagger_dir: Path, tmp_path: Path
) -> None:
    cfg = compose_train(
        "task=token_classification",
        "data=tagged",
        "data.name=tags",
        f"data.label_names=[{','.join(TAGS)}]",
        "data.max_length=24",
        f"paths.data_dir={tagged_dir}",
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"teacher.name_or_path={tagger_dir}",
        "teacher.finetune_settings.max_steps=40",
        "teacher.finetune_settings.batch_size=16",
        "teacher.finetune_settings.lr=3e-3",
        "student.layers=[1]",
        "distill.optimizer.lr=3e-3",
        "trainer.max_steps=16",
        "trainer.val_check_interval=8",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "logger=csv",
    )
    metrics = train(cfg)
    run = tmp_path / "run"
    # O is 57 % of the dev words: 90 % means the tags were learnt, not guessed (both reach 100 % here).
    assert metrics["teacher/finetune_val_acc"] > 0.9 and metrics["student/val_acc"] > 0.9
    assert metrics["student/params"] < metrics["teacher/params"] and metrics["global_step"] == 16
    assert json.loads((run / "metrics.json").read_text())["student/val_acc"] == metrics["student/val_acc"]
    exported = AutoModelForTokenClassification.from_pretrained(run / "student")
    assert exported.config.num_hidden_layers == 1 and exported.config.id2label == dict(enumerate(TAGS))
    data = TaggedDataModule("tags", TAGS, str(tagged_dir), str(run / "student"), max_length=24)
    data.setup("validate")
    assert accuracy(exported.eval(), data) == pytest.approx(metrics["student/val_acc"], abs=1e-6)
    assert TokenClassificationTask(TAGS).score(exported, data)["val_acc"] == accuracy(exported, data)
