"""Structured pruning: scores pick the weakest parts, surgery keeps shapes, logits and parameter counts right."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config

from distill.pruning.scores import ImportanceScores, calibration_scores
from distill.pruning.shape import FFN_MULTIPLE, PrunedShape, choose_shape, shape_params
from distill.pruning.structured import decoder_layer_params, kept_indices, prune, pruned_student
from distill.utils.references import load_causal_lm, load_tokenizer
from tests.conftest import require

SIZES = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
CONFIGS = {
    "llama-tied": lambda: LlamaConfig(**SIZES, tie_word_embeddings=True),
    "llama-untied-biases": lambda: LlamaConfig(**SIZES, tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
    "qwen2": lambda: Qwen2Config(**SIZES, tie_word_embeddings=False),
}


def tiny_model(family: str = "llama-tied", seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]())
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # norms and biases: not all ones / zeros, so slicing them is visible
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def calibration(seed: int = 1, batches: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(batches):
        input_ids = torch.randint(0, SIZES["vocab_size"], (2, 16), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, 11:] = 0  # right padding, as a collator would leave it
        result.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return result


@torch.no_grad()
def logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits


@pytest.fixture(scope="module")
def scored() -> dict[str, tuple[PreTrainedModel, ImportanceScores]]:
    models = {family: tiny_model(family) for family in CONFIGS}
    return {family: (model, calibration_scores(model, calibration())) for family, model in models.items()}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_keeping_everything_reproduces_the_teacher_and_leaves_it_untouched(scored, family: str) -> None:
    teacher, scores = scored[family]
    before = {name: param.clone() for name, param in teacher.state_dict().items()}
    student = prune(teacher, PrunedShape.of(teacher.config), scores)
    batch = calibration(seed=7)[0]
    assert torch.equal(logits(student, batch), logits(teacher, batch))
    assert all(torch.equal(before[name], param) for name, param in teacher.state_dict().items())
    assert teacher.config.num_hidden_layers == SIZES["num_hidden_layers"]


SHAPES = [
    {"num_layers": 2},
    {"intermediate_size": 64},
    {"num_key_value_heads": 1},
    {"hidden_size": 48},
    {"num_layers": 3, "hidden_size": 32, "intermediate_size": 96, "num_attention_heads": 2},
]


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("sizes", SHAPES, ids=lambda sizes: "-".join(sizes))
def test_each_axis_gives_the_requested_shape_and_parameter_count(scored, family: str, sizes: dict) -> None:
    teacher, scores = scored[family]
    shape = choose_shape(teacher.config, shape=sizes)
    for name, value in sizes.items():
        assert getattr(shape, name) == value
    student = prune(teacher, shape, scores)
    assert PrunedShape.of(student.config) == shape
    assert student.config.head_dim == 16
    assert len(student.model.layers) == shape.num_layers
    attention, mlp = student.model.layers[0].self_attn, student.model.layers[0].mlp
    assert attention.q_proj.weight.shape == (shape.num_attention_heads * 16, shape.hidden_size)
    assert attention.k_proj.weight.shape == (shape.num_key_value_heads * 16, shape.hidden_size)
    assert mlp.down_proj.weight.shape == (shape.hidden_size, shape.intermediate_size)
    assert student.num_parameters() == shape_params(teacher.config, shape)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == list(range(shape.num_layers))
    assert torch.isfinite(logits(student, calibration()[0])).all()


@pytest.mark.parametrize("family", list(CONFIGS))
def test_save_and_reload_gives_identical_logits(scored, family: str, tmp_path: Path) -> None:
    teacher, scores = scored[family]
    shape = choose_shape(teacher.config, shape=SHAPES[-1])
    student = prune(teacher, shape, scores)
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    batch = calibration(seed=3)[1]
    assert type(reloaded) is type(teacher)
    assert torch.equal(logits(reloaded, batch), logits(student, batch))
    tied = reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert tied == teacher.config.tie_word_embeddings == (student.lm_head.weight is student.model.embed_tokens.weight)


@pytest.mark.parametrize("axes", [["width"], ["hidden", "heads"]])
def test_width_pruned_nine_head_model_saves_and_reloads(tmp_path: Path, axes: list[str]) -> None:
    """SmolLM2's 9 heads: the hidden width must stay a multiple of the head count, or transformers
    refuses to save the student (hidden 384 with 9 heads did, after a whole run)."""
    torch.manual_seed(0)
    config = LlamaConfig(**(SIZES | dict(hidden_size=144, num_attention_heads=9, num_key_value_heads=3)))
    teacher = AutoModelForCausalLM.from_config(config).eval()
    shape = choose_shape(config, target_params=int(teacher.num_parameters() * 0.6), axes=axes)
    assert shape.hidden_size < 144 and shape.hidden_size % shape.num_attention_heads == 0
    student = prune(teacher, shape, calibration_scores(teacher, calibration()))
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.hidden_size == shape.hidden_size
    assert torch.equal(logits(reloaded, calibration()[0]), logits(student, calibration()[0]))


def one_step_larger(shape: PrunedShape, teacher: PrunedShape, axis: str) -> PrunedShape:
    """Written apart from the code under test: the next size along ``axis`` at its documented granularity."""
    steps = {
        "depth": {"num_layers": shape.num_layers + 1},
        "ffn": {"intermediate_size": shape.intermediate_size + FFN_MULTIPLE},
        "hidden": {"hidden_size": shape.hidden_size + math.lcm(8, shape.num_attention_heads)},
        "heads": {
            "num_key_value_heads": shape.num_key_value_heads + 1,
            "num_attention_heads": shape.num_attention_heads + 2,
        },
    }
    bigger = replace(shape, **steps[axis])
    fits = all(value <= limit for value, limit in zip(asdict(bigger).values(), asdict(teacher).values(), strict=True))
    return bigger if fits and bigger.hidden_size % bigger.num_attention_heads == 0 else None


@pytest.mark.parametrize("family", ["llama-tied", "llama-untied-biases"])
@pytest.mark.parametrize(
    ("axes", "fraction"),
    [
        (["depth"], 0.6),
        (["ffn"], 0.8),
        (["heads"], 0.9),
        (["width"], 0.5),
        (["width"], 0.6),
        (["hidden", "heads"], 0.9),
        (["depth", "width"], 0.6),
        (["depth", "width", "heads"], 0.45),
    ],
)
def test_target_is_met_as_closely_as_the_rounding_allows(scored, family: str, axes: list[str], fraction: float) -> None:
    teacher, scores = scored[family]
    target = int(teacher.num_parameters() * fraction)
    shape = choose_shape(teacher.config, target_params=target, axes=axes)
    student = prune(teacher, shape, scores)
    assert student.num_parameters() == shape_params(teacher.config, shape) <= target
    expanded = {"width": ["ffn", "hidden"]}
    for axis in [name for given in axes for name in expanded.get(given, [given])]:
        bigger = one_step_larger(shape, PrunedShape.of(teacher.config), axis)
        assert bigger is None or shape_params(teacher.config, bigger) > target, axis
    untouched = {
        "depth": "num_layers",
        "hidden": "hidden_size",
        "ffn": "intermediate_size",
        "heads": "num_key_value_heads",
    }
    for axis, name in untouched.items():
        if axis not in axes and not (axis in ("ffn", "hidden") and "width" in axes):
            assert getattr(shape, name) == getattr(PrunedShape.of(teacher.config), name)


def test_shape_params_counts_like_the_real_model(scored) -> None:
    for family, (teacher, _) in scored.items():
        assert shape_params(teacher.config, PrunedShape.of(teacher.config)) == teacher.num_parameters(), family
    teacher = scored["llama-tied"][0]
    embeddings_and_norm = SIZES["vocab_size"] * 64 + 64
    assert teacher.num_parameters() == embeddings_and_norm + decoder_layer_params(teacher)


def test_dead_ffn_channel_kv_group_and_hidden_channel_are_the_ones_removed() -> None:
    teacher = tiny_model()
    with torch.no_grad():
        layer = teacher.model.layers[1]
        layer.mlp.gate_proj.weight[37].zero_()  # act(0) * up = 0 for every token
        layer.self_attn.v_proj.weight[16:32].zero_()  # KV group 1: its two query heads output 0
        for norm in [teacher.model.norm, *(n for block in teacher.model.layers for n in block.children())]:
            if "Norm" in type(norm).__name__:
                norm.weight[[5, 9]] = 0.0  # hidden channels 5 and 9 are 0 after every norm
    scores = calibration_scores(teacher, calibration(), measure_nll=False)
    assert scores.ffn[1, 37] == 0 and (scores.ffn[1, :37] > 0).all()
    assert torch.equal(scores.heads[1, 2:], torch.zeros(2)) and (scores.heads[1, :2] > 0).all()
    assert scores.hidden[[5, 9]].count_nonzero() == 0 and scores.hidden.count_nonzero() == 62
    shape = PrunedShape(4, 62, 127, 2, 1)
    kept = kept_indices(teacher.config, shape, scores)
    assert 37 not in kept.ffn[1].tolist() and kept.kv_groups[1].tolist() == [0]
    assert kept.hidden.tolist() == [c for c in range(64) if c not in (5, 9)]
    student = prune(teacher, shape, scores)
    expected_gate = teacher.model.layers[1].mlp.gate_proj.weight[kept.ffn[1]][:, kept.hidden]
    assert torch.equal(student.model.layers[1].mlp.gate_proj.weight, expected_gate)
    assert torch.equal(
        student.model.layers[1].self_attn.v_proj.weight,
        teacher.model.layers[1].self_attn.v_proj.weight[:16, kept.hidden],
    )


def test_removing_dead_kv_groups_and_ffn_channels_keeps_the_function() -> None:
    teacher = tiny_model()
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.self_attn.v_proj.weight[:16].zero_()  # KV group 0 and its query heads 0, 1 output 0
            layer.mlp.up_proj.weight[[3, 90]] = 0.0
    scores = calibration_scores(teacher, calibration(), measure_nll=False)
    student = prune(
        teacher, choose_shape(teacher.config, shape={"num_key_value_heads": 1, "intermediate_size": 126}), scores
    )
    for layer, pruned in zip(teacher.model.layers, student.model.layers, strict=True):
        assert torch.equal(pruned.self_attn.q_proj.weight, layer.self_attn.q_proj.weight[32:])
        assert torch.equal(pruned.self_attn.o_proj.weight, layer.self_attn.o_proj.weight[:, 32:])
    batch = calibration(seed=5)[0]
    assert torch.allclose(logits(student, batch), logits(teacher, batch), atol=1e-5)


def memorising_model() -> tuple[PreTrainedModel, list[dict[str, torch.Tensor]]]:
    """A tiny model trained to fit its calibration data, so skipping any working layer raises the loss."""
    model, batches = tiny_model().train(), calibration(batches=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        model(**batches[0], labels=batches[0]["input_ids"]).loss.backward()
        optimizer.step()
    return model.eval(), batches


def test_an_identity_layer_scores_lowest_and_is_dropped_first() -> None:
    model, batches = memorising_model()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()  # both residual branches add 0: the identity
    scores = calibration_scores(model, batches)
    assert scores.nll_increase[2] == 0 and (scores.nll_increase[[0, 1, 3]] > 1e-3).all()
    assert scores.block_influence.argmin() == 2 and scores.block_influence[2] < 1e-5
    for layer_score in ("nll", "block_influence", "bi"):
        student = prune(model, replace(PrunedShape.of(model.config), num_layers=3), scores, layer_score=layer_score)
        batch = batches[0]
        assert torch.allclose(logits(student, batch), logits(model, batch), atol=1e-5)


def test_pruned_student_is_trainable_and_reports_its_choices(tmp_path: Path) -> None:
    teacher = tiny_model("llama-untied-biases")
    target = teacher.num_parameters() - decoder_layer_params(teacher) // 2
    report_path = tmp_path / "reports" / "pruning.json"
    student = pruned_student(teacher, calibration(), target_params=target, axes=["depth"], report_path=str(report_path))
    assert student.training and all(param.requires_grad for param in student.parameters())
    assert not teacher.training and student.config.num_hidden_layers == 2
    report = json.loads(report_path.read_text())
    assert report["params"]["student_total"] == student.num_parameters() <= target
    assert report["params"]["student_decoder_layers"] * 2 <= report["params"]["teacher_decoder_layers"]
    assert len(report["depth_scores"]["nll_increase"]) == len(report["depth_scores"]["block_influence"]) == 4
    ranked = sorted(range(4), key=lambda index: -report["depth_scores"]["nll_increase"][index])
    assert report["kept_layers"] == sorted(ranked[:2])
    assert report["student_shape"]["num_layers"] == 2 and report["teacher_shape"]["num_layers"] == 4
    assert report["width"]["ffn"]["kept_per_layer"] == [128, 128]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"target_params": 10**9}, r"student.target_params=1000000000 exceeds the teacher's \d+"),
        ({"target_params": 1000, "axes": ["depth"]}, "student.target_params=1000 is below"),
        ({"target_params": "half"}, "student.target_params='half' must be a number"),
        ({"target_params": 10**5, "axes": ["layers"]}, r"student.axes=\['layers'\]"),
        ({"shape": {"num_layers": 5}}, r"student.shape.num_layers=5 must be an integer in \[1, 4\]"),
        ({"shape": {"num_layers": 0}}, "student.shape.num_layers=0"),
        ({"shape": {"num_key_value_heads": 3}}, "student.shape.num_key_value_heads=3"),
        (
            {"shape": {"num_attention_heads": 3}},
            "student.shape.num_attention_heads=3 must be 2 x num_key_value_heads=1",
        ),
        ({"shape": {"num_attention_heads": 2, "num_key_value_heads": 2}}, "num_attention_heads=2 must be 2 x"),
        ({"shape": {"hidden_size": 62}}, "student.shape.hidden_size=62 must be a multiple of num_attention_heads=4"),
        ({"shape": {"depth": 2}}, r"unknown fields \['depth'\]"),
        ({}, "student.target_params and student.shape are both null"),
        ({"target_params": 10**5, "shape": {"num_layers": 2}}, "e.g. add student.target_params=null"),
    ],
)
def test_bad_shapes_and_targets_raise_naming_the_value(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_shape(CONFIGS["llama-tied"](), **arguments)


def test_bad_layer_score_and_mismatched_scores_raise(scored) -> None:
    teacher, scores = scored["llama-tied"]
    with pytest.raises(ValueError, match=r"student\.layer_score='ppl'"):
        pruned_student(teacher, calibration(), shape={"num_layers": 2}, layer_score="ppl")
    other = scored["qwen2"][1]
    narrow = replace(other, ffn=other.ffn[:, :64])
    with pytest.raises(ValueError, match=r"scores of \(hidden, ffn, heads\)=\(64, 64, 4\)"):
        prune(teacher, PrunedShape.of(teacher.config), narrow)
    with pytest.raises(ValueError, match=r"student\.shape\.hidden_size=65"):
        prune(teacher, PrunedShape(4, 65, 128, 4, 2), scores)


def shakespeare_batches(tokenizer, count: int, length: int) -> list[dict[str, torch.Tensor]]:
    plays = sorted((Path(os.environ.get("DISTILL_DATA_DIR", "data")) / "shakespeare").glob("*_gut.txt"))
    require(bool(plays), "no Shakespeare text under DISTILL_DATA_DIR")
    text = plays[0].read_text(encoding="utf-8")[20_000:40_000]  # past the Gutenberg header
    input_ids = torch.tensor(tokenizer(text).input_ids[: count * length]).reshape(count, 1, length)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in input_ids]


@pytest.mark.slow
def test_real_smollm2_pruned_to_half_its_decoder_layers_by_depth(smollm2_gguf: Path) -> None:
    tokenizer = load_tokenizer(str(smollm2_gguf))
    batches = shakespeare_batches(tokenizer, count=2, length=64)
    teacher = load_causal_lm(str(smollm2_gguf))
    teacher_decoder = decoder_layer_params(teacher)
    target = teacher.num_parameters() - teacher_decoder // 2
    student = pruned_student(teacher, batches, target_params=target, axes=["depth"])
    assert decoder_layer_params(student) * 2 <= teacher_decoder
    assert student.num_parameters() <= target and student.config.num_hidden_layers == 15
    with torch.no_grad():
        losses = [student.eval()(**batch, labels=batch["input_ids"]).loss for batch in batches]
    assert all(torch.isfinite(loss) for loss in losses)


def test_width_pruning_keeps_every_layer_and_skips_the_layer_skip_scores(tmp_path: Path) -> None:
    """The default layer_score (nll) with width axes: no layer is dropped, so no layer-skip pass is needed."""
    teacher = tiny_model("llama-untied-biases")
    target = teacher.num_parameters() * 3 // 4
    report_path = tmp_path / "pruning.json"
    student = pruned_student(teacher, calibration(), target_params=target, axes=["width"], report_path=str(report_path))
    assert student.config.num_hidden_layers == teacher.config.num_hidden_layers
    assert student.num_parameters() <= target
    report = json.loads(report_path.read_text())
    assert report["depth_scores"]["nll_increase"] is None and report["kept_layers"] == [0, 1, 2, 3]


class CalibrationOnly:
    """The data-module surface a pruned student needs: prepare_data and calibration batches."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def prepare_data(self) -> None:
        pass

    def calibration_dataloader(self) -> list[dict[str, torch.Tensor]]:
        return self.batches


