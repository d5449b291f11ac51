"""Writes that are all-or-nothing: a file either has its complete new content or its old one.

Everything saelab writes goes to a temporary name in the same folder, is flushed to disk, and
is renamed into place; a kill at any moment leaves no file that looks complete but is not.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from saelab.errors import SaelabError

_UMASK = os.umask(0)
os.umask(_UMASK)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` says the disk (or the user's quota) is full."""
    return isinstance(error, OSError) and error.errno in _DISK_FULL


class DiskFullError(SaelabError):
    """The one message for a full disk: the file, the space it needed, and what to do. It keeps the
    file, so a caller that knows more (how much is still to be written) can say so in its own."""

    def __init__(self, path: str | Path, needed: str) -> None:
        super().__init__(
            f"no space left on the device writing {path} ({needed}); free some space and rerun the same command "
            "to continue"
        )
        self.path = Path(path)


def size_text(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 / 10 else f"{n_bytes:,} bytes"


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data`; a full disk raises a SaelabError naming the path and the size."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if is_disk_full(error):
            raise DiskFullError(path, f"{size_text(len(data))} needed") from error
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete the `.name.*.tmp` files a killed writer left behind in `folder`."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


@contextmanager
def removed_on_failure(folder: str | Path, created: bool, has_results: Callable[[Path], bool]) -> Iterator[None]:
    """If the block fails and `folder` was `created` by this job (it did not exist before) but holds no
    results yet (`has_results(folder)` is false), delete it: a bad model name, hook or batch size found
    after the folder was made leaves no half-made output behind. Enter it inside the folder's lock, so it
    never deletes a folder another job is writing."""
    try:
        yield
    except BaseException:
        folder = Path(folder)
        if created and folder.is_dir() and not has_results(folder):
            shutil.rmtree(folder, ignore_errors=True)
        raise
