"""Two jobs on one folder: a second harvest into a store a harvest is writing, or a second training run into
a run being trained, is refused by the folder's lock with a message naming the holder; a reader (the
ActivationStore, the dashboard) of a store being written sees only its completed shards, each exactly
as it ends up; training on a store still being written is refused.

The first job is the real CLI in a subprocess; the second runs in this process (another OS process, so
the `flock` is contended for real).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from faultlib import differences, in_process_cli, one_line_error, run_digest, start_cli
from pipeline import harvest_args, train_args
from streamlit.testing.v1 import AppTest

from saelab.errors import SaelabError
from saelab.harvest.store import ActivationStore

APP = Path(__file__).resolve().parents[2] / "dashboards" / "app.py"


def test_a_second_harvest_is_refused_and_readers_see_only_complete_shards(tiny_model_dir, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    store = runs / "live" / "activations"
    args = ["harvest", "--quiet", *harvest_args(tiny_model_dir, store, n_tokens=31 * 24 * 60, shard_contexts=24)]
    writer = start_cli(*args)
    deadline = time.monotonic() + 120
    while not (store / "manifest.json").exists():
        assert writer.poll() is None and time.monotonic() < deadline, writer.communicate()
        time.sleep(0.005)

    code, _, stderr = in_process_cli(*args)  # the same command, a second time, while the first runs
    line = one_line_error((code, stderr))
    assert f"{store} is in use by another harvest (pid {writer.pid})" in line, line

    monkeypatch.setenv("SAELAB_RUNS", str(runs))
    seen: dict[int, torch.Tensor] = {}  # shards listed at each read → the rows read then
    dashboard_runs, refused = 0, ""
    while writer.poll() is None:
        try:
            opened = ActivationStore(store)
        except SaelabError as error:  # the manifest is replaced atomically, so this never happens
            raise AssertionError(f"a reader failed while the harvest wrote: {error}") from error
        assert not opened.complete or len(opened.manifest.shards) == 60  # complete only at the very end
        n = len(opened.manifest.shards)
        if n and n not in seen:
            seen[n] = opened.rows(torch.arange(opened.n_rows))
        if len(seen) == 2 and not opened.complete:  # training on it now would read a store still growing
            small = ["n_tokens=512", "batch_size=256", "saes=[{architecture: topk, d_sae: 64, k: 4}]", "device=cpu"]
            code, _, stderr = in_process_cli("train", "--quiet", f"store={store}", f"out={tmp_path / 'train'}", *small)
            refused = one_line_error((code, stderr))
            assert f"the activation store {store} is incomplete" in refused and "harvest is running" in refused
            assert not (tmp_path / "train").exists()
        if dashboard_runs < 1:  # the dashboard's runs page on the runs folder the harvest writes into
            at = AppTest.from_file(str(APP), default_timeout=60).run()
            assert not at.exception, [e.value for e in at.exception]
            dashboard_runs += 1
        time.sleep(0.02)  # leave the writer the CPU
    assert writer.returncode == 0, writer.communicate()
    final = ActivationStore(store)
    assert final.complete and len(final.manifest.shards) == 60
    everything = final.rows(torch.arange(final.n_rows))
    assert len(seen) >= 3 and refused, f"too few reads during the harvest: {sorted(seen)}"
    for rows in seen.values():  # every partial read was a prefix of the final store, bit for bit
        assert torch.equal(rows, everything[: len(rows)])
    print(f"reads while harvesting saw {sorted(seen)} of 60 shards; dashboard rendered {dashboard_runs} times")


def test_a_second_training_run_into_the_same_folder_is_refused(reference, tmp_path):
    run = tmp_path / "train"
    args = ["train", "--quiet", "--resume", *train_args(reference["store"], run)]
    writer = start_cli(*args)
    deadline = time.monotonic() + 120
    while not (run / "config.yaml").exists():
        assert writer.poll() is None and time.monotonic() < deadline, writer.communicate()
        time.sleep(0.005)
    code, _, stderr = in_process_cli(*args)
    assert f"{run} is in use by another training run (pid {writer.pid})" in one_line_error((code, stderr))
    assert writer.wait(timeout=180) == 0, writer.communicate()
    assert differences(run_digest(run), run_digest(reference["run"])) == []  # the first run was not disturbed
