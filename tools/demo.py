"""`make demo`'s stages, one after the other, and where the time went.

    python tools/demo.py [--since EPOCH_SECONDS] [--saelab PATH]

Runs harvest → train → eval → analyze on the offline default (the configs below), each as the
`saelab` command a user would type, with its output shown as it comes; a failed stage stops the demo
with its exit status. Ends with a table of each stage's wall time. `--since` is when `make demo`
started, so the set-up before this script (the virtualenv, pip) is a row too.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = (
    ("harvest", ["harvest", "--config", "configs/harvest-smollm2.yaml"]),
    ("train", ["train", "--config", "configs/train-smollm2.yaml", "--resume"]),
    ("eval", ["eval", "--config", "configs/eval-smollm2.yaml"]),
    ("analyze", ["analyze", "--config", "configs/analyze-smollm2.yaml"]),
)


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def stage_table(times: list[tuple[str, float]]) -> str:
    """Each stage's wall time and its share of the total, as `m:ss.s`."""
    total = sum(seconds for _, seconds in times)
    lines = ["stage       wall time   share"]
    lines += [f"{name:<10} {minutes(seconds):>10}  {seconds / total:6.1%}" for name, seconds in times]
    lines.append(f"{'total':<10} {minutes(total):>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--since", type=float, help="when the set-up began (seconds since the epoch)")
    parser.add_argument("--saelab", default=str(Path(sys.executable).with_name("saelab")), help="the CLI to run")
    args = parser.parse_args(argv)
    times = [("set-up", time.time() - args.since)] if args.since else []
    for name, command in STAGES:
        start = time.perf_counter()
        status = subprocess.run([args.saelab, *command], cwd=REPO).returncode
        times.append((name, time.perf_counter() - start))
        if status != 0:
            print(f"make demo: the {name} stage failed (exit {status}); rerun `make demo` to continue", file=sys.stderr)
            return status
    print(f"\nWhere the time went:\n{stage_table(times)}")
    print(f"\nBrowse the features: {args.saelab} dashboard   (then open http://localhost:8501)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
