"""The `saelab` command: a thin layer over library functions that a notebook can call as well.

Each subcommand takes `--config FILE.yaml` plus `key=value` overrides (dotted for nested keys,
e.g. `corpus.path=data.jsonl`). Bad input is reported in one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saelab.errors import SaelabError
from saelab.out_of_memory import out_of_memory_error

if TYPE_CHECKING:  # saelab.sae loads every SAE class and the kernels: commands import what they need
    from types import ModuleType


def _distributed() -> ModuleType:
    """`saelab.distributed`, imported on first use: it imports torch, and `saelab doctor` must run (and say
    what is wrong) where torch does not import."""
    from saelab import distributed

    return distributed


def _harvest(args: argparse.Namespace) -> None:
    from saelab.config import load_config
    from saelab.harvest.config import HarvestConfig
    from saelab.harvest.harvester import harvest

    cfg = load_config(HarvestConfig, args.config, args.overrides)
    manifest = harvest(cfg, progress=not args.quiet)
    if not _distributed().is_main():
        return
    size = sum(shard.bytes for shard in manifest.shards) / 2**20
    print(
        f"activation store: {cfg.out}\n"
        f"  {manifest.n_rows:,} tokens × {len(manifest.hooks)} hook(s) ({', '.join(manifest.hooks)}), "
        f"d_model {manifest.d_model}, {manifest.dtype}, {len(manifest.shards)} shard(s), {size:,.1f} MiB"
    )


def _train(args: argparse.Namespace) -> None:
    from saelab.config import load_config
    from saelab.run_layout import SUMMARY_FILE
    from saelab.train.config import TrainConfig
    from saelab.train.trainer import train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if _distributed().is_main():
        for notice in filter(None, (sae.variant.config_notice(sae) for sae in cfg.saes)):
            print(notice)
    saes = train(cfg, resume=args.resume, progress=not args.quiet, distribute_saes=args.distribute_saes)
    if not _distributed().is_main():
        return
    summary = json.loads((Path(cfg.out) / SUMMARY_FILE).read_text())
    print(f"training run: {cfg.out} (metrics.jsonl, checkpoints/, saes/<name>/ in the SAELens format)")
    print("  on the last training batches:")
    _print_table(
        [("sae", 24), ("tokens", 10), ("FVU", 8), ("L0", 8), ("dead", 8)],
        [
            [label, f"{r['tokens']:,}", f"{r['fvu']:.3f}", f"{r['l0']:.1f}", f"{r['dead_fraction']:.1%}"]
            for label, r in summary.items()
        ],
    )
    for label, sae in saes.items():
        if form := sae.form():
            print(f"  {label}: {form}")


def _eval(args: argparse.Namespace) -> None:
    from saelab.config import load_config
    from saelab.eval.config import EvalConfig
    from saelab.eval.evaluate import evaluate
    from saelab.run_layout import EVAL_FILE

    cfg = load_config(EvalConfig, args.config, args.overrides)
    results = evaluate(cfg, progress=not args.quiet)
    held_out = next(iter(results.values()))["held_out"]
    print(
        f"evaluated {cfg.run} on {held_out['n_tokens']:,} held-out tokens (contexts {held_out['first_context']:,}+ "
        f"of the store's corpus; saes/<name>/{EVAL_FILE}, metrics.jsonl)"
    )
    columns = [("sae", 24), ("FVU", 7), ("expl.var", 9), ("L0", 7), ("dead", 7), ("dense", 7)]
    columns += [("CE clean", 10), ("CE SAE", 8), ("CE zero", 9), ("CE rec.", 9), ("Δ loss", 8)]
    rows = []
    for label, r in results.items():
        recovered = "n/a" if r["ce_loss_recovered"] is None else f"{r['ce_loss_recovered']:.1%}"
        rows.append(
            [label, f"{r['fvu']:.3f}", f"{r['explained_variance']:.1%}", f"{r['l0']:.1f}", f"{r['dead_fraction']:.1%}"]
            + [f"{r['dense_fraction']:.1%}", f"{r['ce_loss_clean']:.3f}", f"{r['ce_loss_sae']:.3f}"]
            + [f"{r['ce_loss_zero']:.3f}", recovered, f"{r['delta_lm_loss']:.3f}"]
        )
    _print_table(columns, rows)


def _probe(args: argparse.Namespace) -> None:
    from saelab.config import load_config
    from saelab.eval.config import ProbeConfig
    from saelab.eval.probe_job import probe
    from saelab.run_layout import PROBING_FILE

    cfg = load_config(ProbeConfig, args.config, args.overrides)
    results = probe(cfg, progress=not args.quiet)
    print(f"probed {cfg.run} (saes/<name>/{PROBING_FILE})")
    ks = [f"k{k}" for k in cfg.ks]
    columns = [("sae", 24), ("dense", 7), *((k, 7) for k in ks), ("concepts", 9), ("absorption", 11), ("main miss", 10)]
    rows = []
    for label, r in results.items():
        mean = r.get("sparse_probing", {}).get("mean", {})
        absorbed, concepts = r.get("absorption", {}), r.get("sparse_probing", {}).get("concepts", {})
        row = [label, _fraction(mean.get("dense")), *(_fraction(mean.get(k)) for k in ks), str(len(concepts))]
        rates = [absorbed.get("mean_absorption_rate"), absorbed.get("mean_main_miss_rate")]
        rows.append([*row, *(_fraction(rate) for rate in rates)])
    _print_table(columns, rows)


def _explain(args: argparse.Namespace) -> None:
    from saelab.analysis.config import ExplainConfig
    from saelab.analysis.explain_job import explain
    from saelab.config import load_config
    from saelab.run_layout import AUTOINTERP_FILE, EXPLANATIONS_FILE, TOKEN_SUMMARIES_FILE

    cfg = load_config(ExplainConfig, args.config, args.overrides)
    results = explain(cfg, progress=not args.quiet)
    files = f"saes/<name>/{EXPLANATIONS_FILE}, {TOKEN_SUMMARIES_FILE}, {AUTOINTERP_FILE}"
    print(f"explained latents of {cfg.run} ({files}); scored by {next(iter(results.values()))['scorer']}")
    columns = [("sae", 24), ("explainer", 17), ("latents", 8), ("detection [95% CI]", 22), ("shuffled", 22)]
    columns += [("fuzzing", 22), ("beat shuffled", 14)]
    rows = []
    for label, r in results.items():
        for explainer, stats in r["explainers"].items():
            cells = [_interval(stats.get(key)) for key in ("detection", "detection_shuffled", "fuzzing")]
            beats = stats.get("beats_shuffled") or {}
            passed = f"{beats['count']}/{beats['scored']}" if beats else "—"
            name = explainer + (" *" if explainer == r["explainer"] and len(r["explainers"]) > 1 else "")
            rows.append([label, name, str(stats["n_latents"]), *cells, passed])
    _print_table(columns, rows, left=(0, 1))
    chance = ", ".join(
        f"{label}/{name} {stats['beats_shuffled']['chance']:.1%}"
        for label, r in results.items()
        for name, stats in r["explainers"].items()
        if stats.get("beats_shuffled")
    )
    print(
        "  beat shuffled: latents whose own label's detection calls beat p0, the pooled rate of the shuffled labels "
        "(≥ 50 %), in a one-sided exact binomial test at α 0.05, and beat the shuffled label on the same examples "
        f"(saelab/analysis/label_test.py); p0: {chance}"
    )
    if any(len(r["explainers"]) > 1 for r in results.values()):
        print(
            "  * the SAE's default explainer, the one with the higher mean detection (autointerp.json's top level); "
            "the dashboard heads each latent with its best label that beats shuffled, and greys out the rest"
        )


def _interval(score: dict | None) -> str:
    if not score:
        return "—"
    low, high = score["ci95"]
    return f"{score['mean']:.1%} [{low:.1%}, {high:.1%}]"


def _fraction(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _analyze(args: argparse.Namespace) -> None:
    from saelab.analysis.analyze import analyze
    from saelab.analysis.config import AnalyzeConfig
    from saelab.config import load_config

    cfg = load_config(AnalyzeConfig, args.config, args.overrides)
    summaries = analyze(cfg, progress=not args.quiet)
    print(f"feature stores of {cfg.run} (saes/<name>/features.sqlite; browse them in the dashboard)")
    for s in summaries.values():
        print(
            f"  {s.label}: {s.n_latents:,} latents, {s.n_tokens:,} tokens at {s.tokens_per_second:,.0f} tokens/s "
            f"({s.total_seconds:.1f} s in all), {s.bytes / 2**20:,.1f} MiB: {s.path}\n    e.g. {s.example}"
        )


def _dashboard(args: argparse.Namespace) -> None:
    """`streamlit run dashboards/app.py` in a subprocess, with the runs folder in $SAELAB_RUNS."""
    import os
    import signal
    import subprocess

    from saelab.browse.runs import RUNS_ENV

    app = Path(__file__).resolve().parents[1] / "dashboards" / "app.py"
    if not app.is_file():
        raise SaelabError(f"{app} is missing: the dashboard runs from a source checkout (`pip install -e .`)")
    root = Path(args.runs).resolve()
    if not root.is_dir():
        print(f"saelab dashboard: {root} does not exist yet; the dashboard will say how to make a run")
    command = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port)]
    command += ["--server.address", args.address, "--server.headless", str(args.headless).lower()]
    command += ["--browser.gatherUsageStats", "false"]
    print(f"saelab dashboard: http://{args.address}:{args.port} (runs from {root}); Ctrl-C stops it", flush=True)
    process = subprocess.Popen(command, env={**os.environ, RUNS_ENV: str(root)})
    signal.signal(signal.SIGTERM, lambda signum, frame: process.terminate())  # stopping saelab stops Streamlit
    try:
        code = process.wait()
    except KeyboardInterrupt:  # Streamlit got the same Ctrl-C and shuts down
        code = process.wait()
    if code > 0 and code != 130:  # 130: Ctrl-C; negative: stopped by a signal
        raise SaelabError(f"streamlit exited with status {code}")


def _doctor(args: argparse.Namespace) -> None:
    from saelab.doctor import gather, render, usable

    facts = gather(args.runs)
    print(render(facts))
    if not usable(facts):
        problems = "; ".join(f"{fact.name}: {fact.value}" for fact in facts if fact.level == "fail")
        raise SaelabError(f"saelab cannot run here until this is fixed: {problems}")


def _import_sae(args: argparse.Namespace) -> None:
    from saelab.train.pretrained import import_pretrained_sae

    imported = import_pretrained_sae(args.release, args.sae_id, args.store, args.out, args.releases, args.label)
    source = imported.source
    print(
        f"imported {source['release']} / {source['sae_id']} ({source['repo_id']}, {imported.architecture}, "
        f"d_in {imported.d_in}, {imported.d_sae:,} latents) as run {imported.run}\n"
        f"  saes/{imported.label}/ reads {imported.hook} of {imported.model} from the store {args.store}\n"
        f"  next: saelab eval run={imported.run}; saelab analyze run={imported.run}; saelab dashboard"
    )


def _steer(args: argparse.Namespace) -> None:
    from saelab.config import load_config
    from saelab.steer.config import SteerConfig
    from saelab.steer.experiment import run_steering

    cfg = load_config(SteerConfig, args.config, args.overrides)
    result = run_steering(cfg, progress=not args.quiet)
    print(f"steering {cfg.sae} of {cfg.run}: {len(result.rows)} cells ({result.jsonl}, {result.figure.name})")
    columns = [("feature", 8), ("coef", 7), ("prompt", 26), ("KL", 8)]
    headers = [f"Δlogp {target.strip() or repr(target)}"[:14] for target in cfg.targets]
    columns += [(header, max(len(header) + 2, 9)) for header in headers]
    columns += [("act", 8), ("generation", 42)]
    rows = []
    for r in result.rows:
        cells = [str(r["feature"]), f"{r['coefficient']:g}", _excerpt(r["prompt"], 22), f"{r['kl']:.3f}"]
        cells += [f"{r['delta_logprob'][target]:+.3f}" for target in cfg.targets]
        cells += [f"{r['activation_steered']:.2f}", _excerpt(r["generation"], 40)]
        rows.append(cells)
    _print_table(columns, rows, left=(0, 2, len(columns) - 1))


def _compare(args: argparse.Namespace) -> None:
    from saelab.atomic import atomic_write_json, atomic_write_text
    from saelab.eval.compare import compare_saes
    from saelab.eval.compare_figure import comparison_figure
    from saelab.run_layout import COMPARE_FILE, SAE_DIR

    comparison = compare_saes(
        args.saes,
        args.store,
        args.threshold,
        args.tokens,
        args.min_frequency,
        args.matching,
        args.candidates,
        progress=not args.quiet,
    )
    report = comparison.report
    _print_comparison(report)
    run = Path(args.saes[0])
    if len(args.saes) == 1 and (run / SAE_DIR).is_dir():  # one run's SAEs: the report lives in the run folder
        args.out = args.out or str(run / COMPARE_FILE)
        args.html = args.html or str(run / COMPARE_FILE).replace(".json", ".html")
    if args.out:
        atomic_write_json(args.out, report)
        print(f"report: {args.out}")
    if args.html:
        atomic_write_text(args.html, comparison_figure(comparison).to_html(include_plotlyjs=True, full_html=True))
        print(f"histograms: {args.html}")


def _print_comparison(report: dict) -> None:
    """The SAEs, each pair's measures, and the splits, as tables."""
    saes = report["saes"]
    store = report["store"]
    sampled = f"; frequencies on {store['tokens']:,} tokens of {store['path']}" if store else "; no store"
    print(
        f"compared {len(saes)} SAEs of {saes[0]['hook'] or 'one hook'} (shared: both cosines ≥ {report['threshold']:g}"
        f"{sampled}; matching {report['matching']['method']})"
    )
    columns = [("sae", 28), ("architecture", 22), ("latents", 9), ("counted", 9), ("dead", 7), ("ultra-rare", 11)]
    _print_table(
        columns,
        [
            [
                s["label"],
                s["architecture"],
                f"{s['d_sae']:,}",
                f"{s['counted']:,}",
                str(s.get("dead", "—")),
                str(s.get("ultra_rare", "—")),
            ]
            for s in saes
        ],
        left=(0, 1),
    )
    pairs = (
        report["pairwise"]["pairs"]
        if "pairwise" in report
        else [report | {"a": saes[0]["label"], "b": saes[1]["label"]}]
    )
    columns = [("A", 28), ("B", 28), ("MMCS A→B", 10), ("MMCS B→A", 10), ("MCC", 7), ("enc. MCC", 10)]
    columns += [("shared A", 10), ("shared B", 10), ("act. corr", 10)]
    _print_table(
        columns,
        [
            [
                p["a"],
                p["b"],
                _number(p["mmcs_a_to_b"]),
                _number(p["mmcs_b_to_a"]),
                _number(p["hungarian_mean_cosine"]),
                _number(p["encoder_hungarian_mean_cosine"]),
                _fraction(p["shared_fraction"]),
                _fraction(p["shared_fraction_b"]),
                _number(p.get("mean_activation_correlation")),
            ]
            for p in pairs
        ],
        left=(0, 1),
    )
    if "pairwise" in report:
        found = report["pairwise"]["found_in_all_others"]
        print("  shared with every other SAE: " + ", ".join(f"{label} {_fraction(v)}" for label, v in found.items()))
    by_group = report.get("shared_fraction_by_group")
    if by_group:
        print("  shared fraction of A by group: " + ", ".join(f"{g}: {_fraction(v)}" for g, v in by_group.items()))
    splits = report["splits"]
    if splits:
        shown = "; ".join(f"{s['latent']} → {', '.join(str(p[0]) for p in s['partners'])}" for s in splits[:5])
        print(
            f"  {len(splits)} latents of {splits[0]['sae']} split in two or more of the other's: {shown}"
            + (" …" if len(splits) > 5 else "")
        )
    if report.get("left_out"):
        print(f"  left out (another hook than the rest): {', '.join(report['left_out'])}")


