"""benchmarks/consistency.py's whole pipeline on the real SmolLM2 at a tiny scale: every stage writes what
the report reads, and a second run finds everything done and redoes nothing."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

import saelab.models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import consistency  # noqa: E402

TINY = dataclasses.replace(
    consistency.QUICK,
    store_tokens=16 * 126,
    gradient_tokens=8 * 126,
    d_sae=64,
    batch_size=252,
    ks=(4, 8, 16),
    eval_tokens=126,
    compare_tokens=1008,
    steer_latents=2,
    steer_contexts=1,
)


@pytest.mark.slow
def test_the_pipeline_runs_resumes_and_reports(tmp_path, smollm2, monkeypatch, capsys):
    monkeypatch.setattr(consistency, "QUICK", TINY)
    monkeypatch.setattr(saelab.models, "load_model", lambda spec, device="auto": smollm2)
    root = tmp_path / "consistency"
    consistency.main(["--quick", "--root", str(root)])
    first = capsys.readouterr().out

    results = json.loads((root / "results.json").read_text())
    runs = consistency.plan(TINY)
    assert len(results["evaluations"]) == sum(len(run.saes) for run in runs if run.evaluated)
    assert all(evaluation is not None for evaluation in results["evaluations"].values())
    groups = consistency.consistency_groups(TINY)
    assert set(results["consistency"]) == set(groups)
    for variant in groups:  # three seeds: three pairs, each a fraction
        assert len(results["consistency"][variant]["shared_fraction"]) == 3
        assert all(0 <= value <= 1 for value in results["consistency"][variant]["shared_fraction"])
    for gba in ("gba", "gba-tied"):
        assert set(results["consistency"][gba]["by_group"]) == {str(g) for g in range(10)}
    assert set(results["gsae"]) == {*(f"k{k}" for k in TINY.ks), "steering"} and len(results["gsae"]["steering"]) == 4
    for heading in ("## Frontier", "## Consistency", "## Robustness", "## g-SAE against TopK"):
        assert heading in first
    assert "not evaluated yet" not in first and "not compared yet" not in first

    consistency.main(["--quick", "--root", str(root)])  # everything is done: no stage does anything again
    again = capsys.readouterr().out
    assert not any(f"] {stage} " in again for stage in ("harvest", "train", "eval", "compare", "steer"))
    assert json.loads((root / "results.json").read_text()) == results
