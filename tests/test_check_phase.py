"""The check phase (distill/pipeline/checks.py): settings, paths and the cache refused in seconds, in one line
naming the value and the fix, before any long stage; failed cache writes leave no scratch or lock behind."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.pipeline.checks import check_cache, check_run
from distill.prune import prune
from distill.stores.teacher_logits import TeacherLogitStore, load_or_build
from distill.utils.references import converted_path, resolve
from distill.utils.scratch import OTHER_HOST_STALE_AFTER_S, remove_stale_scratch, written_whole

ROOT = Path(__file__).resolve().parents[1]
FAST_S = 20
HALF = ["student.target_params=null", "student.shape.num_layers=2"]  # a shape the tiny teacher can give


def litter(folder: Path) -> list[Path]:
    return [*folder.rglob("*.tmp-*"), *folder.rglob("*.lock")]


def run_cli(module: str, *overrides: str, cache: Path) -> tuple[str, float]:
    """``python -m <module> overrides``, expected to fail: its last error line and its wall time."""
    env = os.environ | {"DISTILL_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", module, *overrides, f"hydra.run.dir={cache.parent / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    assert done.returncode != 0, done.stdout[-2000:]
    errors = [line for line in done.stderr.splitlines() if "Error:" in line]
    return (errors[-1] if errors else done.stderr[-2000:]), elapsed


@pytest.fixture
def prune_settings(tmp_path: Path, lm_teacher_dir: Path) -> list[str]:
    return [f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}", f"model={lm_teacher_dir}"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["pattern=2:3"],
            r"sparsegpt.block_size=128 must be a multiple of M=3 \(pattern=2:3\): set sparsegpt.block_size",
        ),
        (["pattern=3:5", "sparsegpt.block_size=125"], r"input width \(32\) to be a multiple of 5: choose an M"),
        (["sparsity=0.5"], r"sparsity=0.5 and pattern='2:4' are both set: give one, e.g. sparsity=0.5 pattern=null"),
        (["method=wanda", "include=[nothing.*]"], r"include pattern 'nothing.\*' matches no Linear layer"),
    ],
)
def test_prune_settings_fail_before_the_model_loads(
    compose_train, prune_settings, overrides, message, tmp_path
) -> None:
    cfg = compose_train(*prune_settings, *overrides, config_name="prune")
    started = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        prune(cfg)
    assert time.perf_counter() - started < FAST_S
    assert not (tmp_path / "run" / "model").exists()


@pytest.fixture
def lm_run(tmp_path: Path, lm_teacher_dir: Path) -> list[str]:
    """The causal-LM experiment on the tiny 4-layer Llama; nothing here loads it."""
    return [
        "experiment=smollm2_to_small",
        f"teacher.name_or_path={lm_teacher_dir}",
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["student.shape.num_layers=0"],
            r"student.shape=\{'num_layers': 0\} are both set: .*student.target_params=null",
        ),
        (["student.shape.num_layers=0", "student.target_params=null"], r"num_layers=0 must be an integer in \[1, 4\]"),
        (["student.target_params=10"], r"student.target_params=10 is below"),
        ([*HALF, "distill.teacher_cache_topk=0"], r"teacher_cache_topk=0 must be in \[1, \d+\] \(the teacher.s vocab"),
        (["teacher.name_or_path=/nowhere/teacher.gguf"], r"teacher.name_or_path='/nowhere/teacher.gguf': GGUF file"),
        ([*HALF, "data.train_limit_blocks=1000000000"], r"cache folder .* MiB free; this run's stores need about"),
    ],
)
def test_train_settings_fail_in_the_check_phase(compose_train, lm_run, overrides, message) -> None:
    cfg = compose_train(*lm_run, *overrides)
    started = time.perf_counter()
    with pytest.raises((ValueError, OSError), match=message):
        check_run(cfg)
    assert time.perf_counter() - started < FAST_S


def test_an_unwritable_cache_is_named_with_the_setting_that_moves_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match=rf"cache folder {blocker / 'cache'} is not writable .*paths.cache_dir=.*"):
        check_cache(blocker / "cache")
    with pytest.raises(OSError, match=r"MiB free; this run's stores need about .*DISTILL_CACHE_DIR"):
        check_cache(tmp_path, needed_bytes=1 << 60)


def test_a_full_disk_during_a_store_write_names_the_entry_and_leaves_no_scratch(tmp_path: Path, monkeypatch) -> None:
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("distill.stores.teacher_logits.save_file", full)
    path = tmp_path / "teacher_logits" / "sst2-key.safetensors"
    path.parent.mkdir()
    with pytest.raises(OSError, match=rf"cannot write cache entry {path} \(No space left on device\): set paths.cache"):
        load_or_build(TeacherLogitStore, path, {"num_examples": "2"}, lambda **_: {"logits": torch.zeros(2, 2)})
    assert list(path.parent.glob("*.tmp-*")) == []


def test_a_failed_write_removes_its_scratch(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    with pytest.raises(RuntimeError), written_whole(target) as scratch:
        scratch.mkdir()
        (scratch / "half").write_text("x")
        raise RuntimeError("the build failed")
    assert not target.exists() and litter(tmp_path) == []


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_scratch_of_dead_processes_is_removed_on_the_next_start(tmp_path: Path) -> None:
    host = socket.gethostname()
    names = [f"{host}-{dead_pid()}", f"{host}-{os.getpid()}", f"other-node-{os.getpid()}", f"other-node-1{os.getpid()}"]
    dead, alive, other_host, other_host_old = (tmp_path / "models" / f"m.tmp-{name}" for name in names)
    for path in (dead, alive, other_host, other_host_old):
        path.mkdir(parents=True)
    old = time.time() - 2 * OTHER_HOST_STALE_AFTER_S
    os.utime(other_host_old, (old, old))
    check_cache(tmp_path)
    # Another host's process cannot be seen from here: its scratch goes only once nothing touched it for a day.
    assert not dead.exists() and not other_host_old.exists() and alive.exists() and other_host.exists()
    assert remove_stale_scratch(tmp_path, now=time.time() + 2 * OTHER_HOST_STALE_AFTER_S) == [other_host]


@pytest.fixture
def truncated_gguf(tmp_path: Path, smollm2_gguf: Path) -> Path:
    path = tmp_path / "models" / "cut.gguf"
    path.parent.mkdir()
    with smollm2_gguf.open("rb") as source:
        path.write_bytes(source.read(50_000_000))
    return path


def test_a_truncated_gguf_is_named_and_leaves_no_lock(truncated_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    started = time.perf_counter()
    with pytest.raises(
        ValueError, match=rf"GGUF file '{truncated_gguf}' is truncated or corrupt .* download or export"
    ):
        resolve(str(truncated_gguf), cache_dir=cache)
    assert time.perf_counter() - started < FAST_S
    assert not cache.exists() or litter(cache) == []


def test_a_gguf_already_de_quantized_is_checked_from_its_copy_without_parsing_it_again(
    smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import LlamaConfig

    from distill.pipeline import checks

    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path))
    parsed = []
    monkeypatch.setattr(checks, "gguf_elements", parsed.append)
    checks.model_config("teacher.name_or_path", str(smollm2_gguf))  # no copy yet: the file itself is read
    assert parsed == [smollm2_gguf]
    copy = converted_path(smollm2_gguf, "bfloat16")
    LlamaConfig(num_hidden_layers=3, vocab_size=49152).save_pretrained(copy)
    config = checks.model_config("teacher.name_or_path", str(smollm2_gguf))
    assert parsed == [smollm2_gguf] and config.num_hidden_layers == 3  # the copy's config, the file not parsed


def test_cli_truncated_gguf_fails_fast_in_one_line(truncated_gguf: Path, tmp_path: Path) -> None:
    line, elapsed = run_cli("distill.export_gguf", f"model={truncated_gguf}", cache=tmp_path / "cache")
    assert f"model='{truncated_gguf}': GGUF file '{truncated_gguf}' is truncated or corrupt" in line
    assert elapsed < FAST_S and litter(tmp_path / "cache") == []


def test_cli_eval_of_a_missing_student_names_the_path(tmp_path: Path) -> None:
    line, elapsed = run_cli("distill.eval", f"student_path={tmp_path / 'nowhere'}", cache=tmp_path / "cache")
    assert f"student_path='{tmp_path / 'nowhere'}' is no folder" in line and "repo" not in line
    assert elapsed < FAST_S


def test_cli_prune_block_size_fails_before_loading(tmp_path: Path, lm_teacher_dir: Path) -> None:
    cache = tmp_path / "cache"
    line, elapsed = run_cli("distill.prune", f"model={lm_teacher_dir}", "pattern=2:3", cache=cache)
    assert "sparsegpt.block_size=128 must be a multiple of M=3 (pattern=2:3)" in line
    assert elapsed < FAST_S