def _attribute(args: argparse.Namespace) -> None:
    from saelab.atomic import atomic_write_text
    from saelab.circuits.figure import circuit_figure
    from saelab.circuits.graph import write_graph
    from saelab.circuits.job import CircuitRequest, attribute_circuit
    from saelab.circuits.pruning import Pruning
    from saelab.circuits.sources import folder_dictionaries, run_dictionaries
    from saelab.models import load_model
    from saelab.run_layout import GRAPHS_DIR

    if bool(args.run_dir) == bool(args.sae):
        raise SaelabError("give the dictionaries as --run DIR (a training run) or --sae DIR [DIR …] (SAE folders)")
    if args.saes and not args.run_dir:
        raise SaelabError("--saes picks SAEs of a run by name: give --run DIR too (or list SAE folders with --sae)")
    if args.run_dir:
        found = run_dictionaries(args.run_dir, args.hooks, args.saes)
    else:
        found = folder_dictionaries(args.sae, args.store, args.hooks)
    if args.store and args.run_dir:
        found.store = Path(args.store)
    spec = found.model = args.model or found.model  # what the dictionaries are checked against
    if not spec:
        raise SaelabError("the dictionaries do not say which model they were trained on; name it with --model SPEC")
    pruning = Pruning(args.prune, args.node_threshold, args.edge_threshold, args.top_nodes)
    request = CircuitRequest(
        prompt=args.prompt,
        target=args.target,
        contrast=args.contrast,
        position=args.position,
        method=args.method,
        steps=args.steps,
        exact_errors=args.exact_errors,
        edges=args.edges,
        max_nodes=args.max_nodes,
        pruning=pruning,
        evaluate=args.evaluate,
        first_position=args.first_position,
        slug=args.slug,
    )
    request.check()
    model = load_model(spec, args.device)
    circuit = attribute_circuit(model, found, request)
    out = Path(args.out) if args.out else Path(args.run_dir or ".") / GRAPHS_DIR / f"{args.slug}.json"
    html = Path(args.html) if args.html else out.with_suffix(".html")
    write_graph(out, circuit.graph)
    atomic_write_text(html, circuit_figure(circuit.graph).to_html(include_plotlyjs=True, full_html=True))
    _print_circuit(circuit, args.top)
    print(f"graph: {out} (circuit-tracer's graph-file format)\nfigure: {html}")


