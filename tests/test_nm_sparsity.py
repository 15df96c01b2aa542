"""NMSparsity: ASP's recipe with the native and the apex backend, eligibility, checkpoint interop."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from distill.callbacks import nm_sparsity
from distill.callbacks.nm_sparsity import NMSparsity
from distill.kernels.sparsity import is_nm_sparse, nm_mask
from tests.callback_helpers import ENCODER, batches, make_trainer, masks_of, tiny_module


def fit(tmp_path: Path, callback: NMSparsity, max_steps: int = 4, ckpt_path=None, checkpoints: bool = False):
    module = tiny_module()
    extra = [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=2)] if checkpoints else []
    trainer = make_trainer(tmp_path, [callback, *extra], max_steps, enable_checkpointing=checkpoints)
    trainer.fit(module, train_dataloaders=batches(), ckpt_path=ckpt_path)
    return module


def test_native_masks_are_set_at_prune_step_and_held(tmp_path: Path) -> None:
    callback = NMSparsity(prune_step=2, backend="native", include=[ENCODER])
    module = fit(tmp_path, callback)
    assert len(callback.masks) == 12
    for name, mask in callback.masks.items():
        weight = module.get_parameter(name)
        assert is_nm_sparse(weight) and not weight[~mask].any() and int(mask.sum()) * 2 == mask.numel()


def test_ineligible_layers_are_skipped_with_a_log_or_refused_when_named(tmp_path: Path, caplog) -> None:
    callback = NMSparsity(backend="native", include=["student.*"])
    with caplog.at_level(logging.WARNING):
        fit(tmp_path, callback, max_steps=1)
    assert "student.classifier.weight" in caplog.text and "student.classifier.weight" not in callback.masks
    with pytest.raises(ValueError, match=r"ineligible shapes: \{'student.classifier.weight': \(3, 16\)\}"):
        fit(tmp_path, NMSparsity(backend="native", include=["student.classifier"]), max_steps=1)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"n": 4, "m": 4}, "N=4, M=4"), ({"backend": "cuda"}, "backend='cuda'")]
)
def test_bad_settings_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NMSparsity(**kwargs)


def test_apex_backend_needs_apex(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nm_sparsity, "load_asp", lambda: None)
    with pytest.raises(RuntimeError, match=r"backend='apex' needs apex\.contrib\.sparsity"):
        fit(tmp_path, NMSparsity(backend="apex", include=[ENCODER]), max_steps=1)


class FakeASP:
    """Records calls and behaves like apex's process-global ASP class for m4n2_1d."""

    calls: list[str] = []
    _ASP__model = None
    _ASP__optimizer = None
    _ASP__sparse_parameters: list = []

    @classmethod
    def init_model_for_pruning(cls, model, mask_calculator, allowed_layer_names, allow_permutation, **kwargs):
        assert cls._ASP__model is None, "ASP allows one model per process"
        assert mask_calculator == "m4n2_1d" and allow_permutation is False
        cls.calls.append("init_model")
        cls._ASP__model = model
        for name in allowed_layer_names:
            module = model.get_submodule(name)
            mask = torch.ones_like(module.weight, dtype=torch.bool)
            module.register_buffer("__weight_mma_mask", mask)
            cls._ASP__sparse_parameters.append((name, module, "weight", module.weight, mask, None))

    @classmethod
    def init_optimizer_for_pruning(cls, optimizer) -> None:
        cls.calls.append("init_optimizer")
        cls._ASP__optimizer = optimizer

    @classmethod
    def compute_sparse_masks(cls) -> None:
        cls.calls.append("compute")
        with torch.no_grad():
            for _, _, _, param, mask, _ in cls._ASP__sparse_parameters:
                mask.copy_(nm_mask(param))
                param.mul_(mask)


@pytest.fixture
def fake_apex(monkeypatch: pytest.MonkeyPatch) -> type[FakeASP]:
    sparsity = types.ModuleType("apex.contrib.sparsity")
    sparsity.ASP = FakeASP
    FakeASP.calls, FakeASP._ASP__model, FakeASP._ASP__sparse_parameters = [], None, []
    for name, module in (("apex", types.ModuleType("apex")), ("apex.contrib", types.ModuleType("apex.contrib"))):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "apex.contrib.sparsity", sparsity)
    monkeypatch.setattr(nm_sparsity, "cuda_available", lambda: True)
    return FakeASP


def test_apex_backend_is_picked_and_matches_native(tmp_path: Path, fake_apex) -> None:
    callback = NMSparsity(prune_step=1, backend="auto", include=[ENCODER])
    module = fit(tmp_path / "apex", callback, checkpoints=True)
    assert callback.backend == "apex" and fake_apex.calls == ["init_model", "init_optimizer", "compute"]
    assert fake_apex._ASP__model is None and fake_apex._ASP__sparse_parameters == []  # reset at teardown
    assert not [name for name, _ in module.named_buffers() if "mma_mask" in name]
    checkpoint = torch.load(tmp_path / "apex" / "ckpt" / "epoch=1-step=4.ckpt", weights_only=False)
    asp_keys = [key for key in checkpoint["state_dict"] if key.endswith("__weight_mma_mask")]
    assert len(asp_keys) == 12

    native = NMSparsity(prune_step=1, backend="native", include=[ENCODER])
    fit(tmp_path / "native", native)
    assert all(torch.equal(mask, native.masks[name]) for name, mask in masks_of(callback).items())


def test_an_asp_checkpoint_resumes_natively_and_back(tmp_path: Path, fake_apex, monkeypatch) -> None:
    apex_run = NMSparsity(prune_step=1, backend="apex", include=[ENCODER])
    fit(tmp_path / "apex", apex_run, checkpoints=True)
    checkpoint_path = tmp_path / "apex" / "ckpt" / "epoch=0-step=2.ckpt"
    # As ASP alone would leave it: masks only as buffers, no callback state.
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    checkpoint["callbacks"] = {}
    torch.save(checkpoint, tmp_path / "asp_only.ckpt")

    native = NMSparsity(prune_step=1, backend="native", include=[ENCODER])
    fit(tmp_path / "native", native, max_steps=6, ckpt_path=tmp_path / "asp_only.ckpt")
    expected = torch.load(checkpoint_path, weights_only=False)["state_dict"]
    for name, mask in native.masks.items():
        assert torch.equal(mask, expected[name.replace(".weight", ".__weight_mma_mask")]), name

    fit(tmp_path / "native2", NMSparsity(prune_step=1, backend="native", include=[ENCODER]), checkpoints=True)
    native_checkpoint = tmp_path / "native2" / "ckpt" / "epoch=0-step=2.ckpt"
    back = NMSparsity(prune_step=1, backend="apex", include=[ENCODER])
    calls_before = len(fake_apex.calls)
    fit(tmp_path / "back", back, max_steps=6, ckpt_path=native_checkpoint)
    assert fake_apex.calls[calls_before:] == ["init_model", "init_optimizer"] and back.masks  # restored, not recomputed
    assert all(is_nm_sparse(mask.float()) for mask in back.masks.values())


def test_checkpoint_with_other_n_m_is_refused() -> None:
    with pytest.raises(ValueError, match="checkpoint holds 1:4 masks, this run asks 2:4"):
        NMSparsity().load_state_dict({"n": 1, "m": 4, "masks": {}})
