"""Writes that are all-or-nothing: a file either has its complete new content or its old one.

Everything saelab writes goes to a temporary name in the same folder, is flushed to disk, and
is renamed into place; a kill at any moment leaves no file that looks complete but is not.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from saelab.errors import SaelabError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data`; a full disk raises a SaelabError naming the path and the size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise SaelabError(
                f"no space left on the device writing {path} ({len(data) / 2**20:.1f} MiB needed); "
                "free some space and rerun the same command to continue"
            ) from error
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete the `.name.*.tmp` files a killed writer left behind in `folder`."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