def _print_circuit(circuit: Any, top: int) -> None:
    """The metric, the top nodes, the graph's size, the evaluation and the timings."""
    info = circuit.graph["metadata"]["saelab"]
    metric = info["metric"]
    what = f"log p({metric['target']!r})"
    if metric["contrast"] is not None:
        what = f"logit({metric['target']!r}) − logit({metric['contrast']!r})"
    shown = ", ".join(f"{t['token']!r} {t['probability']:.1%}" for t in info["top_next_tokens"][:3])
    print(
        f"{what} at position {metric['position']} = {metric['value']:.4f} (p = {metric['probability']:.1%}; "
        f"top next tokens {shown})\n{info['n_nodes']:,} nodes ({info['method']}"
        + (f", {info['steps']} steps" if info["method"] == "ig" else "")
        + ("; errors and tokens exact" if info["exact_errors"] else "")
        + f"); effect = change of the metric when the node is zeroed; top {top} by |effect|:"
    )
    rows = []
    for index in circuit.top(top, tokens=True):
        row = circuit.node_row(index)
        latent = row["latent"] if row["kind"] == "latent" else row["kind"]
        cells = [row["hook"], str(row["position"]), _excerpt(row["token"], 12), str(latent), f"{row['effect']:+.4f}"]
        rows.append([*cells, _excerpt(row["label"], 60)])
    columns = [("hook", 28), ("pos", 5), ("token", 14), ("latent", 8), ("effect", 10), ("label", 62)]
    _print_table(columns, rows, left=(0, 2, 5))
    n_nodes, n_links = len(circuit.graph["nodes"]), len(circuit.graph["links"])
    print(f"kept: {n_nodes} nodes (tokens and the metric included), {n_links} edges; seconds: {info['seconds']}")
    evaluation = info.get("evaluation")
    if evaluation:
        print(
            f"mean ablation (F(M) = {evaluation['metric_model']:.3f}, F(∅) = {evaluation['metric_empty']:.3f}; "
            f"all {evaluation['n_nodes']:,} nodes kept: faithfulness {_number(evaluation['all_nodes'])}):"
        )
        _print_table(
            [("nodes", 7), ("faithfulness", 14), ("completeness", 14), (f"random ×{evaluation['random_draws']}", 12)],
            [
                [str(n), _number(f), _number(c), _number(r)]
                for n, f, c, r in zip(
                    evaluation["sizes"],
                    evaluation["faithfulness"],
                    evaluation["completeness"],
                    evaluation["random_faithfulness"],
                    strict=True,
                )
            ],
        )


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _excerpt(text: str, width: int) -> str:
    """`text` on one line (newlines shown as \\n), cut to `width` characters with an ellipsis."""
    flat = json.dumps(text, ensure_ascii=False)[1:-1]
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _print_table(columns: list[tuple[str, int]], rows: list[list[str]], left: Sequence[int] = (0,)) -> None:
    """Formatted cells under their headers, `columns` = (header, width); the columns `left` (indices)
    left-aligned (after two spaces, but for the first), the others right-aligned."""

    def cell_text(i: int, cell: str, width: int) -> str:
        if i not in left:
            return f"{cell:>{width}}"
        return f"{cell:<{width}}" if i == 0 else f"  {cell:<{width - 2}}"

    def line(cells: Sequence[str]) -> str:
        aligned = [cell_text(i, cell, width) for i, (cell, (_, width)) in enumerate(zip(cells, columns, strict=True))]
        return "  " + "".join(aligned).rstrip()

    print(line([header for header, _ in columns]))
    for row in rows:
        print(line(row))


