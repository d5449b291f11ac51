"""Do GBA and g-SAE beat TopK on SmolLM2 at ten times the demo's scale? The frontier, consistency across
seeds (the GBA paper's claim), robustness to the learning rate, and g-SAE against TopK with two seeds.

Stages; each skips what is done and resumes what is not, so a rerun after a kill continues:
  1. harvest  a single-epoch store of 2,048,000 tokens at blocks.15.hook_resid_post (the default corpus after
              `configs/harvest-smollm2.yaml`'s settings), and a gradient store of 1,024,000 tokens
  2. train    the runs of `plan()`: one sweep per seed or learning rate, every SAE 4,608 latents
  3. compare  the three seeds of each variant at L0 32 with `saelab compare` (the store's frequencies)
  4. eval     the SAEs the tables read (not the seed runs': those are compared) on 16,384 held-out tokens: FVU,
              L0, dead, CE loss recovered, Δ loss, KL
  5. steer    g-SAE and TopK latents added in held-out contexts (benchmarks/paper_gsae.py's measures)
  6. report   the tables, printed and written to <root>/results.json

    python benchmarks/consistency.py                 # runs/consistency: hours of 2 CPU cores
    python benchmarks/consistency.py --quick         # runs/consistency-quick: the same pipeline in minutes
    python benchmarks/consistency.py --report        # only the tables, from what is done so far
    python benchmarks/consistency.py --only frontier seed1 seed2   # some runs (their stores, training, eval)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saelab.atomic import atomic_write_json
from saelab.config import load_config
from saelab.eval.compare import compare_saes
from saelab.eval.config import EvalConfig
from saelab.eval.evaluate import evaluate, held_out_contexts
from saelab.harvest.config import HarvestConfig
from saelab.harvest.harvester import harvest
from saelab.harvest.manifest import read_manifest
from saelab.harvest.store import ActivationStore
from saelab.run_layout import EVAL_FILE, SAE_DIR, SUMMARY_FILE
from saelab.sae.config import SAEConfig, default_lr
from saelab.sae.saelens_format import load_sae
from saelab.steer.effect import steering_effect
from saelab.train.config import TrainConfig
from saelab.train.trainer import train

HARVEST_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "harvest-smollm2.yaml"
STORES = {"activations": "activations", "gradients": "activations-grad"}


@dataclass(frozen=True)
class Scale:
    """How big each part is: the full run, or `--quick`'s."""

    store_tokens: int  # single epoch: the training runs read each row once
    gradient_tokens: int
    gradient_epochs: int  # the gradient store is read this many times, to train as many steps
    d_sae: int
    batch_size: int
    ks: tuple[int, int, int]  # the L0s of the frontier; the middle one is the consistency's
    eval_tokens: int
    compare_tokens: int
    steer_latents: int
    steer_contexts: int
    checkpoints: int = 8  # per run: how much a kill can cost


FULL = Scale(2_048_000, 1_024_000, 2, 4608, 4096, (16, 32, 64), 16_384, 131_072, 32, 8)
QUICK = Scale(8_064, 4_032, 2, 256, 512, (8, 16, 32), 504, 4_032, 4, 2, checkpoints=2)
SEEDS = (0, 1, 2)
LR_SCALES = {"lr-third": 1 / 3, "lr-triple": 3.0}


@dataclass(frozen=True)
class RunPlan:
    """One training run (a sweep over one store, one seed, one learning-rate scale)."""

    name: str
    store: str  # a key of STORES
    saes: tuple[SAEConfig, ...]
    seed: int = 0
    lr_scale: float = 1.0
    evaluated: bool = True  # the later seeds are only compared with the first: no eval


def frontier_saes(scale: Scale, k: int) -> list[SAEConfig]:
    """The frontier's variants at L0 k but GBA (`gba_saes`): one run trains them while GBA's defaults settle."""
    d = scale.d_sae
    return [
        SAEConfig(architecture="topk", d_sae=d, k=k),
        SAEConfig(architecture="batchtopk", d_sae=d, k=k),
        SAEConfig(architecture="matryoshka_batchtopk", d_sae=d, k=k),
        SAEConfig(architecture="jumprelu", d_sae=d, target_l0=k),
    ]


