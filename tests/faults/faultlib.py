"""Fault injection for the fault suite: the real CLI in a subprocess, SIGKILL at a seeded moment, a disk
that fills up, and digests of what each stage wrote (to compare a faulted run with an uninterrupted one)."""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

REPO = Path(__file__).resolve().parents[2]
# Timing columns: the only values of a run's files that depend on the clock, not on the data.
CLOCK_KEYS = ("tokens_per_s", "pass_seconds", "tokens_per_second", "created")


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `python -m saelab` subprocess: this worktree's code first, one thread, no hub."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "saelab", *args]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m saelab ARGS…` to the end."""
    return subprocess.run(cli_command(*args), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command(*args), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def one_line_error(result: subprocess.CompletedProcess | tuple[int, str]) -> str:
    """The CLI failed as it should on bad input: exit 2, exactly one line on stderr, no traceback."""
    code, stderr = (result.returncode, result.stderr) if hasattr(result, "returncode") else result
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ---- SIGKILL at a seeded moment ------------------------------------------------------------------------


@dataclass
class Kill:
    """Where a SIGKILL landed: after `delay` s past the first sign of work; `state` describes the files then."""

    what: str  # what the kill waited for
    delay: float
    state: str
    finished_first: bool = False  # the process ended before the kill (the kill landed after the work)


def kill_during(
    process: subprocess.Popen,
    what: str,
    started: Callable[[], bool],
    delay: float,
    describe: Callable[[], str],
    timeout: float = 180,
) -> Kill:
    """Wait until `started()` (work is under way: a shard listed, a checkpoint, a temporary file), then
    `delay` seconds (drawn from a seeded generator by the caller), then SIGKILL. `describe()` records what
    was on disk at the kill."""
    deadline = time.monotonic() + timeout
    while not started():
        if process.poll() is not None:
            raise AssertionError(f"the job ended before its work began: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the job did not start its work in time")
        time.sleep(0.002)
    time.sleep(delay)
    state = describe()
    finished = process.poll() is not None
    if not finished:
        os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    if not finished:
        assert process.returncode == -signal.SIGKILL
    return Kill(what, delay, state, finished)


# ---- digests: what a run wrote, minus the clock ----------------------------------------------------------


def tensors_digest(path: Path) -> dict[str, str]:
    """sha256 of each tensor's bytes (and its dtype and shape) in a safetensors file."""
    tensors = safetensors.torch.load_file(path)
    return {name: _tensor_sha(tensor) for name, tensor in sorted(tensors.items())}


def _tensor_sha(tensor: torch.Tensor) -> str:
    tensor = tensor.detach().cpu().reshape(-1).contiguous()
    raw = tensor.view(torch.uint8) if tensor.dtype != torch.bool else tensor.to(torch.uint8)
    return hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode() + raw.numpy().tobytes()).hexdigest()


def store_digest(store: Path) -> dict[str, object]:
    """The store's manifest (shard checksums included) and every shard's tensors, hashed."""
    manifest = json.loads((store / "manifest.json").read_text())
    manifest.pop("versions")  # platform strings; equal anyway within one machine
    shards = {record["file"]: tensors_digest(store / record["file"]) for record in manifest["shards"]}
    return {"manifest": manifest, "shards": shards}


