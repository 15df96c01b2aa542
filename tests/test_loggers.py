"""The W&B logger never needs a login: without credentials it goes offline and says so once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from distill.utils.loggers import wandb_logger


@pytest.fixture
def no_wandb_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc


def test_offline_without_api_key_and_warns_once(no_wandb_credentials, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="distill.utils.loggers"):
        first = wandb_logger(project="p", save_dir=str(tmp_path))
        second = wandb_logger(project="p", save_dir=str(tmp_path))
    assert first._offline and second._offline
    assert caplog.text.count("logging offline") == 1


def test_online_when_a_key_is_configured(no_wandb_credentials, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert not wandb_logger(project="p", save_dir=str(tmp_path))._offline


def test_a_run_without_the_wandb_logger_ends_without_wandb_installed(monkeypatch) -> None:
    """logger=csv on a machine without wandb (a lent GPU image): the run's last step must not import it."""
    import sys

    from distill.train import finish_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    finish_wandb()