def _add_command(commands: argparse._SubParsersAction, name: str, help: str, run: Callable) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help)
    command.add_argument("--config", help="YAML config (see configs/); keys not given take their defaults")
    command.add_argument("--quiet", action="store_true", help="no progress bar")
    command.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. n_tokens=10000")
    command.set_defaults(run=run)
    return command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saelab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_command(commands, "harvest", "cache residual-stream activations to a sharded store", _harvest)
    train = _add_command(commands, "train", "train TopK / BatchTopK / g-SAE / GBA SAEs on an activation store", _train)
    train.add_argument("--resume", action="store_true", help="continue the run in `out` from its last checkpoint")
    train.add_argument(
        "--distribute-saes",
        action="store_true",
        help="under torchrun: deal the sweep's SAEs to the ranks (each trains its own on every batch) "
        "instead of training every SAE data-parallel",
    )
    _add_command(commands, "eval", "FVU, L0, dead / dense latents and CE loss recovered on held-out text", _eval)
    _add_command(commands, "probe", "sparse probing of concepts and first-letter feature absorption", _probe)
    _add_command(commands, "explain", "explain latents with an LLM and score the explanations", _explain)
    _add_command(commands, "analyze", "per-latent statistics, contexts and logit effects to a feature store", _analyze)
    dashboard = commands.add_parser("dashboard", help="browse runs, features and live text in a Streamlit app")
    dashboard.add_argument("--runs", default="runs", help="the folder to find training runs in (default: runs)")
    dashboard.add_argument("--port", type=int, default=8501, help="port to serve on (default: 8501)")
    dashboard.add_argument("--address", default="localhost", help="address to serve on (default: localhost)")
    dashboard.add_argument("--headless", action="store_true", help="do not open a browser")
    dashboard.set_defaults(run=_dashboard)
    compare = commands.add_parser("compare", help="did two or more SAEs of one hook learn the same features?")
    compare.add_argument(
        "saes",
        nargs="+",
        help="SAE folders (saelab's or SAELens's format), or run folders; one run folder alone gets its report "
        "written into it (compare.json, compare.html), where the dashboard's runs page reads it",
    )
    compare.add_argument("--store", help="an activation store of the hook: frequencies and activation correlations")
    compare.add_argument("--threshold", type=float, default=0.7, help="cosine for a shared latent (default 0.7)")
    compare.add_argument("--out", help="write the report as JSON here")
    compare.add_argument("--html", help="write the matched-cosine histograms (plotly) here")
    compare.add_argument("--tokens", type=int, default=131_072, help="store rows sampled (default 131072)")
    compare.add_argument(
        "--min-frequency", type=float, default=1e-5, help="latents firing less often are left out (default 1e-5)"
    )
    compare.add_argument(
        "--matching",
        choices=["auto", "dense", "sparse"],
        default="auto",
        help="dense: exact on the whole cosine matrix; sparse: on each latent's nearest candidates (auto: "
        "dense up to 16384 latents)",
    )
    compare.add_argument("--candidates", type=int, default=32, help="nearest partners per latent kept (default 32)")
    compare.add_argument("--quiet", action="store_true", help="no progress bar")
    compare.set_defaults(run=_compare)
    _add_command(commands, "steer", "steering sweeps: add / clamp / ablate SAE features over prompts", _steer)
    doctor = commands.add_parser(
        "doctor", help="versions, the device, which kernels a training step would run here and why, files, disk"
    )
    doctor.add_argument("--runs", default="runs", help="the runs folder whose free disk to report (default: runs)")
    doctor.set_defaults(run=_doctor)
    _attribute_parser(commands)
    imported = commands.add_parser(
        "import-sae", help="a shared SAELens SAE (release + id) as a run that eval, analyze and the dashboard read"
    )
    imported.add_argument("--release", required=True, help="a SAELens release, e.g. gpt2-small-res-jb")
    imported.add_argument("--id", required=True, dest="sae_id", help="the SAE's id in it, e.g. blocks.8.hook_resid_pre")
    imported.add_argument("--store", required=True, help="an activation store of the SAE's model at its hook")
    imported.add_argument("--out", required=True, help="the run folder to make (new or empty)")
    imported.add_argument("--releases", help="a YAML file of more releases: name: {repo_id, model, saes: {id: folder}}")
    imported.add_argument("--label", help="the SAE's name in the run (default: <release>__<id>)")
    imported.set_defaults(run=_import_sae)
    return parser