def state_digest(value: object) -> object:
    """A checkpoint's nested state with every tensor replaced by its hash."""
    if isinstance(value, torch.Tensor):
        return _tensor_sha(value)
    if isinstance(value, dict):
        return {str(k): state_digest(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [state_digest(v) for v in value]
    return value


def run_digest(run: Path) -> dict[str, object]:
    """A training run: each SAE's tensors and cfg.json, the last checkpoint's state, the summary (without
    the SAEs' paths) and the metrics (without the timing columns)."""
    from saelab.train.checkpoint import complete_checkpoints, load_checkpoint

    saes = {}
    for folder in sorted((run / "saes").iterdir()):
        saes[folder.name] = {
            "weights": tensors_digest(folder / "sae_weights.safetensors"),
            "cfg": json.loads((folder / "cfg.json").read_text()),
        }
        if (folder / "saelab_buffers.safetensors").exists():
            saes[folder.name]["buffers"] = tensors_digest(folder / "saelab_buffers.safetensors")
    last = complete_checkpoints(run)[-1]
    metrics = [_without_clock(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        "saes": saes,
        "checkpoint": (last.name, state_digest(load_checkpoint(last))),
        "summary": {label: _without(r, "path") for label, r in json.loads((run / "summary.json").read_text()).items()},
        "metrics": metrics,
    }


def feature_store_digest(path: Path) -> dict[str, object]:
    """Every table of a feature store, row by row, hashed; `meta` without its timing entries and the run's path."""
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        digest: dict[str, object] = {}
        for table in sorted(tables):
            rows = connection.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            if table == "meta":
                digest[table] = {k: json.loads(v) for k, v in rows if k not in (*CLOCK_KEYS, "run")}
            else:
                digest[table] = (len(rows), hashlib.sha256(repr(rows).encode()).hexdigest())
        return digest
    finally:
        connection.close()


def _without_clock(record: dict) -> dict:
    return _without(record, *CLOCK_KEYS)


def _without(record: dict, *keys: str) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


# ---- a disk that fills up ----------------------------------------------------------------------------------


class FullDisk:
    """Writes under `root` succeed until `capacity` bytes in all have been written there; the write that
    crosses it writes what still fits and raises OSError(ENOSPC), as a full file system does. SQLite
    databases opened under `root` get `max_page_count` set from what is left, so they fail with
    SQLITE_FULL ("database or disk is full"), as SQLite does on a full disk."""

    def __init__(self, root: Path, capacity: int) -> None:
        self.root = Path(root).resolve()
        self.capacity = capacity
        self.used = 0
        self.refused: list[str] = []  # the paths a write failed on

    def covers(self, path: str | os.PathLike | int) -> bool:
        if isinstance(path, int):
            try:
                path = os.readlink(f"/proc/self/fd/{path}")
            except OSError:
                return False
        return Path(os.path.abspath(path)).is_relative_to(self.root)

    def charge(self, handle: object, data: bytes | str) -> int:
        room = self.capacity - self.used
        if len(data) <= room:
            self.used += len(data)
            return handle.write(data)
        if room > 0:
            handle.write(data[:room])
            handle.flush()
        self.used = self.capacity
        self.refused.append(str(getattr(handle, "name", "?")))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _Metered:
    """A writable file object whose writes are charged to a FullDisk."""

    def __init__(self, handle: object, disk: FullDisk) -> None:
        self._handle, self._disk = handle, disk

    def write(self, data: bytes | str) -> int:
        return self._disk.charge(self._handle, data)

    def __enter__(self) -> _Metered:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()

    def __iter__(self) -> Iterator:
        return iter(self._handle)

    def __getattr__(self, name: str) -> object:
        return getattr(self._handle, name)


@contextmanager
def full_disk(root: Path, capacity: int) -> Iterator[FullDisk]:
    """Inside, the folder `root` is on a disk with `capacity` bytes free (see FullDisk)."""
    disk = FullDisk(root, capacity)
    real_open, real_fdopen, real_connect = builtins.open, os.fdopen, sqlite3.connect

    def writable(mode: str) -> bool:
        return any(c in mode for c in "wax+")

    def metered_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return _Metered(handle, disk) if writable(mode) and disk.covers(file) else handle

    def metered_fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        return _Metered(handle, disk) if writable(mode) and disk.covers(fd) else handle

    def limited_connect(database, *args, **kwargs):
        connection = real_connect(database, *args, **kwargs)
        target = str(database).removeprefix("file:").split("?")[0]
        if not kwargs.get("uri") and disk.covers(target):
            (page_size,) = connection.execute("PRAGMA page_size").fetchone()
            pages = max(1, (disk.capacity - disk.used) // page_size)
            connection.execute(f"PRAGMA max_page_count = {pages}")
        return connection

    builtins.open, os.fdopen, sqlite3.connect = metered_open, metered_fdopen, limited_connect
    try:
        yield disk
    finally:
        builtins.open, os.fdopen, sqlite3.connect = real_open, real_fdopen, real_connect


def in_process_cli(*args: str) -> tuple[int, str, str]:
    """`saelab.cli.main(args)` in this process: (exit code, stdout, stderr). A traceback propagates."""
    import contextlib
    import io

    from saelab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def folder_snapshot(folder: Path) -> dict[str, str] | None:
    """Each file under `folder` → sha256 of its bytes; None when the folder does not exist."""
    if not folder.exists():
        return None
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def differences(got: object, want: object, path: str = "") -> list[str]:
    """The paths at which two nested digests differ (empty when equal), for a readable failure."""
    if isinstance(got, dict) and isinstance(want, dict):
        found = [f"{path}.{k}: only on one side" for k in sorted(set(got) ^ set(want), key=str)]
        for key in sorted(set(got) & set(want), key=str):
            found += differences(got[key], want[key], f"{path}.{key}")
        return found
    if isinstance(got, list | tuple) and isinstance(want, list | tuple) and len(got) == len(want):
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True)) for d in differences(g, w, f"{path}[{i}]")]
    return [] if got == want else [f"{path}: {str(got)[:80]} != {str(want)[:80]}"]


# A real SIGKILL at an exact point: the CLI with os.replace patched to kill the process just before or
# just after it renames a file whose destination contains FRAGMENT into place.
_KILL_AT = """
import os, runpy, signal, sys
fragment, when = sys.argv[1], sys.argv[2]
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    hit = fragment in str(dst)
    if hit and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst, *args, **kwargs)
    if hit and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.argv = ["saelab", *sys.argv[3:]]
runpy.run_module("saelab", run_name="__main__", alter_sys=True)
"""


def run_cli_killed_at(fragment: str, when: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m saelab ARGS…`, SIGKILLed `when` ("before" / "after") it renames a file matching `fragment`."""
    command = [sys.executable, "-c", _KILL_AT, fragment, when, *args]
    result = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-2000:])
    return result
