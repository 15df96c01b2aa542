"""The serving harness: interleaved and warm-up-free timing, energy counters, and the bench over a run folder."""

from __future__ import annotations

import json
import shutil
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import distill.serve_bench as serve_bench_module
from distill.callbacks.qat import fake_quantize
from distill.eval import evaluate
from distill.pipeline.export import float_student
from distill.quantize import quantize
from distill.serve.energy import PowerModelEstimate, RaplEnergy
from distill.serve.latency import Samples, measure, percentile, summarize
from distill.serve.llamacpp import MissingRuntime
from distill.serve.onnx_int8 import export_onnx, save_int8
from distill.serve_bench import markdown, serve_bench


def test_arms_interleave_in_rotating_order_and_warm_up_is_not_recorded() -> None:
    calls: list[str] = []
    arms = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = measure(arms, warmup=2, repeats=3)
    rounds = [calls[index : index + 3] for index in range(0, len(calls), 3)]
    assert len(rounds) == 5 and all(sorted(order) == ["a", "b", "c"] for order in rounds)
    assert [order[0] for order in rounds] == ["a", "b", "c", "a", "b"]  # who goes first rotates
    assert all(len(samples[name].seconds) == 3 for name in "abc")


def test_each_request_is_timed_alone() -> None:
    samples = measure({"slow": lambda: time.sleep(0.02), "fast": lambda: None}, warmup=0, repeats=3)
    assert min(samples["slow"].seconds) >= 0.02 > max(samples["fast"].seconds)


def test_bad_repeat_counts_are_named() -> None:
    with pytest.raises(ValueError, match="repeats=0 must be >= 1"):
        measure({"a": lambda: None}, warmup=0, repeats=0)


def test_summary_percentiles_throughput_and_energy() -> None:
    samples = Samples(seconds=[0.4, 0.1, 0.3, 0.2, 0.5], joules=[0.0, 0.0, 4.0, 0.0, 6.0])
    summary = summarize(samples, requests_per_call=10)
    assert summary["p50_ms"] == pytest.approx(300) and summary["p90_ms"] == pytest.approx(460)
    assert summary["requests_per_s"] == pytest.approx(10 / 0.3)
    # a counter that ticks coarser than a request reads 0 for most: the mean, not the median (0), is the energy
    assert summary["joules_per_1000_requests"] == pytest.approx(2.0 / 10 * 1000)
    assert percentile([1.0], 0.9) == 1.0


def test_rapl_counter_unwraps_at_its_range(tmp_path: Path) -> None:
    domain = tmp_path / "intel-rapl:0"
    domain.mkdir()
    (domain / "max_energy_range_uj").write_text("1000000")
    (domain / "energy_uj").write_text("900000")
    counter = RaplEnergy(root=str(tmp_path))
    before = counter.joules()
    (domain / "energy_uj").write_text("100000")  # wrapped: 0.2 J later
    assert counter.joules() - before == pytest.approx(0.2)
    assert "RAPL" in counter.source


def test_power_model_estimate_scales_with_threads_and_says_it_is_an_estimate() -> None:
    counter = PowerModelEstimate(threads=1, cpu_threads=2, cpu_watts=8.0)
    before = counter.joules()
    time.sleep(0.05)
    assert 0.05 * 4.0 <= counter.joules() - before < 0.5 * 4.0
    assert counter.source.startswith("estimate") and counter.watts == 4.0


@pytest.fixture
def run_dir(tmp_path: Path, tiny_teacher_dir: Path) -> Path:
    """A run folder as a qat8 + nm24 run leaves it: student/, its 2:4 manifest and student_int8/."""
    run = tmp_path / "run"
    shutil.copytree(tiny_teacher_dir, run / "student")
    (run / "student" / "compression.json").write_text(json.dumps({"NMSparsity": {"pattern": "2:4"}}))
    model = AutoModelForSequenceClassification.from_pretrained(run / "student").eval()
    layers = [name for name, _ in model.named_modules() if name.endswith(("query", "key", "value", "dense"))]
    layers = [name for name in layers if ".encoder.layer." in f".{name}"]
    fake_quantize(model, layers)
    tokenizer = AutoTokenizer.from_pretrained(run / "student")
    example = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    plain = float_student(model)
    save_int8(plain, layers, tokenizer, run / "student_int8", partial(export_onnx, plain, dict(example)))
    return run


