"""Logger factories whose defaults suit batch jobs: nothing ever prompts for input."""

from __future__ import annotations

import logging
import netrc
import os
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)
OFFLINE_MODES = {"offline", "dryrun", "disabled"}


def wandb_api_key_available() -> bool:
    """True if W&B has credentials: WANDB_API_KEY or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(
    project: str, save_dir: str, name: str | None = None, group: str | None = None, tags: list[str] | None = None
) -> WandbLogger:
    """A WandbLogger that goes offline (and says so once) when no API key is configured."""
    if "WANDB_MODE" not in os.environ and not wandb_api_key_available():
        # Set for the whole process, so sweep jobs and DDP ranks inherit it and the notice appears once.
        os.environ["WANDB_MODE"] = "offline"
        log.warning(
            "W&B: no API key (WANDB_API_KEY or ~/.netrc), logging offline under %s; "
            "upload later with `wandb sync <run dir>`.",
            save_dir,
        )
    offline = os.environ.get("WANDB_MODE", "") in OFFLINE_MODES
    return WandbLogger(
        project=project, name=name, save_dir=save_dir, group=group, tags=list(tags or []), offline=offline
    )
