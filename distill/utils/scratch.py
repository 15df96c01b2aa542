"""Writing a cache entry whole or not at all: a ``<name>.tmp-<pid>`` sibling, renamed into place.

A failed write removes its scratch (it would otherwise stay forever: no later run writes that pid's
name), and a full or read-only disk is reported with the path and the setting that moves the cache.
Scratch left by a process that died without cleaning up (a kill -9, a lost node) is removed by
:func:`remove_stale_scratch`, which the check phase runs on every start.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
CACHE_SETTING = "set paths.cache_dir=<folder> (or DISTILL_CACHE_DIR) to a writable disk with room"
# A full disk, a read-only one, no permission, an exhausted quota: the cache's folder is the problem.
FOLDER_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
SCRATCH = re.compile(r"\.tmp-(\d+)$")
# Another host sharing the cache may be writing a scratch whose pid means nothing here: only old ones go.
STALE_AFTER_S = 600


def scratch_of(target: Path) -> Path:
    return target.with_name(f"{target.name}.tmp-{os.getpid()}")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def written_whole(target: Path) -> Iterator[Path]:
    """A scratch path for the block to write; renamed onto ``target`` when the block ends, removed if it fails."""
    scratch = scratch_of(target)
    remove(scratch)  # a pid's earlier scratch, from a process that died before cleaning up
    try:
        yield scratch
        os.replace(scratch, target)
    except OSError as error:
        raise with_path(error, target) from error
    finally:
        remove(scratch)


def with_path(error: OSError, target: Path) -> OSError:
    """``error`` as one line naming the entry and the setting to change, if the folder is at fault."""
    if error.errno not in FOLDER_ERRORS:
        return error
    reason = os.strerror(error.errno)
    return OSError(error.errno, f"cannot write cache entry {target} ({reason}): {CACHE_SETTING}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_scratch(folder: Path, now: float | None = None) -> list[Path]:
    """Remove ``*.tmp-<pid>`` entries under ``folder`` (one level of subfolders) of dead pids; returns them."""
    now = time.time() if now is None else now
    removed = []
    for path in [*folder.glob("*.tmp-*"), *folder.glob("*/*.tmp-*")]:
        match = SCRATCH.search(path.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        try:
            if now - path.lstat().st_mtime < STALE_AFTER_S:
                continue
            remove(path)
        except OSError:  # gone already, or a read-only cache: the check of the folder says so
            continue
        removed.append(path)
    if removed:
        log.info("Removed %d unfinished cache entries of dead processes under %s", len(removed), folder)
    return removed
