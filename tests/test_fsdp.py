"""trainer=fsdp on two CPU processes (gloo): torch's FSDP2 shards the student and the frozen teacher,
and a sharded run reaches the figures of a data-parallel one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoModelForCausalLM

from distill.config.schemas import validate
from distill.modules.distillation import DistillationModule
from distill.modules.frozen_teacher import FrozenTeacher
from distill.serve.generation import Generator, SamplingSettings
from distill.utils.sharding import is_sharded, shard, unsharded
from distill.utils.strategies import fsdp
from tests.conftest import tiny_llama
from tests.test_causal_lm import tiny_run
from tests.test_prompts import tiny_recipe_run

REPO = Path(__file__).resolve().parents[1]
VOCAB = 97


def sharded_checks(rank: int, folder: Path) -> None:
    """One rank of the two: sharded student and teacher against their unsharded copies."""
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    student, reference = tiny_llama(VOCAB, layers=2, seed=3), tiny_llama(VOCAB, layers=2, seed=3)
    teacher, teacher_reference = FrozenTeacher(tiny_llama(VOCAB, seed=4)), tiny_llama(VOCAB, seed=4)
    shard(student, mesh)
    teacher.shard(mesh)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(rank))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        teacher_nll = [teacher.memoized(inputs, lambda out: out.logits.sum(), "nll") for _ in range(2)]
        same_logits = torch.allclose(student(**inputs).logits, reference(**inputs).logits, atol=1e-6)
    # The ranks' prompts and budgets differ: the sharded ranks must step together to the longest.
    settings = SamplingSettings(max_new_tokens=2 + 7 * rank)
    prompts = [ids[0, : 3 + 2 * rank].tolist()]
    responses = Generator(student, settings, 0, {VOCAB - 1})(prompts)
    gathered = unsharded(student)
    torch.save(
        {
            "student_rows": student.model.layers[0].mlp.up_proj.weight.to_local().shape[0],
            "teacher_rows": teacher.model.model.layers[0].mlp.up_proj.weight.to_local().shape[0],
            "same_logits": same_logits,
            "teacher_nll": [float(value) for value in teacher_nll],
            "teacher_reference_nll": float(teacher_reference(**inputs).logits.sum()),
            "memo": len(teacher._memo),
            "same_responses": responses == Generator(reference, settings, 0, {VOCAB - 1})(prompts),
            "unsharded": None
            if gathered is None
            else (type(gathered).__name__, {k: v.clone() for k, v in gathered.state_dict().items()}),
            "reference": reference.state_dict(),
        },
        folder / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


@pytest.mark.distributed
def test_sharded_models_answer_as_the_whole_ones(tmp_path: Path) -> None:
    mp.spawn(sharded_checks, args=(tmp_path,), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for result in ranks:
        assert result["student_rows"] == 32 and result["teacher_rows"] == 32  # each rank holds half of 64 rows
        assert result["same_logits"] and result["same_responses"]
        assert result["teacher_nll"][0] == pytest.approx(result["teacher_reference_nll"], rel=1e-5)
        assert result["teacher_nll"][1] == result["teacher_nll"][0] and result["memo"] == 0  # every call runs
    name, state = ranks[0]["unsharded"]
    assert ranks[1]["unsharded"] is None and name == "LlamaForCausalLM"
    assert state.keys() == ranks[0]["reference"].keys()
    assert all(torch.equal(value, ranks[0]["reference"][key]) for key, value in state.items())


def test_fsdp_preset_sizes_its_mesh_and_refuses_compression(compose_train) -> None:
    cfg = compose_train("experiment=smollm2_to_small", "trainer=fsdp", "trainer.devices=4", "trainer.num_nodes=2")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (8, 1)
    assert not strategy._save_distributed_checkpoint  # whole checkpoints: a student loads without FSDP
    with pytest.raises(ValueError, match=r"trainer.devices='auto': trainer=fsdp needs a positive number"):
        fsdp("auto")
    cfg = compose_train("experiment=smollm2_to_small", "trainer=fsdp_cpu", "compression=nm24_qat8")
    with pytest.raises(ValueError, match=r"compression \['nm_sparsity', 'qat'\] cannot run under trainer=fsdp"):
        validate(cfg)


def run_cli(folder: Path, trainer: str, overrides: list[str]) -> dict:
    """``python -m distill.train`` in its own process: Lightning launches the second rank itself."""
    command = [sys.executable, "-m", "distill.train", *overrides, f"trainer={trainer}", f"paths.output_dir={folder}"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.distributed
def test_fsdp_run_matches_ddp(lm_teacher_dir: Path, corpus: Path, tmp_path: Path) -> None:
    """experiment=smollm2_to_small's pipeline (pruned student, top-K store, distil, test the best
    checkpoint, export) sharded over two ranks reaches the data-parallel run's figures."""
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    overrides = ["experiment=smollm2_to_small", cache, *tiny_run(lm_teacher_dir, corpus)]
    ddp = run_cli(tmp_path / "ddp", "ddp_cpu", overrides)
    sharded = run_cli(tmp_path / "fsdp", "fsdp_cpu", overrides)
    for key in ("student/test_ppl", "teacher/test_ppl", "student_before_fit/ppl"):
        assert sharded[key] == pytest.approx(ddp[key], rel=1e-5), key
    for key in ("student/params", "student/nonzero_params", "student/trained_tokens", "global_step"):
        assert sharded[key] == ddp[key], key
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "last.ckpt"
    from_checkpoint = DistillationModule.load_student(str(checkpoint))  # whole, without FSDP or the teacher
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "student")
    assert not is_sharded(from_checkpoint) and type(from_checkpoint) is type(exported)
    exported_state = exported.state_dict()
    assert all(torch.equal(value, exported_state[key]) for key, value in from_checkpoint.state_dict().items())


@pytest.mark.distributed
def test_fsdp_on_policy_run_matches_ddp(chat_teacher_dir: Path, poems: Path, tmp_path: Path) -> None:
    """The live sharded teacher grades the sharded student's own samples, every step (λ = 1)."""
    overrides = [
        *tiny_recipe_run(chat_teacher_dir, poems, tmp_path),
        "recipe=onpolicy",
        "distill.teacher_cache_topk=8",
        "distill.on_policy.probability=1.0",
    ]
    overrides = [item for item in overrides if not item.startswith("paths.output_dir=")]
    ddp = run_cli(tmp_path / "ddp", "ddp_cpu", overrides)
    sharded = run_cli(tmp_path / "fsdp", "fsdp_cpu", overrides)
    assert sharded["onpolicy/batches"] == sharded["global_step"] == ddp["global_step"]
    assert sharded["onpolicy/sampled_tokens"] == ddp["onpolicy/sampled_tokens"]
    for key in ("student/test_ppl", "student/corpus_test_ppl", "student/rougeL"):
        assert math.isfinite(sharded[key]) and sharded[key] == pytest.approx(ddp[key], rel=1e-5), key
