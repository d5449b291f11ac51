"""benchmarks/training_step.py against its peers, in the peers' environment (`make test` runs this file with
.venv-bench's Python, as the SAELens round trips): every implementation's row at the smallest CPU shape must
be a measurement, not an error. In saelab's own environment (no sparsify, no SAELens) it is skipped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("sparsify", reason="the peers live in .venv-bench (make bench-env)")
pytest.importorskip("sae_lens", reason="the peers live in .venv-bench (make bench-env)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import training_step  # noqa: E402


@pytest.mark.parametrize("implementation", ["saelab", "sparsify", "sae-lens"])
def test_every_peer_runs_a_measured_step(implementation):
    shape = min(training_step.CPU_SHAPES, key=lambda s: s.n)
    result = training_step.run_worker(implementation, shape, "cpu", rounds=1)
    assert isinstance(result, dict), f"{implementation}: {result}"
    assert result["step_s"] > 0 and result["floor_s"] > 0
