"""The sparsity–fidelity frontier of an evaluated run as a table: every SAE's held-out L0, FVU, dead
latents and CE loss recovered, by architecture and L0 (the numbers the dashboard's run page plots).

    saelab harvest --config configs/harvest-smollm2-family.yaml
    saelab train --config configs/train-smollm2-family.yaml
    saelab eval --config configs/eval-smollm2.yaml run=runs/smollm2-135m/family
    python benchmarks/frontier.py runs/smollm2-135m/family [more runs…]

Transcoders are marked: they predict the MLP's output from its input, and are spliced in place of the
MLP, so their FVU and CE loss recovered are of another task than the residual SAEs'.
"""

from __future__ import annotations

import argparse

from saelab.browse.frontier import sae_frontier
from saelab.browse.runs import read_run


def rows(run: str) -> list[str]:
    """One markdown row per evaluated SAE of `run`, grouped by architecture, by L0 within one."""
    info = read_run(run)
    frontier = sae_frontier(info.saes)
    by_label = {sae.label: sae for sae in info.saes}
    lines = []
    for architecture, points in frontier.by_architecture.items():
        for point in points:
            evaluation = by_label[point.label].evaluation
            hook = evaluation.get("hook", "")
            if "hook_in" in evaluation:
                hook = f"{evaluation['hook_in']} → {hook}"
            lines.append(
                f"| `{point.label}` | {architecture}{' (◆ transcoder)' if point.is_transcoder else ''} | "
                f"{by_label[point.label].sparsity} | {point.l0:.1f} | {point.fvu:.3f} | "
                f"{evaluation.get('dead_fraction', 0):.1%} | {_percent(point.ce_loss_recovered)} | "
                f"{evaluation.get('delta_lm_loss', float('nan')):.3f} | `{hook}` |"
            )
    for label in frontier.not_evaluated:
        lines.append(f"| `{label}` | not evaluated (`saelab eval run={run}`) | | | | | | | |")
    return lines


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="training runs evaluated by `saelab eval`")
    args = parser.parse_args()
    columns = ["SAE", "architecture", "sparsity set by", "held-out L0", "FVU", "dead", "CE loss recovered"]
    columns += ["Δ loss (nats)", "hook"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for run in args.runs:
        for line in rows(run):
            print(line)


if __name__ == "__main__":
    main()