@pytest.mark.slow
def test_bench_serves_every_artifact_on_the_same_dev_batch(
    compose_train, run_dir, tiny_teacher_dir, data_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[int, set[tuple[str, bytes]]] = {}

    def recording_serve(model, batch):
        seen.setdefault(batch["input_ids"].shape[0], set()).add(
            (type(model).__name__, batch["input_ids"].numpy().tobytes())
        )
        return model(**batch)

    monkeypatch.setattr(serve_bench_module, "serve", recording_serve)
    cfg = compose_train(
        f"run_dir={run_dir}",
        "task=classification",  # the fixture run folder has no .hydra/config.yaml to read it from
        f"teacher_path={tiny_teacher_dir}",
        f"paths.output_dir={run_dir / 'bench'}",
        f"paths.cache_dir={run_dir / 'cache'}",
        f"paths.data_dir={data_dir}",
        "threads=[1]",
        "batch_sizes=[1,4]",
        "warmup=1",
        "repeats=3",
        config_name="serve_bench",
    )
    results = serve_bench(cfg)
    arms = {(row["arm"], row["batch_size"]) for row in results["rows"]}
    assert arms == {(arm, size) for arm in ("teacher_fp32", "student_fp32", "student_int8") for size in (1, 4)}
    assert "need a CUDA GPU" in results["skipped"]["student_2:4_gpu"] and "no CUDA GPU" in results["skipped"]["gpu"]
    assert all(row["p90_ms"] >= row["p50_ms"] > 0 and row["joules_per_1000_requests"] > 0 for row in results["rows"])
    for size, served in seen.items():  # three arms (two model classes), one batch of real sentences per size
        assert len({data for _, data in served}) == 1 and len(served) == 2, size
    table = markdown(results)
    assert "student_int8" in table and "skipped student_2:4_gpu" in table and "energy:" in table


def test_a_run_without_a_student_is_named(compose_train, tmp_path: Path) -> None:
    cfg = compose_train(f"run_dir={tmp_path}", f"paths.output_dir={tmp_path / 'bench'}", config_name="serve_bench")
    with pytest.raises(FileNotFoundError, match=r"run_dir='.*' has no exported student/"):
        serve_bench(cfg)


@pytest.mark.slow
def test_eval_serves_the_int8_export_with_onnx_runtime(compose_train, run_dir, data_dir) -> None:
    results = {}
    for artifact in ("student", "student_int8"):
        cfg = compose_train(
            f"student_path={run_dir / artifact}",
            f"paths.output_dir={run_dir / 'eval'}",
            f"paths.cache_dir={run_dir / 'cache'}",
            f"paths.data_dir={data_dir}",
            "latency.repeats=2",
            config_name="eval",
        )
        results[artifact] = evaluate(cfg)
    assert results["student_int8"]["params"] is None and results["student"]["params"] > 0
    assert abs(results["student_int8"]["val_acc"] - results["student"]["val_acc"]) < 0.05
    assert results["student_int8"]["latency_ms/batch_32"] > 0
    assert results["student_int8"]["int8_arithmetic"] in ("u8s8", "u8u8")
    assert "int8_arithmetic" not in results["student"]


def corpus_overrides(corpus: Path) -> list[str]:
    return [
        "data=shakespeare",
        f"data.data_dir={corpus}",
        "data.pattern=*.txt",
        "data.val_files=[work_3.txt]",
        "data.test_files=[work_4.txt]",
        "data.block_size=16",
    ]


@pytest.mark.slow
def test_post_training_int8_of_a_causal_lm_then_its_decode_bench(
    compose_train, lm_teacher_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(lm_teacher_dir, run / "student")
    report = quantize(
        compose_train(
            f"model={run / 'student'}",
            f"paths.output_dir={tmp_path / 'quantize'}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            *corpus_overrides(corpus)[1:],
            config_name="quantize",
        )
    )
    assert report["layers"] == 4 * 7 and 1 < report["float"]["test_ppl"] < report["int8"]["test_ppl"] * 1.5
    cfg = compose_train(
        f"run_dir={run}",
        "task=causal_lm",
        f"teacher_path={lm_teacher_dir}",
        f"int8_path={tmp_path / 'quantize' / 'model_int8'}",
        f"paths.output_dir={tmp_path / 'bench'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *corpus_overrides(corpus),
        "threads=[1]",
        "warmup=1",
        "repeats=2",
        "generation.prompt_tokens=8",
        "generation.new_tokens=16",  # enough decode steps that the time over prefill is not noise
        config_name="serve_bench",
    )
    rows = {row["arm"]: row for row in serve_bench(cfg)["rows"]}
    assert set(rows) == {"teacher_fp32", "student_fp32", "student_int8"}
    for row in rows.values():
        assert row["decode_tokens_per_s"] > 0 and row["time_to_first_token_ms"] > 0 and row["prompt_tokens"] > 1
    assert {row["runtime"] for row in rows.values()} == {"pytorch", "onnxruntime"}
    # the student is the teacher's copy: one perplexity in PyTorch; its int8 export's through ONNX Runtime
    assert rows["teacher_fp32"]["perplexity"] == pytest.approx(rows["student_fp32"]["perplexity"])
    assert 1 < rows["student_fp32"]["perplexity"] < rows["student_int8"]["perplexity"] * 1.5
    student = AutoModelForCausalLM.from_pretrained(run / "student")
    assert rows["student_fp32"]["artifact_bytes"] == 4 * sum(weight.numel() for weight in student.parameters())
    graph = tmp_path / "quantize" / "model_int8" / "model.onnx"
    assert rows["student_int8"]["artifact_bytes"] == graph.stat().st_size


def test_an_int8_path_without_a_model_is_named(compose_train, run_dir, tmp_path: Path, data_dir) -> None:
    cfg = compose_train(
        f"run_dir={run_dir}",
        "task=classification",  # the fixture run folder has no .hydra/config.yaml to read it from
        f"int8_path={tmp_path}",
        f"paths.output_dir={tmp_path / 'bench'}",
        f"paths.data_dir={data_dir}",
        config_name="serve_bench",
    )
    with pytest.raises(FileNotFoundError, match=r"int8_path='.*' holds no model.onnx"):
        serve_bench(cfg)


def test_int8_gemm_arm_quantizes_the_blocks_and_leaves_the_head() -> None:
    """torchao's int8 x int8 Linear (CPU here, ``torch._int_mm`` on a GPU) on the encoder layers only."""
    from transformers import BertConfig, BertForSequenceClassification

    from distill.serve.gpu_arms import int8_gemm_layers

    config = BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    model = BertForSequenceClassification(config).eval()
    inputs = torch.randint(0, 100, (4, 16))
    with torch.no_grad():
        reference = model(input_ids=inputs).logits
        int8_gemm_layers(model)
        quantized = model(input_ids=inputs).logits
    assert type(model.classifier.weight) is torch.nn.Parameter
    assert "Int8" in type(model.bert.encoder.layer[1].output.dense.weight).__name__
    assert 0 < (quantized - reference).abs().max() < 0.05 * reference.abs().max()


def test_a_gpu_request_ends_when_the_device_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    from distill.serve import gpu_arms

    events: list[str] = []
    monkeypatch.setattr(gpu_arms.torch.cuda, "synchronize", lambda: events.append("synchronize"))
    assert gpu_arms.synchronized(lambda: events.append("launch") or 7)() == 7
    assert events == ["launch", "synchronize"]


def test_without_rapl_or_codecarbon_there_are_no_cpu_energy_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from distill.serve import energy

    real_import = builtins.__import__

    def no_codecarbon(name, *args, **kwargs):
        if name.startswith("codecarbon"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(energy, "RaplEnergy", lambda: (_ for _ in ()).throw(FileNotFoundError("no RAPL")))
    monkeypatch.setattr(builtins, "__import__", no_codecarbon)
    assert energy.cpu_energy(1, 2) is None


def lm_run(lm_teacher_dir: Path, tmp_path: Path, gguf: Path | None = None) -> Path:
    """A causal-LM run folder: the tiny LM as its student/ and, given ``gguf``, that file as its q4_1 GGUF."""
    run = tmp_path / "run"
    shutil.copytree(lm_teacher_dir, run / "student")
    if gguf is not None:
        (run / "student_gguf").mkdir()
        (run / "student_gguf" / "student-q4_1.gguf").symlink_to(gguf)
    return run


def lm_bench(compose_train, run: Path, corpus: Path, tmp_path: Path, *more: str) -> DictConfig:
    """The serve bench of a causal-LM run folder in tiny settings."""
    return compose_train(
        f"run_dir={run}",
        "task=causal_lm",
        f"paths.output_dir={tmp_path / 'bench'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *corpus_overrides(corpus),
        "threads=[1]",
        "warmup=1",
        "repeats=1",
        "generation.prompt_tokens=8",
        "generation.new_tokens=4",
        "perplexity_blocks=2",
        *more,
        config_name="serve_bench",
    )


@pytest.mark.slow
def test_llamacpp_arms_beside_pytorch_each_with_perplexity_through_its_own_runtime(
    compose_train, lm_teacher_dir: Path, smollm2_gguf: Path, corpus: Path, tmp_path: Path
) -> None:
    from distill.serve import llamacpp

    run = lm_run(lm_teacher_dir, tmp_path, gguf=smollm2_gguf)
    more = f"teacher_path={smollm2_gguf}", "parallel=[2]", "torch_arms=false", f"+gguf_arms.extra={smollm2_gguf}"
    cfg = lm_bench(compose_train, run, corpus, tmp_path, *more)
    results = serve_bench(cfg)
    rows = {row["arm"]: row for row in results["rows"]}
    arms = ("teacher_gguf_q4_1", "student_gguf_q4_1", "extra")
    assert set(rows) == {*arms, *(f"{arm}/parallel2" for arm in arms)}
    assert {row["runtime"] for row in rows.values()} == {"llama.cpp"} and "cpu_flags" in results
    written = json.loads(json.dumps(results))  # as serve_bench.json holds it, for the LM frontier
    assert written["reference_arm"] == "teacher_gguf_q4_1" and written["perplexity_blocks"] == 2
    # the same file three times: one perplexity, that of llama.cpp on the bench's first two test blocks
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    blocks = [batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist() for batch in
              list(datamodule.dataloader("test", 1, shuffle=False))[:2]]  # fmt: skip
    expected = llamacpp.perplexity(smollm2_gguf, blocks)
    for row in rows.values():
        assert row["perplexity"] == pytest.approx(expected, rel=1e-4)
        assert row["artifact_bytes"] == smollm2_gguf.stat().st_size and row["threads"] == 1
        assert row["aggregate_tokens_per_s"] > 0 and row["llamacpp_decode_tokens_per_s"] > 0
    single, parallel = rows["extra"], rows["extra/parallel2"]
    assert single["parallel"] == 1 and single["decode_tokens_per_s"] > 0 and single["time_to_first_token_ms"] > 0
    assert parallel["parallel"] == 2 and parallel["decode_tokens_per_s"] is None
    assert "llama.cpp" in markdown(results)


def test_a_gguf_arm_that_is_not_a_file_is_named(compose_train, lm_teacher_dir: Path, corpus, tmp_path) -> None:
    run = lm_run(lm_teacher_dir, tmp_path)
    cfg = lm_bench(compose_train, run, corpus, tmp_path, f"+gguf_arms.f16={tmp_path / 'no.gguf'}")
    with pytest.raises(FileNotFoundError, match=r"gguf_arms.f16='.*no.gguf' is not a file"):
        serve_bench(cfg)


def test_without_the_llamacpp_runtime_a_gguf_arm_says_how_to_install_it(
    compose_train, lm_teacher_dir: Path, corpus, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_xllamacpp(name, *args, **kwargs):
        if name == "xllamacpp":
            raise ImportError("No module named 'xllamacpp'")
        return real_import(name, *args, **kwargs)

    gguf = tmp_path / "student-q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    run = lm_run(lm_teacher_dir, tmp_path)
    cfg = lm_bench(compose_train, run, corpus, tmp_path, f"+gguf_arms.q8={gguf}")
    monkeypatch.setattr(builtins, "__import__", no_xllamacpp)
    with pytest.raises(MissingRuntime, match=r"^llama.cpp runtime not installed \(no xllamacpp\): pip install"):
        serve_bench(cfg)


@pytest.mark.parametrize(
    ("setting", "message"),
    [("parallel=[0]", r"parallel=\[0\] must"), ("perplexity_blocks=0", "perplexity_blocks=0 must")],
)
def test_bad_lm_bench_settings_are_named(compose_train, lm_teacher_dir, corpus, tmp_path, setting, message) -> None:
    cfg = lm_bench(compose_train, lm_run(lm_teacher_dir, tmp_path), corpus, tmp_path, setting)
    with pytest.raises(ValueError, match=message):
        serve_bench(cfg)
