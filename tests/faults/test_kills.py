"""SIGKILL a real `saelab harvest`, `saelab train --resume` and `saelab analyze` (subprocesses) at seeded
moments in the middle of their work, and at exact points between a file's rename and what makes it count;
rerunning the same command (in this process: the kills are what is tested) ends with what an
uninterrupted run makes.

Each kill waits for the first sign of work (a shard listed, a checkpoint, the feature store's temporary
file), then a seeded extra delay, so kills land at different places in the work; each test prints where
they landed (pytest -s). After every kill, nothing on disk looks complete but is not: every shard,
checkpoint, SAE folder and feature store that has its final name opens and verifies.

Bit-identical: the store (every tensor and the manifest), the SAEs' weights and buffers, the last
checkpoint's state (weights, Adam moments, dead-latent counters, GBA windows, data position), the
summary, the metrics, and the feature store's tables. Not: `tokens_per_s` in metrics.jsonl and
`pass_seconds`, `tokens_per_second` and `created` in the feature store's `meta` (they measure the clock),
nor the paths that name the run's own folder (`summary.json`'s `path`, `meta.run`): they are left out.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import safetensors.torch
from faultlib import (
    differences,
    feature_store_digest,
    in_process_cli,
    kill_during,
    run_cli_killed_at,
    run_digest,
    start_cli,
    store_digest,
)
from pipeline import analyze_args, harvest_args, train_args

from saelab.analysis.feature_store import FeatureStore
from saelab.harvest.store import ActivationStore
from saelab.sae import load_sae
from saelab.train.checkpoint import complete_checkpoints, load_checkpoint


def listed_shards(store: Path) -> int:
    try:
        return len(json.loads((store / "manifest.json").read_text())["shards"])
    except (OSError, ValueError):
        return 0


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp")) if folder.exists() else []  # files and folders


def assert_store_consistent(store: Path) -> None:
    """What the manifest lists opens and verifies; every file named like a shard is a whole safetensors file."""
    if (store / "manifest.json").exists():
        ActivationStore(store)  # sizes and sha256 of every listed shard
    for shard in (store / "shards").glob("shard-*.safetensors"):
        safetensors.torch.load_file(shard)


def test_harvest_killed_three_times_resumes_to_the_same_store(reference, tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    args = ["harvest", "--quiet", *harvest_args(tiny_model_dir, store)]
    kills = []
    for seed in (11, 12, 13):
        rng, before = random.Random(seed), listed_shards(store)
        if seed == 11:  # from the lock on: model loading, the manifest, the first shards
            what, started, delay = "the lock taken", lambda: (store / ".lock").exists(), rng.uniform(0, 1.0)
        else:  # a seeded number of shards on, then part of one shard's time (~25 ms): mid-shard
            target = before + rng.randint(1, 6)
            what, started, delay = (
                f"shard {target} listed",
                lambda t=target: listed_shards(store) >= t,
                rng.uniform(0, 0.03),
            )
        kill = kill_during(
            start_cli(*args),
            what,
            started,
            delay,
            describe=lambda: f"{listed_shards(store)}/20 shards listed, temporaries {temporaries(store)}",
        )
        kills.append(kill)
        assert not kill.finished_first, "the kill should land inside the harvest; make it longer"
        assert_store_consistent(store)
    code, _, stderr = in_process_cli(*args)  # the same command again (in this process: the kills are the test)
    assert code == 0, stderr
    assert differences(store_digest(store), store_digest(reference["store"])) == []
    assert temporaries(store) == []
    for seed, kill in zip((11, 12, 13), kills, strict=True):
        print(f"harvest kill, seed {seed}: {kill.delay:.3f} s after {kill.what}: {kill.state}")


@pytest.mark.slow
def test_harvest_of_smollm2_killed_mid_shard_resumes_to_the_same_store(smollm2, tmp_path):
    from saelab.config import load_config
    from saelab.harvest.config import HarvestConfig
    from saelab.harvest.harvester import harvest

    def args(out: Path) -> list[str]:
        return [f"out={out}", "n_tokens=496", "context_size=32", "batch_size=2", "shard_contexts=4", "device=cpu"]

    harvest(load_config(HarvestConfig, None, args(tmp_path / "reference")), model=smollm2, progress=False)
    store = tmp_path / "store"
    process = start_cli("harvest", "--quiet", *args(store))
    kill = kill_during(
        process,
        "the first shard listed",
        lambda: listed_shards(store) >= 1,
        random.Random(21).uniform(0, 0.8),  # a shard takes ~0.5 s here: mid-shard 2 or 3
        describe=lambda: f"{listed_shards(store)}/4 shards listed, temporaries {temporaries(store)}",
    )
    assert not kill.finished_first
    assert_store_consistent(store)
    code, _, stderr = in_process_cli("harvest", "--quiet", *args(store))
    assert code == 0, stderr
    assert store_digest(store) == store_digest(tmp_path / "reference")
    print(f"SmolLM2 harvest kill, seed 21: {kill.delay:.3f} s after {kill.what}: {kill.state}")


def checkpoint_steps(run: Path) -> list[int]:
    folder = run / "checkpoints"
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("step-*.sha256")) if folder.is_dir() else []


def assert_run_consistent(run: Path) -> None:
    """Every checkpoint with its checksum loads and verifies; an SAE folder, once there, loads."""
    for checkpoint in complete_checkpoints(run):
        load_checkpoint(checkpoint)
    for folder in (run / "saes").iterdir() if (run / "saes").is_dir() else []:
        if not folder.name.startswith("."):
            load_sae(folder)


def test_training_killed_three_times_resumes_bit_for_bit(reference, tmp_path):
    run = tmp_path / "train"
    args = ["train", "--quiet", "--resume", *train_args(reference["store"], run)]
    kills = []
    for seed in (31, 32, 33):
        rng, before = random.Random(seed), (checkpoint_steps(run) or [0])[-1]
        if seed == 31:  # from the run folder's config on: initialisation, the first steps and checkpoints
            what, started, delay = "config.yaml written", lambda: (run / "config.yaml").exists(), rng.uniform(0, 0.6)
        else:  # after a new checkpoint, anywhere up to ~4 checkpoints on (one every ~0.1 s)
            what, delay = "a new checkpoint", rng.uniform(0, 0.4)
            started = lambda before=before: (checkpoint_steps(run) or [0])[-1] > before  # noqa: E731
        kill = kill_during(
            start_cli(*args),
            what,
            started,
            delay,
            describe=lambda: f"checkpoints at steps {checkpoint_steps(run)} of 300, temporaries {temporaries(run)}",
        )
        kills.append(kill)
        assert not kill.finished_first, "the kill should land inside training; make it longer"
        assert_run_consistent(run)
    code, _, stderr = in_process_cli(*args)  # the same command again (in this process: the kills are the test)
    assert code == 0, stderr
    assert differences(run_digest(run), run_digest(reference["run"])) == []
    for seed, kill in zip((31, 32, 33), kills, strict=True):
        print(f"train kill, seed {seed}: {kill.delay:.3f} s after {kill.what}: {kill.state}")


def test_analysis_killed_twice_rerun_gives_the_same_feature_stores(reference, tmp_path):
    run = tmp_path / "train"
    shutil.copytree(reference["run"], run)
    args = ["analyze", "--quiet", *analyze_args(run)]
    saes = sorted(p.name for p in (run / "saes").iterdir())
    kills = []
    for seed, label in ((41, saes[0]), (42, saes[1])):
        folder = run / "saes" / label
        process = start_cli(*args)

        def describe() -> str:
            done = [s for s in saes if (run / "saes" / s / "features.sqlite").exists()]
            return f"feature stores done: {done}; temporaries {temporaries(run / 'saes')}"

        kill = kill_during(
            process,
            f"{label}'s feature store begun",
            lambda folder=folder: bool(temporaries(folder)),
            random.Random(seed).uniform(0, 0.3),
            describe=describe,
        )
        kills.append(kill)
        assert not kill.finished_first
        for label_ in saes:  # a feature store that has its name is whole
            path = run / "saes" / label_ / "features.sqlite"
            if path.exists():
                with FeatureStore(path) as store:
                    store.feature(0)
    code, _, stderr = in_process_cli(*args)  # the same command again (in this process: the kills are the test)
    assert code == 0, stderr
    assert temporaries(run / "saes") == []
    for label in saes:
        got = feature_store_digest(run / "saes" / label / "features.sqlite")
        assert differences(got, feature_store_digest(reference["analyzed"] / "saes" / label / "features.sqlite")) == []
    for seed, kill in zip((41, 42), kills, strict=True):
        print(f"analyze kill, seed {seed}: {kill.delay:.3f} s after {kill.what}: {kill.state}")


@pytest.mark.parametrize(
    ("stage", "fragment", "when"),
    [
        ("harvest", "shard-000003.safetensors", "after"),  # a whole shard in place, not yet in the manifest
        ("train", "step-000000100.pt", "after"),  # a whole checkpoint in place, its .sha256 not yet written
        ("train", "/cfg.json", "after"),  # the first SAE half saved: its temporary folder holds cfg.json only
        ("analyze", "features.sqlite", "before"),  # a whole feature store, still under its temporary name
    ],
)
def test_killed_between_a_write_and_its_record(reference, tiny_model_dir, tmp_path, stage, fragment, when):
    """Kills at the exact points a random kill rarely hits: between a file's rename and what makes it count."""
    run = tmp_path / "train"
    if stage == "harvest":
        target = tmp_path / "store"
        args = ["harvest", "--quiet", *harvest_args(tiny_model_dir, target)]
    elif stage == "train":
        target = run
        args = ["train", "--quiet", "--resume", *train_args(reference["store"], run)]
    else:
        target = Path(shutil.copytree(reference["run"], run))
        args = ["analyze", "--quiet", *analyze_args(run)]
    run_cli_killed_at(fragment, when, *args)
    left = sorted(str(p.relative_to(target)) for p in target.rglob("*") if fragment.strip("/") in p.name)
    if stage == "harvest":
        assert listed_shards(target) == 3 and left == ["shards/shard-000003.safetensors"]  # whole, but unlisted
        assert_store_consistent(target)
    elif fragment == "/cfg.json":
        assert [p.name for p in (run / "saes").iterdir()][0].endswith(".tmp")  # only the half-saved SAE
        code, _, stderr = in_process_cli("analyze", "--quiet", *analyze_args(run))
        assert "holds no SAE; has the training run finished?" in stderr and code == 2  # not the half-saved one
    elif stage == "train":
        assert checkpoint_steps(run)[-1] == 80 and (run / "checkpoints" / fragment).exists()
        assert_run_consistent(run)
    else:
        assert temporaries(run / "saes") and not (run / "saes" / "batchtopk-128-k8" / "features.sqlite").exists()
    code, _, stderr = in_process_cli(*args)  # the same command again
    assert code == 0, stderr
    assert temporaries(target) == []
    if stage == "harvest":
        assert differences(store_digest(target), store_digest(reference["store"])) == []
    elif stage == "train":
        assert differences(run_digest(run), run_digest(reference["run"])) == []
    else:
        for label in sorted(p.name for p in (run / "saes").iterdir()):
            got = feature_store_digest(run / "saes" / label / "features.sqlite")
            want = feature_store_digest(reference["analyzed"] / "saes" / label / "features.sqlite")
            assert differences(got, want) == []
    print(f"{stage} killed {when} renaming {fragment}: left {left or 'a temporary only'}; the rerun matches")