def _attribute_parser(commands: argparse._SubParsersAction) -> None:
    attribute = commands.add_parser(
        "attribute", help="which latents, at which layers and positions, make the model predict a token (a circuit)"
    )
    where = attribute.add_argument_group("dictionaries")
    where.add_argument(
        "--run", dest="run_dir", help="a training run: its SAEs, its store (means) and its feature stores (labels)"
    )
    where.add_argument("--saes", nargs="+", metavar="NAME", help="only these SAEs of the run (one per hook)")
    where.add_argument("--sae", nargs="+", metavar="DIR", help="SAE or transcoder folders instead of a run")
    where.add_argument(
        "--store", help="an activation store of their model, for --evaluate's means (default: the run's)"
    )
    where.add_argument("--hooks", nargs="+", metavar="HOOK", help="only the dictionaries at these hooks")
    where.add_argument("--model", help="the model (default: the one the dictionaries were trained on)")
    what = attribute.add_argument_group("the metric")
    what.add_argument("--prompt", required=True, help="the text; BOS is prepended as the store's contexts have it")
    what.add_argument("--target", help="one token, e.g. ' Paris' (default: the model's top next token)")
    what.add_argument("--contrast", help="one token: the metric becomes logit(target) − logit(contrast)")
    what.add_argument("--position", type=int, default=-1, help="the position whose prediction (default -1, the last)")
    how = attribute.add_argument_group("attribution")
    how.add_argument("--method", choices=["atp", "ig", "exact"], default="atp", help="node effects (default atp)")
    how.add_argument("--steps", type=int, default=10, help="integrated gradients' steps (default 10)")
    how.add_argument(
        "--exact-errors", action="store_true", help="error and token nodes by exact ablation (few; far from linear)"
    )
    how.add_argument("--edges", action="store_true", help="also the edges between the graph's nodes")
    how.add_argument("--max-nodes", type=int, default=200, help="the most nodes a graph keeps (default 200)")
    how.add_argument("--prune", choices=["influence", "top", "threshold"], default="influence", help="node rule")
    how.add_argument("--node-threshold", type=float, help="influence/top: share kept (0.8); threshold: min |effect|")
    how.add_argument("--edge-threshold", type=float, help="influence/top: share kept (0.98); threshold: min |effect|")
    how.add_argument("--top-nodes", type=int, default=100, help="--prune top keeps this many nodes (default 100)")
    how.add_argument("--first-position", type=int, help="nodes start here (default: the store's first position)")
    how.add_argument("--evaluate", action="store_true", help="faithfulness and completeness by mean ablation")
    out = attribute.add_argument_group("output")
    out.add_argument("--top", type=int, default=20, help="nodes in the printed table (default 20)")
    out.add_argument("--slug", default="circuit", help="the graph's name (default circuit)")
    out.add_argument("--out", help="the graph file (default <run>/graphs/<slug>.json, or ./graphs/<slug>.json)")
    out.add_argument("--html", help="the figure (default: the graph file's name with .html)")
    out.add_argument("--device", default="auto", help="where the model runs (default auto)")
    attribute.set_defaults(run=_attribute)


