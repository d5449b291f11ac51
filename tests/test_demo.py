"""`make demo`'s runner (tools/demo.py): the four stages in order as `saelab` commands, a table of where the
time went (set-up included), and a failed stage that stops the demo with its exit status."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fake_saelab(tmp_path: Path, fail_on: str | None = None) -> Path:
    """A stand-in `saelab` that logs its arguments, sleeps 0.2 s and fails on the subcommand `fail_on`."""
    log = tmp_path / "calls.txt"
    script = tmp_path / "saelab"
    script.write_text(
        f"#!{sys.executable}\nimport sys, time\nopen({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        f"time.sleep(0.2)\nsys.exit(3 if sys.argv[1] == {fail_on!r} else 0)\n"
    )
    script.chmod(0o755)
    return script


def run_demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "demo.py"), *args], capture_output=True, text=True)


def test_the_demo_runs_the_stages_in_order_and_says_where_the_time_went(tmp_path):
    saelab = fake_saelab(tmp_path)
    done = run_demo("--saelab", str(saelab), "--since", str(time.time() - 90))
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert [call.split()[0] for call in calls] == ["harvest", "train", "eval", "analyze"]
    assert calls[1] == "train --config configs/train-smollm2.yaml --resume"
    table = done.stdout.split("Where the time went:")[1].splitlines()[2:]
    rows = {line.split()[0]: line.split()[1:] for line in table if line.strip()}
    assert list(rows) == ["set-up", "harvest", "train", "eval", "analyze", "total", "Browse"]
    minutes, seconds = rows["set-up"][0].split(":")
    assert 89 <= 60 * int(minutes) + float(seconds) < 120  # the time since --since
    assert all(0.2 <= float(rows[stage][0].split(":")[1]) < 5 for stage in ("harvest", "train", "eval", "analyze"))


def test_a_failed_stage_stops_the_demo_with_its_status(tmp_path):
    saelab = fake_saelab(tmp_path, fail_on="eval")
    done = run_demo("--saelab", str(saelab))
    assert done.returncode == 3
    assert [call.split()[0] for call in (tmp_path / "calls.txt").read_text().splitlines()] == [
        "harvest",
        "train",
        "eval",
    ]
    assert "the eval stage failed (exit 3)" in done.stderr and "Where the time went" not in done.stdout