def gba_saes(scale: Scale, ks: tuple[int, ...]) -> list[SAEConfig]:
    """GBA at each L0 in its default form, and at the middle L0 in the paper's tied form too."""
    saes = [SAEConfig(architecture="gba", d_sae=scale.d_sae, target_l0=k) for k in ks]
    if scale.ks[1] in ks:
        k = scale.ks[1]
        saes.append(
            SAEConfig(
                architecture="gba", d_sae=scale.d_sae, target_l0=k, tied=True, name=f"gba-tied-{scale.d_sae}-l0{k}"
            )
        )
    return saes


def plan(scale: Scale) -> list[RunPlan]:
    d, k = scale.d_sae, scale.ks[1]
    topk, batchtopk = (SAEConfig(architecture=a, d_sae=d, k=k) for a in ("topk", "batchtopk"))
    runs = [
        RunPlan("frontier", "activations", tuple(sae for k_ in scale.ks for sae in frontier_saes(scale, k_))),
        RunPlan("frontier-gba", "activations", tuple(gba_saes(scale, scale.ks))),
    ]
    for seed in SEEDS[1:]:
        runs += [
            RunPlan(f"seed{seed}", "activations", (topk, batchtopk), seed, evaluated=False),
            RunPlan(f"seed{seed}-gba", "activations", tuple(gba_saes(scale, (k,))), seed, evaluated=False),
        ]
    gba = gba_saes(scale, (k,))[0]
    runs += [RunPlan(name, "activations", (topk, gba), lr_scale=factor) for name, factor in LR_SCALES.items()]
    gradient_sweep = [SAEConfig(architecture=a, d_sae=d, k=k_) for k_ in scale.ks for a in ("topk", "gsae")]
    runs += [RunPlan(f"gsae-seed{seed}", "gradients", tuple(gradient_sweep), seed) for seed in SEEDS[:2]]
    third = (topk, SAEConfig(architecture="gsae", d_sae=d, k=k))
    runs += [RunPlan(f"gsae-seed{SEEDS[2]}", "gradients", third, SEEDS[2], evaluated=False)]
    return runs


def consistency_groups(scale: Scale) -> dict[str, tuple[str, list[str]]]:
    """By group name: the store and each seed's SAE of one variant at the middle L0, as `<run>/<label>`."""
    d, k = scale.d_sae, scale.ks[1]
    gba, tied = (sae.label for sae in gba_saes(scale, (k,)))
    runs = {
        "topk": ("activations", "frontier", "seed", f"topk-{d}-k{k}"),
        "batchtopk": ("activations", "frontier", "seed", f"batchtopk-{d}-k{k}"),
        "gba": ("activations", "frontier-gba", "seed{}-gba", gba),
        "gba-tied": ("activations", "frontier-gba", "seed{}-gba", tied),
        "gsae": ("gradients", "gsae-seed0", "gsae-seed", f"gsae-{d}-k{k}"),
        "topk-gradient-store": ("gradients", "gsae-seed0", "gsae-seed", f"topk-{d}-k{k}"),
    }
    groups = {}
    for variant, (store, first, later, label) in runs.items():
        names = [first] + [later.format(seed) if "{}" in later else f"{later}{seed}" for seed in SEEDS[1:]]
        groups[variant] = (store, [f"{name}/{label}" for name in names])
    return groups


# ---- the stages ---------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def harvest_stores(root: Path, scale: Scale, runs: list[RunPlan]) -> None:
    """The stores that `runs` read."""
    base = load_config(HarvestConfig, HARVEST_CONFIG)
    for key, tokens, gradients in (
        ("activations", scale.store_tokens, False),
        ("gradients", scale.gradient_tokens, True),
    ):
        if not any(run.store == key for run in runs):
            continue
        out = root / STORES[key]
        if (out / "manifest.json").is_file() and read_manifest(out).complete:
            continue
        log(f"harvest {out} ({tokens:,} tokens{', with gradients' if gradients else ''})")
        harvest(dataclasses.replace(base, out=str(out), n_tokens=tokens, gradients=gradients, device="cpu"))