def test_pruned_students_are_cached_by_teacher_calibration_and_settings(tmp_path: Path, monkeypatch) -> None:
    """A second run with the same teacher, calibration tokens and settings loads the cut instead of
    re-measuring; other calibration tokens or another target prune again; no cache prunes every time."""
    import distill.pruning.structured as structured
    from distill.models.student import pruned
    from distill.models.teacher import Teacher
    from distill.tasks import CausalLMTask

    calls, original = [], structured.pruned_student
    monkeypatch.setattr(structured, "pruned_student", lambda *args, **kw: calls.append(1) or original(*args, **kw))
    teacher = Teacher(model=tiny_model("llama-untied-biases"), path="tiny", task=CausalLMTask())
    target = teacher.model.num_parameters() - decoder_layer_params(teacher.model) // 2

    def build(seed: int, run: str, cache: Path | None = tmp_path / "students", **extra) -> PreTrainedModel:
        report = tmp_path / run / "pruning.json"
        data = CalibrationOnly(calibration(seed))
        settings = dict(target_params=target, axes=["depth"], report_path=str(report), cache_dir=cache) | extra
        return pruned(teacher, data, calibration_batches=2, **settings)

    first, again = build(1, "a"), build(1, "b")
    assert len(calls) == 1 and again.training and all(param.requires_grad for param in again.parameters())
    assert all(torch.equal(x, y) for x, y in zip(first.state_dict().values(), again.state_dict().values(), strict=True))
    assert (tmp_path / "a" / "pruning.json").read_text() == (tmp_path / "b" / "pruning.json").read_text()
    build(2, "c")
    build(1, "d", target_params=target * 9 // 10, axes=["width"])
    assert len(calls) == 3 and sum(path.is_dir() for path in (tmp_path / "students").iterdir()) == 3
    build(1, "e", cache=None)
    assert len(calls) == 4


def test_a_hidden_width_the_heads_must_divide_is_chosen_and_said(caplog: pytest.LogCaptureFixture) -> None:
    """With 3 heads the hidden width moves in steps of 24 (multiples of 8 and of 3), and the log says why."""
    config = LlamaConfig(**{**SIZES, "hidden_size": 96, "num_attention_heads": 3, "num_key_value_heads": 3})
    with caplog.at_level("INFO", logger="distill.pruning.shape"):
        shape = choose_shape(
            config, target_params=int(0.7 * shape_params(config, PrunedShape.of(config))), axes=["hidden"]
        )
    assert shape.hidden_size % 24 == 0 and shape.hidden_size < 96
    assert f"hidden_size={shape.hidden_size}: the hidden width moves in steps of 24" in caplog.text
