"""The sparsity–fidelity frontier of an evaluated run as a table: every SAE's held-out L0, FVU, dead
latents and CE loss recovered, by architecture and L0 (the numbers the dashboard's run page plots).

    saelab harvest --config configs/harvest-smollm2-family.yaml
    saelab train --config configs/train-smollm2-family.yaml
    saelab eval --config configs/eval-smollm2.yaml run=runs/smollm2-135m/family
    python benchmarks/frontier.py runs/smollm2-135m/family [more runs…]

The README's table adds three small runs (after the family store and run above):

    saelab train --config configs/train-smollm2-family.yaml out=runs/smollm2-135m/family-more \
      "saes=[{architecture: gated, d_sae: 4608, l1_coefficient: 18},
             {architecture: jumprelu, d_sae: 4608, l0_coefficient: 10, jumprelu_init_threshold: 0.1}]"
    saelab train --config configs/train-smollm2-family.yaml out=runs/smollm2-135m/family-wide \
      "saes=[{architecture: topk, d_sae: 4608, k: 128}, {architecture: topk, d_sae: 4608, k: 256},
             {architecture: topk, d_sae: 4608, k: 512}]"
    saelab train --config configs/train-smollm2-gradients.yaml out=runs/smollm2-135m/gsae-frontier \
      "saes=[{architecture: topk, d_sae: 4608, k: 16}, {architecture: topk, d_sae: 4608, k: 32},
             {architecture: gsae, d_sae: 4608, k: 16}, {architecture: gsae, d_sae: 4608, k: 32}]"
    (each then `saelab eval --config configs/eval-smollm2.yaml run=<its out>`)

Transcoders are marked: they predict the MLP's output from its input, and are spliced in place of the
MLP, so their FVU and CE loss recovered are of another task than the residual SAEs'.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saelab.browse.frontier import sae_frontier
from saelab.browse.runs import read_run


def rows(run: str, named: bool = False) -> list[str]:
    """One markdown row per evaluated SAE of `run`, grouped by architecture, by L0 within one; `named`:
    each SAE as `<run folder>/<label>` (for a table of several runs)."""
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
            name = f"{Path(run).name}/{point.label}" if named else point.label
            lines.append(
                f"| `{name}` | {architecture}{' (◆ transcoder)' if point.is_transcoder else ''} | "
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
        for line in rows(run, named=len(args.runs) > 1):
            print(line)


if __name__ == "__main__":
    main()