def train_config(root: Path, scale: Scale, run: RunPlan) -> TrainConfig:
    store = ActivationStore(root / STORES[run.store], verify=False)
    epochs = scale.gradient_epochs if run.store == "gradients" else 1
    n_tokens = store.n_rows // scale.batch_size * scale.batch_size * epochs
    every = max(scale.batch_size, n_tokens // scale.checkpoints // scale.batch_size * scale.batch_size)
    return TrainConfig(
        store=str(root / STORES[run.store]),
        out=str(root / run.name),
        saes=list(run.saes),
        n_tokens=n_tokens,
        batch_size=scale.batch_size,
        lr=None if run.lr_scale == 1 else default_lr(scale.d_sae) * run.lr_scale,
        seed=run.seed,
        checkpoint_every_tokens=every,
        keep_checkpoints=1,
        log_every_steps=10,
        device="cpu",
    )


def train_runs(root: Path, scale: Scale, runs: list[RunPlan]) -> None:
    for run in runs:
        if (root / run.name / SUMMARY_FILE).is_file():
            continue
        log(f"train {run.name}: {', '.join(sae.label for sae in run.saes)}")
        train(train_config(root, scale, run), resume=True)


def target_l0(sae: SAEConfig) -> float:
    """The L0 an SAE of the plan is trained to: its target, or its k."""
    return sae.target_l0 if sae.target_l0 is not None else sae.k


def evaluate_runs(root: Path, scale: Scale, runs: list[RunPlan], model: Any) -> None:
    """The SAEs at the middle L0 first (the consistency and robustness tables' own), then the rest."""
    middle = {sae.label for run in runs for sae in run.saes if target_l0(sae) == scale.ks[1]}
    for first in (True, False):
        for run in (run for run in runs if run.evaluated):
            missing = [
                sae.label
                for sae in run.saes
                if (sae.label in middle) == first and not (root / run.name / SAE_DIR / sae.label / EVAL_FILE).is_file()
            ]
            if missing:
                log(f"eval {run.name}: {', '.join(missing)}")
                config = EvalConfig(run=str(root / run.name), saes=missing, n_tokens=scale.eval_tokens, device="cpu")
                evaluate(config, model)


def compare_seeds(root: Path, scale: Scale) -> None:
    """Each variant's seeds whose runs have all finished."""
    (root / "compare").mkdir(exist_ok=True)
    for variant, (store, saes) in consistency_groups(scale).items():
        out = root / "compare" / f"{variant}.json"
        if out.is_file() or not all((root / sae.split("/")[0] / SUMMARY_FILE).is_file() for sae in saes):
            continue
        log(f"compare the seeds of {variant}")
        folders = [root / run / SAE_DIR / label for run, label in (sae.split("/") for sae in saes)]
        atomic_write_json(out, compare_saes(folders, root / STORES[store], n_tokens=scale.compare_tokens).report)


def steer_runs(root: Path, scale: Scale, model: Any) -> None:
    """paper_gsae's steering measures for TopK and g-SAE at the middle k, in the first two seeds' runs."""
    out = root / "steering.json"
    done = json.loads(out.read_text()) if out.is_file() else {}
    if not all((root / f"gsae-seed{seed}" / SUMMARY_FILE).is_file() for seed in SEEDS[:2]):
        return
    store = ActivationStore(root / STORES["gradients"], verify=False)
    contexts = held_out_contexts(store, model.tokenizer, scale.steer_contexts)
    rows = store.rows(torch.arange(min(store.n_rows, 4096)))
    alpha = 0.5 * float(rows.float().norm(dim=-1).median())
    for seed in SEEDS[:2]:
        for architecture in ("topk", "gsae"):
            key = f"gsae-seed{seed}/{architecture}-{scale.d_sae}-k{scale.ks[1]}"
            if key in done:
                continue
            log(f"steer with {scale.steer_latents} latents of {key}")
            sae = load_sae(root / key.replace("/", f"/{SAE_DIR}/"))
            latents = torch.randperm(sae.cfg.d_sae, generator=torch.Generator().manual_seed(seed))
            kl, rise = steering_effect(
                model, sae, store.hook_name(None), contexts, latents[: scale.steer_latents].tolist(), alpha
            )
            done[key] = {"kl": kl, "delta_logp": rise, "alpha": alpha, "latents": scale.steer_latents}
            atomic_write_json(out, done)


# ---- the report ----------------------------------------------------------------------------------------


def read_eval(root: Path, run: str, label: str) -> dict[str, Any] | None:
    path = root / run / SAE_DIR / label / EVAL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def mean_spread(values: list[float]) -> str:
    """`mean ± standard deviation` (just the value for one)."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(columns: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def read_training_end(root: Path, run: str, label: str) -> dict[str, Any] | None:
    """FVU and L0 of an SAE's last training batches (each unseen before its step: one epoch)."""
    path = root / run / SUMMARY_FILE
    return json.loads(path.read_text()).get(label) if path.is_file() else None


def frontier_table(root: Path, scale: Scale) -> list[str]:
    rows = []
    for k in scale.ks:
        runs = [("frontier", sae) for sae in frontier_saes(scale, k)] + [
            ("frontier-gba", sae) for sae in gba_saes(scale, (k,))
        ]
        for run, sae in runs:
            trained = read_training_end(root, run, sae.label)
            cells = [
                f"`{sae.label}`",
                "not trained yet" if trained is None else f"{trained['fvu']:.3f} / {trained['l0']:.1f}",
            ]
            r = read_eval(root, run, sae.label)
            if r is None:
                rows.append(cells + ["not evaluated yet", "", "", "", "", ""])
                continue
            rows.append(
                cells
                + [f"{r['l0']:.1f}", f"{r['fvu']:.3f}", f"{r['dead_fraction']:.1%}"]
                + [f"{r['ce_loss_recovered']:.1%}", f"{r['delta_lm_loss']:.3f}", f"{r['kl']:.3f}"]
            )
    columns = ["SAE", "last training batches: FVU / L0", "held-out L0", "FVU", "dead", "CE loss recovered", "Δ loss"]
    return table([*columns, "KL"], rows)


def consistency_table(root: Path, scale: Scale) -> tuple[list[str], dict[str, Any]]:
    rows, results = [], {}
    for variant in consistency_groups(scale):
        path = root / "compare" / f"{variant}.json"
        if not path.is_file():
            rows.append([variant, "not compared yet", "", "", ""])
            continue
        report = json.loads(path.read_text())
        pairs = report["pairwise"]["pairs"]
        shared = [p["shared_fraction"] for p in pairs]
        mcc = [p["hungarian_mean_cosine"] for p in pairs]
        mmcs = [p["mmcs_a_to_b"] for p in pairs]
        correlation = [p["mean_activation_correlation"] for p in pairs if p.get("mean_activation_correlation")]
        results[variant] = {"shared_fraction": shared, "mcc": mcc, "mmcs": mmcs, "activation_correlation": correlation}
        by_group = [p["shared_fraction_by_group"] for p in pairs if "shared_fraction_by_group" in p]
        if by_group:
            results[variant]["by_group"] = {g: statistics.mean(b[g] for b in by_group) for g in by_group[0]}
        rows.append([variant, mean_spread(shared), mean_spread(mcc), mean_spread(mmcs), mean_spread(correlation)])
    lines = table(["variant (3 seeds)", "shared fraction", "MCC", "MMCS", "activation correlation"], rows)
    for variant in ("gba", "gba-tied"):
        if by_group := results.get(variant, {}).get("by_group"):
            groups = ", ".join(f"{g}: {v:.1%}" for g, v in by_group.items())
            lines += ["", f"{variant}'s shared fraction by frequency group (group 0 has the highest target): {groups}"]
    return lines, results


def robustness_table(root: Path, scale: Scale) -> list[str]:
    d, k = scale.d_sae, scale.ks[1]
    rows = []
    for label, default in ((f"topk-{d}-k{k}", "frontier"), (f"gba-{d}-l0{k}", "frontier-gba")):
        cells = [f"`{label}`"]
        for run in ("lr-third", default, "lr-triple"):
            r, trained = read_eval(root, run, label), read_training_end(root, run, label)
            cells.append("—" if trained is None else f"{trained['fvu']:.3f} / {trained['l0']:.1f}")
            cells.append("—" if r is None else f"{r['fvu']:.3f} / {r['l0']:.1f}")
        rows.append(cells)
    columns = [f"lr × {factor}: {where}" for factor in ("1/3", "1", "3") for where in ("training end", "held out")]
    return table(["SAE (FVU / L0)", *columns], rows)


def gsae_table(root: Path, scale: Scale) -> tuple[list[str], dict[str, Any]]:
    rows, results = [], {}
    steering = json.loads((root / "steering.json").read_text()) if (root / "steering.json").is_file() else {}
    for k in scale.ks:
        per_seed = {}
        for seed in SEEDS[:2]:
            topk = read_eval(root, f"gsae-seed{seed}", f"topk-{scale.d_sae}-k{k}")
            gsae = read_eval(root, f"gsae-seed{seed}", f"gsae-{scale.d_sae}-k{k}")
            if topk and gsae:
                per_seed[seed] = (topk, gsae)
        if not per_seed:
            rows.append([str(k), "not evaluated yet", "", "", "", "", ""])
            continue
        difference = [g["delta_lm_loss"] - t["delta_lm_loss"] for t, g in per_seed.values()]
        kl_difference = [g["kl"] - t["kl"] for t, g in per_seed.values()]
        results[f"k{k}"] = {"delta_loss_difference": difference, "kl_difference": kl_difference}
        rows.append(
            [
                str(k),
                " / ".join(f"{t['delta_lm_loss']:.3f}" for t, _ in per_seed.values()),
                " / ".join(f"{g['delta_lm_loss']:.3f}" for _, g in per_seed.values()),
                " / ".join(_with_gradient(g) for _, g in per_seed.values()),
                mean_spread(difference),
                mean_spread(kl_difference),
                " / ".join(f"{t['fvu']:.3f} vs {g['fvu']:.3f}" for t, g in per_seed.values()),
            ]
        )
    lines = table(
        [
            "k",
            "TopK Δ loss (seeds 0 / 1)",
            "g-SAE Δ loss",
            "g-SAE Δ loss, selecting with g",
            "g-SAE − TopK Δ loss",
            "g-SAE − TopK KL",
            "FVU TopK vs g-SAE",
        ],
        rows,
    )
    if steering:
        lines += [
            "",
            *table(
                ["SAE", "steering KL", "Δ log p (top-5 promoted)"],
                [[f"`{key}`", f"{v['kl']:.3f}", f"{v['delta_logp']:.3f}"] for key, v in steering.items()],
            ),
        ]
        results["steering"] = steering
    return lines, results


def _with_gradient(evaluation: dict[str, Any]) -> str:
    """A g-SAE's Δ loss when it selects with the held-out gradient, as it trains (β > 0 only)."""
    value = evaluation.get("delta_lm_loss_with_gradient")
    return "—" if value is None else f"{value:.3f}"


def report(root: Path, scale: Scale) -> dict[str, Any]:
    sections: dict[str, Any] = {}
    print(f"\n## Frontier ({scale.store_tokens:,} training tokens, one epoch; {scale.eval_tokens:,} held-out tokens)")
    print("\n".join(frontier_table(root, scale)))
    lines, sections["consistency"] = consistency_table(root, scale)
    print(f"\n## Consistency across seeds {SEEDS} at L0 {scale.ks[1]} (mean ± sd over the 3 seed pairs)")
    print("\n".join(lines))
    print(f"\n## Robustness: the learning rate × 1/3 and × 3 (default {default_lr(scale.d_sae):.3g})")
    print("\n".join(robustness_table(root, scale)))
    lines, sections["gsae"] = gsae_table(root, scale)
    print("\n## g-SAE against TopK on the gradient store (two seeds; Δ loss and KL in nats)")
    print("\n".join(lines))
    sections["evaluations"] = {
        f"{run.name}/{sae.label}": read_eval(root, run.name, sae.label)
        for run in plan(scale)
        if run.evaluated
        for sae in run.saes
    }
    atomic_write_json(root / "results.json", sections)
    return sections


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="where the stores and runs live (default runs/consistency[-quick])")
    parser.add_argument("--quick", action="store_true", help="the same pipeline on a small store, in minutes")
    parser.add_argument("--report", action="store_true", help="only print the tables from what is done")
    parser.add_argument("--only", nargs="+", metavar="RUN", help="harvest, train and evaluate these runs only")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    root = Path(args.root or ("runs/consistency-quick" if args.quick else "runs/consistency"))
    root.mkdir(parents=True, exist_ok=True)
    runs = [run for run in plan(scale) if not args.only or run.name in args.only]
    if args.only and len(runs) < len(set(args.only)):
        parser.error(f"--only: the runs are {', '.join(run.name for run in plan(scale))}")
    if not args.report:
        harvest_stores(root, scale, runs)
        train_runs(root, scale, runs)
        compare_seeds(root, scale)  # before the evaluations: minutes, against their hours
        from saelab.models import load_model

        model = load_model("smollm2-135m", "cpu")
        evaluate_runs(root, scale, runs, model)
        steer_runs(root, scale, model)
    report(root, scale)


if __name__ == "__main__":
    sys.exit(main())
