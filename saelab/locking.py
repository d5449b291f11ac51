"""An exclusive lock on a folder, so two jobs never write the same output at once.

It is an OS-level `flock`, so it is released when the holder exits or is killed: there are no
stale locks to clean up by hand.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from saelab.errors import SaelabError

LOCK_FILE = ".lock"


@contextmanager
def folder_lock(folder: str | Path, what: str = "job") -> Iterator[None]:
    """Hold `folder/.lock` for the duration; a second holder gets a clear error, not a wait."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_FILE, "a+")
    except OSError as error:  # a path that cannot be a folder here: permissions, a file in the way, read-only
        reason = error.strerror or error
        raise SaelabError(f"cannot write to {folder} ({reason}); choose another output folder") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise SaelabError(
                f"{folder} is in use by another {what} (pid {holder}); wait for it to finish or choose another output"
            ) from None
        try:  # the pid is only for the message above: a full disk must not stop the job here
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
        except OSError:
            pass
        yield
    finally:
        try:
            handle.close()
        except OSError:  # the pid that a full disk kept from being written
            pass