_DISTRIBUTED_COMMANDS = ("harvest", "train")  # the commands that split their work over torchrun's ranks


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "doctor" and _distributed().launched():
        if args.command not in _DISTRIBUTED_COMMANDS:  # N copies would only race for the same files
            print(f"saelab {args.command}: error: runs in one process; start it without torchrun", file=sys.stderr)
            return 2
        signal.signal(signal.SIGTERM, _stopped_by_launcher)  # torchrun stops the other ranks when one fails
    try:
        args.run(args)
        _leave_process_group(together=True)  # a clean end: the ranks leave together
    except SaelabError as error:
        print(f"saelab {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"saelab {args.command}: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    except Exception as error:  # an allocator's failure is one line too; anything else is a bug: its traceback
        if (out_of_memory := out_of_memory_error(args.command, error)) is None:
            raise
        print(f"saelab {args.command}: error: {out_of_memory}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()
    return 0


def _leave_process_group(together: bool = False) -> None:
    """Leave torchrun's process group, if this process imported `saelab.distributed` (only then can it have
    joined one); `together` waits for every rank first (`distributed.shutdown`)."""
    if "saelab.distributed" in sys.modules:
        sys.modules["saelab.distributed"].shutdown(together)


def _stopped_by_launcher(signum: int, frame: object) -> None:
    raise SaelabError(
        f"rank {_distributed().rank()}: stopped by the launcher (SIGTERM), usually because another rank failed "
        "(the launcher's output names it); nothing unfinished is marked complete: rerun the same command to resume"
    )
