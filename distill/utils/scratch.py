"""Writing a cache entry whole or not at all: a ``<name>.tmp-<host>-<pid>`` sibling, renamed into place.

A failed write removes its scratch (it would otherwise stay forever: no later run writes that pid's
name), and a full or read-only disk is reported with the path and the setting that moves the cache.
Scratch left by a process that died without cleaning up (a kill -9, a lost node) is removed by
:func:`remove_stale_scratch`, which the check phase runs on every start: at once where its process was
on this host and is gone, after a day where it was on another host sharing the cache (whose processes
this host cannot see, and whose stages may write for hours).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
CACHE_SETTING = "set paths.cache_dir=<folder> (or DISTILL_CACHE_DIR) to a writable disk with room"
# A full disk, a read-only one, no permission, an exhausted quota: the cache's folder is the problem.
FOLDER_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
# <host>-<pid>; a bare <pid> is the name earlier versions wrote, whose host is unknown.
SCRATCH = re.compile(r"\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")
OTHER_HOST_STALE_AFTER_S = 24 * 3600


def scratch_of(target: Path) -> Path:
    return target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")


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


def is_stale(path: Path, now: float) -> bool:
    match = SCRATCH.search(path.name)
    if match is None:
        return False
    if match["host"] == socket.gethostname():
        return not pid_alive(int(match["pid"]))
    return now - path.lstat().st_mtime > OTHER_HOST_STALE_AFTER_S


def remove_stale_scratch(folder: Path, now: float | None = None) -> list[Path]:
    """Remove the ``*.tmp-*`` entries under ``folder`` (one level of subfolders) no process is writing any more;
    returns them."""
    now = time.time() if now is None else now
    removed = []
    for path in [*folder.glob("*.tmp-*"), *folder.glob("*/*.tmp-*")]:
        try:
            if not is_stale(path, now):
                continue
            remove(path)
        except OSError:  # gone already, or a read-only cache: the check of the folder says so
            continue
        removed.append(path)
    if removed:
        log.info("Removed %d unfinished cache entries of dead processes under %s", len(removed), folder)
    return removed
