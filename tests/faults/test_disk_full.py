"""A full disk: the job stops with one line naming the file and the space it needed, what was complete stays
readable, no temporary is left, and rerunning the same command once there is space ends with what an
uninterrupted run makes.

Two ways to fill a disk: a real, small tmpfs (the harvest, through the real CLI in a subprocess; needs
permission to mount, else skipped), and `faultlib.full_disk`, which makes every write under a folder fail
with ENOSPC once a seeded number of bytes has been written there (SQLite: `max_page_count`, so it fails
with SQLITE_FULL as on a full disk), in this process.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from faultlib import (
    differences,
    feature_store_digest,
    folder_snapshot,
    full_disk,
    in_process_cli,
    one_line_error,
    run_cli,
    run_digest,
    store_digest,
)
from pipeline import analyze_args, harvest_args, train_args

from saelab.analysis.feature_store import FeatureStore
from saelab.harvest.store import ActivationStore
from saelab.train.checkpoint import complete_checkpoints, load_checkpoint

MESSAGE = re.compile(r"no space left on the device writing (\S+) \((.*needed.*|more than .*)\); free some space")


def disk_full_line(stderr: str, code: int, under: Path) -> tuple[Path, str]:
    """The one line: the file it names (under `under`) and the space it says was needed."""
    line = one_line_error((code, stderr))
    found = MESSAGE.search(line)
    assert found, line
    path = Path(found.group(1))
    assert path.is_relative_to(under) and not path.name.endswith(".tmp"), line
    return path, found.group(2)


def mebibytes(size: str) -> float:
    """`size_text`'s "1.5 MiB" or "12,345 bytes" as MiB."""
    number, unit = size.split()
    return float(number.replace(",", "")) / (1 if unit == "MiB" else 2**20)


def check_rest_of_store(needed: str, store: Path, reference: Path) -> None:
    """The message's estimate for the rest of the store is within 5 % (or the 0.1 MiB it shows) of what
    the shards not yet listed take in the uninterrupted store (`reference`)."""
    found = re.search(r"about (\S+ \S+) for the ([\d,]+) contexts still to harvest", needed)
    assert found, needed
    listed = len(json.loads((store / "manifest.json").read_text())["shards"]) if store.exists() else 0
    shards = sorted((reference / "shards").iterdir())[listed:]
    actual = sum(shard.stat().st_size for shard in shards) / 2**20
    assert mebibytes(found.group(1)) == pytest.approx(actual, rel=0.05, abs=0.05), (needed, actual)  # 0.1 MiB shown


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


@pytest.fixture
def tmpfs(tmp_path):
    """`mount(size)`: a tmpfs of `size` bytes at tmp_path/disk (remount to resize); unmounted afterwards."""
    point = tmp_path / "disk"
    point.mkdir()

    def mount(size: int) -> Path:
        options = f"size={size}" if not mounted else f"remount,size={size}"
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); the patched disk covers it")
        mounted.append(point)
        return point

    mounted: list[Path] = []
    yield mount
    if mounted:
        subprocess.run(["umount", str(point)], check=False)


@pytest.mark.slow
def test_harvest_on_a_full_tmpfs_stops_naming_the_shard_and_resumes(reference, tiny_model_dir, tmpfs):
    disk = tmpfs(1 << 20)  # about half the store
    store = disk / "store"
    args = ["harvest", "--quiet", *harvest_args(tiny_model_dir, store)]
    result = run_cli(*args)
    path, needed = disk_full_line(result.stderr, result.returncode, store)
    assert path.parent == store / "shards" or path == store / "manifest.json"
    assert "MiB needed" in needed or "bytes needed" in needed
    opened = ActivationStore(store)  # what was complete is readable, and is the reference's
    assert 0 < len(opened.manifest.shards) < 20 and not opened.complete
    written = {r["file"]: r for r in store_digest(store)["manifest"]["shards"]}
    assert (
        differences(
            written, {r["file"]: r for r in store_digest(reference["store"])["manifest"]["shards"][: len(written)]}
        )
        == []
    )
    assert temporaries(store) == []
    tmpfs(4 << 20)  # space freed
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert differences(store_digest(store), store_digest(reference["store"])) == []
    print(f"tmpfs of 1 MiB: {path.name} ({needed}); {len(written)} of 20 shards were complete")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_harvest_on_a_full_disk_stops_and_resumes(reference, tiny_model_dir, tmp_path, seed):
    store = tmp_path / "store"
    args = ["harvest", "--quiet", *harvest_args(tiny_model_dir, store)]
    capacity = [300, random.Random(seed).randrange(200_000, 1_800_000), 2_000_000][seed - 1]
    with full_disk(tmp_path, capacity):
        code, _, stderr = in_process_cli(*args)
    path, needed = disk_full_line(stderr, code, store)
    if path.parent.name == "shards":  # a shard did not fit: the message also sizes the rest of the store
        check_rest_of_store(needed, store, reference["store"])
    assert temporaries(tmp_path) == []
    if (store / "manifest.json").exists():
        ActivationStore(store)  # readable: the shards it lists are whole
    else:
        assert not store.exists()  # full before the first shard: nothing half-made is left
    code, _, stderr = in_process_cli(*args)
    assert code == 0, stderr
    assert differences(store_digest(store), store_digest(reference["store"])) == []
    print(f"harvest, disk of {capacity:,} bytes: stopped at {path.relative_to(tmp_path)} ({needed})")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_training_on_a_full_disk_stops_and_resumes_bit_for_bit(reference, tmp_path, seed):
    run = tmp_path / "train"
    args = ["train", "--quiet", "--resume", *train_args(reference["store"], run)]
    capacity = [2_000, random.Random(seed).randrange(100_000, 900_000), 1_500_000][seed - 1]
    with full_disk(tmp_path, capacity):
        code, _, stderr = in_process_cli(*args)
    path, needed = disk_full_line(stderr, code, run)
    assert temporaries(tmp_path) == []
    if run.exists():
        for checkpoint in complete_checkpoints(run):
            load_checkpoint(checkpoint)  # every checkpoint that counts is whole
    code, _, stderr = in_process_cli(*args)
    assert code == 0, stderr
    assert differences(run_digest(run), run_digest(reference["run"])) == []
    print(f"train, disk of {capacity:,} bytes: stopped at {path.relative_to(tmp_path)} ({needed})")


def test_analysis_on_a_full_disk_keeps_the_old_feature_stores(reference, tmp_path):
    run = Path(shutil.copytree(reference["analyzed"], tmp_path / "train"))
    before = folder_snapshot(run / "saes")
    args = ["analyze", "--quiet", *analyze_args(run)]
    with full_disk(tmp_path, 20_000):
        code, _, stderr = in_process_cli(*args)
    path, needed = disk_full_line(stderr, code, run)
    assert path.name == "features.sqlite" and needed.startswith("more than the")
    assert folder_snapshot(run / "saes") == before  # the feature stores of the earlier analysis, untouched
    for label in ("batchtopk-128-k8", "gba-128-l08", "topk-128-k8"):
        with FeatureStore(run / "saes" / label / "features.sqlite") as store:
            store.feature(0)
    code, _, stderr = in_process_cli(*args)
    assert code == 0, stderr
    assert temporaries(tmp_path) == []
    for label in ("batchtopk-128-k8", "gba-128-l08", "topk-128-k8"):
        got = feature_store_digest(run / "saes" / label / "features.sqlite")
        assert differences(got, feature_store_digest(reference["analyzed"] / "saes" / label / "features.sqlite")) == []
    print(f"analyze, disk of 20,000 bytes: stopped at {path.relative_to(tmp_path)} ({needed})")
