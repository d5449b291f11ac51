"""The circuits benchmark: how good are the node and edge estimates, how faithful are the circuits, what do they cost.

On the prompts of `benchmarks/circuit_prompts.jsonl` (three task families from the offline corpus, made by
`tools/circuit_prompts.py`) with the dictionaries of a run (default: the circuits run of
`configs/train-smollm2-circuits.yaml`, TopK SAEs at blocks 3, 9, 15, 21), metric logit(target) − logit(contrast):

    accuracy       per prompt, exact effects (one ablation each, batched) of the union of each method's 200
                   largest estimates and 200 active nodes drawn at random; Pearson r of atp and ig (10 steps)
                   against them; how many of the 20 largest exact effects each method ranks in its own top 20;
                   and edges: r of the linear edge effects against exact pair patching, on the 25 largest and
                   25 random edges among the 40 nodes of largest |atp|. Medians over prompts (and per family).
    faithfulness   per prompt, faithfulness and completeness of the top-N nodes by atp, ig and atp with exact
                   errors, N = 10 … 1000, beside 5 random circuits of each size (mean ablation to the run's
                   store means; part of the accuracy section's pass);
    features       the same with circuits of N features (a latent or error kept at all its positions, ranked by
                   its summed AtP effect), Marks et al.'s aggregation over positions.
    hooks          faithfulness of the top-N nodes by AtP with fewer dictionaries spliced in: the last alone,
                   the first alone, the last two (how much of the difficulty is carrying a circuit across cuts).
    cost           seconds and peak memory (RSS above the loaded model) of `attribute_circuit` per method, nodes
                   only and with edges (the 200 nodes a graph keeps); and how both grow with the prompt's
                   length (16, 64, 256 tokens) and with the number of hooks (1, 2, 4).
    page           the dashboard's Circuit page under Streamlit's AppTest: a first load (model and SAEs read)
                   and a new graph for a 64-token prompt, nodes only and with edges.

Each section's per-prompt results go to `--out` (one JSON line per prompt; a rerun skips what is there), the
tables to stdout. `--limit N` takes the first N prompts.

    python benchmarks/circuits.py [--run runs/smollm2-135m/circuits] [--sections accuracy features hooks cost page]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # dashboard_runs.py: the AppTest helpers

from saelab.circuits.attribution import exact_effects, node_effects  # noqa: E402
from saelab.circuits.edges import Edges, edge_effects, exact_edge_effects  # noqa: E402
from saelab.circuits.faithfulness import SIZES, evaluate_circuits  # noqa: E402
from saelab.circuits.job import CircuitRequest, attribute_circuit, prompt_tokens  # noqa: E402
from saelab.circuits.metric import resolve_metric  # noqa: E402
from saelab.circuits.nodes import ERROR, LATENT, TOKEN, enumerate_nodes  # noqa: E402
from saelab.circuits.sources import Dictionaries, circuit_means, run_dictionaries  # noqa: E402
from saelab.circuits.trace import trace_prompt  # noqa: E402
from saelab.harvest.corpus import default_entries, default_entry_text  # noqa: E402
from saelab.harvest.packing import text_token_ids  # noqa: E402
from saelab.models import load_model  # noqa: E402

SAMPLED, TOP = 200, 20
EDGE_NODES, EDGES_TOP, EDGES_RANDOM = 40, 25, 25
RANDOM_CIRCUITS = 5
LENGTHS = (16, 64, 256)


class PeakMemory:
    """The largest resident set size seen while the block runs, above what it was on entry (sampled every 5 ms)."""

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = _rss()
        self._running = True
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while self._running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def traced(model: Any, found: Dictionaries, item: dict) -> tuple:
    tokens = prompt_tokens(model, item["prompt"], found.model)

    def metric_for(logits: torch.Tensor) -> Any:
        return resolve_metric(model.tokenizer, logits, item["target"], item["contrast"])

    trace = trace_prompt(model, tokens, found.dictionaries, found.first_position, metric_for)
    return trace, enumerate_nodes(trace)


def accuracy_and_faithfulness(model: Any, found: Dictionaries, item: dict, means: list, seed: int) -> dict:
    """One prompt's numbers for the accuracy and faithfulness sections."""
    generator = torch.Generator().manual_seed(seed)
    trace, nodes = traced(model, found, item)
    estimates, seconds = {}, {}
    for name, steps in (("atp", 1), ("ig", 10)):
        clock = time.perf_counter()
        estimates[name] = node_effects(model, trace, nodes, name, steps=steps)
        seconds[name] = time.perf_counter() - clock
    large = (nodes.kind != LATENT).nonzero().flatten()  # errors and tokens: exact for all of them
    clock = time.perf_counter()
    exact_large = exact_effects(model, trace, nodes[large])
    seconds["exact errors and tokens"] = time.perf_counter() - clock
    for name in ("atp", "ig"):
        estimates[f"{name}+x"] = estimates[name].clone()
        estimates[f"{name}+x"][large] = exact_large
    tops = [e.abs().argsort(descending=True)[:SAMPLED] for e in estimates.values()]
    measured = torch.cat([*tops, torch.randperm(len(nodes), generator=generator)[:SAMPLED]]).unique()
    latents = measured[nodes.kind[measured] == LATENT]
    clock = time.perf_counter()
    exact = torch.zeros(len(nodes))
    exact[latents] = exact_effects(model, trace, nodes[latents])
    exact[large] = exact_large
    seconds["exact latents"] = time.perf_counter() - clock
    largest = set(measured[exact[measured].abs().argsort(descending=True)[:TOP]].tolist())
    row = {"family": item["family"], "n_tokens": trace.n_tokens, "n_nodes": len(nodes), "n_exact": len(measured)}
    row |= {"metric": trace.value, "seconds": seconds}
    for name, estimate in estimates.items():
        row[f"r_{name}"] = pearson(estimate[measured], exact[measured])
        row[f"top20_{name}"] = len(largest & set(estimate.abs().argsort(descending=True)[:TOP].tolist()))
    for kind, kind_name in ((LATENT, "latent"), (ERROR, "error"), (TOKEN, "token")):
        here = measured[nodes.kind[measured] == kind]
        for name in ("atp", "ig"):
            row[f"r_{name}_{kind_name}"] = pearson(estimates[name][here], exact[here])
    no_tokens = measured[nodes.kind[measured] != TOKEN]
    for name in ("atp", "ig"):
        row[f"r_{name}_no_tokens"] = pearson(estimates[name][no_tokens], exact[no_tokens])
    row |= edge_accuracy(model, trace, nodes, estimates["atp"], generator)
    for name in ("atp", "ig", "atp+x"):
        row[f"faithfulness_{name}"] = evaluate_circuits(
            model, trace, nodes, estimates[name], means, SIZES, RANDOM_CIRCUITS, seed=seed
        )
    return row


def feature_faithfulness(model: Any, found: Dictionaries, item: dict, means: list, seed: int) -> dict:
    """One prompt's faithfulness with circuits of features (a latent at all its positions) ranked by AtP."""
    trace, nodes = traced(model, found, item)
    effects = node_effects(model, trace, nodes, "atp")
    evaluation = evaluate_circuits(model, trace, nodes, effects, means, SIZES, RANDOM_CIRCUITS, seed=seed, by="feature")
    return {"family": item["family"], "faithfulness_atp": evaluation}


def hook_faithfulness(model: Any, found: Dictionaries, item: dict, means: list, seed: int) -> dict:
    """One prompt's faithfulness of the top-N nodes by AtP with fewer dictionaries: the last alone, the first
    alone, the last two (each a circuit of its own: nodes of the other hooks are not spliced in)."""
    row = {"family": item["family"]}
    last = len(found.dictionaries) - 1
    for hooks in ([last], [0], [last - 1, last]):
        subset = Dictionaries([found.dictionaries[k] for k in hooks], found.model, found.store, found.first_position)
        trace, nodes = traced(model, subset, item)
        effects = node_effects(model, trace, nodes, "atp")
        name = "+".join(found.dictionaries[k].label for k in hooks)
        row[name] = evaluate_circuits(
            model, trace, nodes, effects, [means[k] for k in hooks], SIZES, RANDOM_CIRCUITS, seed=seed
        )
    return row


def edge_accuracy(model: Any, trace: Any, nodes: Any, atp: torch.Tensor, generator: torch.Generator) -> dict:
    """r of linear edges against exact pair patching on a sample of the edges among the top nodes."""
    scores = torch.where(nodes.kind == TOKEN, torch.zeros_like(atp), atp.abs())
    kept = torch.cat([scores.argsort(descending=True)[:EDGE_NODES], (nodes.kind == TOKEN).nonzero().flatten()])
    clock = time.perf_counter()
    edges = edge_effects(model, trace, nodes, kept.unique())
    seconds = time.perf_counter() - clock
    nonzero = (edges.effect != 0).nonzero().flatten()
    ranked = nonzero[edges.effect[nonzero].abs().argsort(descending=True)]
    rest = ranked[EDGES_TOP:]
    sample = torch.cat([ranked[:EDGES_TOP], rest[torch.randperm(len(rest), generator=generator)[:EDGES_RANDOM]]])
    picked = Edges(edges.source[sample], edges.target[sample], edges.effect[sample])
    exact = exact_edge_effects(model, trace, nodes, picked, fraction=1.0)
    return {"r_edges": pearson(picked.effect, exact), "n_edges": len(edges), "edge_seconds": seconds}


def cost_rows(model: Any, found: Dictionaries, path: Path) -> list[dict]:
    """Seconds and peak memory of `attribute_circuit` by method, edges, prompt length and number of hooks; each
    row is appended to `path` as it is measured, and a rerun measures only the settings not there yet."""
    text = long_code_prompt(model.tokenizer)
    rows = done_rows(path)
    done = {(r["tokens"], r["hooks"], r["method"], r["edges"]) for r in rows}
    full = list(range(len(found.dictionaries)))
    settings = [(n, method, edges, full) for n in LENGTHS for method in ("atp", "ig") for edges in (False, True)]
    settings += [(64, "atp", edges, hooks) for edges in (False, True) for hooks in ([full[-1]], full[-2:])]
    for n_tokens, method, edges, hooks in settings:
        if n_tokens == 256 and method == "ig" and edges:
            continue  # the 256-token row with edges is atp's; ig adds its nodes-only cost (the row above)
        if (n_tokens, len(hooks), method, edges) in done:
            continue
        folders = {i: found.folders[k] for i, k in enumerate(hooks) if k in found.folders}  # labels are read too
        subset = Dictionaries(
            [found.dictionaries[k] for k in hooks], found.model, found.store, found.first_position, folders
        )
        prompt = model.tokenizer.decode(text[: n_tokens - 1])
        request = CircuitRequest(prompt, method=method, edges=edges)
        with PeakMemory() as memory:
            clock, cpu = time.perf_counter(), time.process_time()
            circuit = attribute_circuit(model, subset, request)
            seconds, cpu = time.perf_counter() - clock, time.process_time() - cpu
        rows.append(
            {
                "tokens": circuit.trace.n_tokens,
                "hooks": len(hooks),
                "method": method,
                "edges": edges,
                "seconds": seconds,
                "cpu_seconds": cpu,  # the wall clock counts the other jobs sharing the cores; this does not
                "peak_mib": memory.mib,
                "nodes": int((circuit.nodes.kind != TOKEN).sum()),
                "parts": circuit.seconds,
            }
        )
        with path.open("a") as file:
            file.write(json.dumps(rows[-1]) + "\n")
        print(f"  cost: {rows[-1]}", flush=True)
    return rows


def long_code_prompt(tokenizer: Any) -> list[int]:
    """The first stdlib file of the corpus with at least 300 tokens, as token ids."""
    for kind, name in default_entries(0):
        if kind == "file":
            ids = text_token_ids(default_entry_text(kind, name), tokenizer)
            if len(ids) >= 300:
                return ids
    raise RuntimeError("no stdlib file of 300 tokens")


def page_seconds(run: Path, model: Any) -> dict:
    """The Circuit page under AppTest, 64 tokens: the first graph of a dashboard process (the model and the SAEs are
    read), then new graphs, nodes only and with edges (the page's 60 nodes)."""
    from dashboard_runs import open_page

    os.environ["SAELAB_RUNS"] = str(run.parent.parent)
    prompt = model.tokenizer.decode(long_code_prompt(model.tokenizer)[:63])
    timings = {}
    for name, edges in (
        ("first load + graph, nodes only", False),
        ("graph, nodes only", False),
        ("graph, edges", True),
    ):
        clock, cpu = time.perf_counter(), time.process_time()
        at = open_page("circuit", run=f"{run.parent.name}/{run.name}")
        at.text_area(key="circuit_prompt").set_value(prompt)
        at.checkbox(key="circuit_edges").set_value(edges)
        next(b for b in at.button if b.label == "Attribute").click().run()
        assert not at.exception, [e.value for e in at.exception]
        timings[name] = {"seconds": time.perf_counter() - clock, "cpu_seconds": time.process_time() - cpu}
        print(
            f"  page: {name}: {timings[name]['seconds']:.1f} s ({timings[name]['cpu_seconds']:.1f} s CPU)", flush=True
        )
    return timings


def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    for line in [header, *rows]:
        print("  " + "  ".join(str(cell).rjust(width) for cell, width in zip(line, widths, strict=True)))


def _median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r[key] == r[key]]  # NaN (a constant estimate) left out
    return statistics.median(values) if values else float("nan")


def report_accuracy(rows: list[dict]) -> None:
    print(f"\naccuracy against exact ablation: Pearson r and top-20 overlap per prompt, medians ({len(rows)} prompts)")
    print("  +x: errors and tokens by exact ablation, latents by the estimate (--exact-errors)")
    families = sorted({r["family"] for r in rows})
    groups = {"all": rows} | {f: [r for r in rows if r["family"] == f] for f in families}
    methods = ("atp", "ig", "atp+x", "ig+x")
    lines = [
        [name, str(len(group))]
        + [f"{_median(group, f'r_{m}'):.3f}" for m in methods]
        + [f"{_median(group, f'top20_{m}'):.0f}" for m in methods]
        + [f"{_median(group, 'r_edges'):.3f}"]
        for name, group in groups.items()
    ]
    header = ["family", "prompts", *(f"r {m}" for m in methods), *(f"top20 {m}" for m in methods), "r edges"]
    table(lines, header)
    print("\n  by node kind (all prompts): Pearson r of each estimate against exact, medians")
    kinds = ("latent", "error", "token", "no_tokens")
    lines = [[m, *(f"{_median(rows, f'r_{m}_{kind}'):.3f}" for kind in kinds)] for m in ("atp", "ig")]
    table(lines, ["method", "latents", "errors", "tokens", "all but tokens"])


def report_faithfulness(rows: list[dict]) -> None:
    print(f"\nfaithfulness and completeness by mean ablation, medians ({len(rows)} prompts)")
    rankings = ("atp", "ig", "atp+x")
    lines = []
    for index, size in enumerate(SIZES):
        cells = [str(size)]
        for name in rankings:
            for key in ("faithfulness", "completeness"):
                cells.append(_median_at(rows, f"faithfulness_{name}", key, index))
        cells.append(_median_at(rows, "faithfulness_atp", "random_faithfulness", index))
        lines.append(cells)
    every = [r["faithfulness_atp"]["all_nodes"] for r in rows if r["faithfulness_atp"]["all_nodes"] is not None]
    lines.append(["all", f"{statistics.median(every):.3f}", *["—"] * 6])
    header = ["N", *(f"{k} {r}" for r in rankings for k in ("faithful", "complete")), f"random ×{RANDOM_CIRCUITS}"]
    table(lines, header)


def _median_at(rows: list[dict], ranking: str, key: str, index: int) -> str:
    values = [r[ranking][key][index] for r in rows if index < len(r[ranking][key])]
    values = [v for v in values if v is not None]
    return f"{statistics.median(values):.3f}" if values else "—"


def report_feature_faithfulness(rows: list[dict]) -> None:
    what = "circuits of features (a latent or error at all its positions), ranked by AtP"
    print(f"\nfaithfulness of {what}, medians ({len(rows)} prompts)")
    lines = []
    for index, size in enumerate(SIZES):
        nodes = [
            r["faithfulness_atp"]["circuit_nodes"][index] for r in rows if index < len(r["faithfulness_atp"]["sizes"])
        ]
        cells = [str(size), f"{statistics.median(nodes):.0f}" if nodes else "—"]
        for key in ("faithfulness", "completeness", "random_faithfulness"):
            cells.append(_median_at(rows, "faithfulness_atp", key, index))
        lines.append(cells)
    table(lines, ["features", "nodes", "faithful", "complete", f"random ×{RANDOM_CIRCUITS}"])


def report_hook_faithfulness(rows: list[dict]) -> None:
    print(f"\nfaithfulness of the top-N nodes by AtP with fewer dictionaries, medians ({len(rows)} prompts)")
    names = [key for key in rows[0] if key != "family"]
    lines = []
    for index, size in enumerate(SIZES):
        cells = [str(size)]
        for name in names:
            cells += [
                _median_at(rows, name, "faithfulness", index),
                _median_at(rows, name, "random_faithfulness", index),
            ]
        lines.append(cells)
    every = [f"{statistics.median(r[name]['all_nodes'] for r in rows):.3f}" for name in names]
    lines.append(["all", *(cell for value in every for cell in (value, "—"))])
    nodes = [f"{statistics.median(r[name]['n_nodes'] for r in rows):.0f}" for name in names]
    lines.append(["nodes", *(cell for value in nodes for cell in (value, "—"))])
    table(lines, ["N", *(f"{k} {name}" for name in names for k in ("faithful", "random"))])


def report_cost(rows: list[dict]) -> None:
    print("\ncost per prompt on this machine's CPU (attribute_circuit end to end; peak RSS above the loaded model)")
    lines = [
        [
            str(r["tokens"]),
            str(r["hooks"]),
            r["method"],
            "yes" if r["edges"] else "no",
            str(r["nodes"]),
            f"{r['seconds']:.1f}",
            f"{r['cpu_seconds']:.1f}" if "cpu_seconds" in r else "—",
            f"{r['peak_mib']:.0f}",
        ]
        for r in rows
    ]
    table(lines, ["tokens", "hooks", "method", "edges", "nodes", "seconds", "CPU s", "peak MiB"])


def _turn(items: list[dict], index: int) -> tuple[int, str]:
    """(the prompt's rank within its family, its family): sorting by it takes the families in turn."""
    family = items[index]["family"]
    return sum(item["family"] == family for item in items[:index]), family


def done_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def measured_rows(path: Path, items: list[dict], measure: Callable[[dict, int], dict]) -> list[dict]:
    """`measure(item, index)` of every item, each row appended to `path` as it is measured: a rerun measures
    only the items after the rows already there."""
    rows = done_rows(path)
    for index, item in enumerate(items[len(rows) :], start=len(rows)):
        rows.append(measure(item, index))
        with path.open("a") as file:
            file.write(json.dumps(rows[-1]) + "\n")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(REPO / "runs" / "smollm2-135m" / "circuits"))
    parser.add_argument("--prompts", default=str(REPO / "benchmarks" / "circuit_prompts.jsonl"))
    parser.add_argument("--limit", type=int)
    parser.add_argument("--out", default=str(REPO / "runs" / "circuits-benchmark"))
    sections = ["accuracy", "features", "hooks", "cost", "page"]
    parser.add_argument("--sections", nargs="+", default=sections, choices=sections)
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    found = run_dictionaries(args.run)
    model = load_model(found.model, "cpu")
    labels = ", ".join(d.label for d in found.dictionaries)
    print(f"{args.run}: {labels} on {found.model}; nodes from position {found.first_position}")
    if "accuracy" in args.sections:
        items = [json.loads(line) for line in Path(args.prompts).read_text().splitlines()][: args.limit]
        means = circuit_means(found)

        def accuracy(item: dict, index: int) -> dict:
            clock = time.perf_counter()
            row = accuracy_and_faithfulness(model, found, item, means, seed=index)
            print(
                f"  prompt {index} ({item['family']}, {row['n_tokens']} tokens): r atp {row['r_atp']:.3f}, r ig "
                f"{row['r_ig']:.3f}, r edges {row['r_edges']:.3f} ({time.perf_counter() - clock:.0f} s)",
                flush=True,
            )
            return row

        rows = measured_rows(out / "accuracy.jsonl", items, accuracy)
        report_accuracy(rows)
        report_faithfulness(rows)
    if "features" in args.sections:
        items = [json.loads(line) for line in Path(args.prompts).read_text().splitlines()][: args.limit]
        means = circuit_means(found)

        def by_feature(item: dict, index: int) -> dict:
            return feature_faithfulness(model, found, item, means, seed=index)

        report_feature_faithfulness(measured_rows(out / "features.jsonl", items, by_feature))
    if "hooks" in args.sections:  # families taken in turn, so that a part of the prompts is a fair sample
        items = [json.loads(line) for line in Path(args.prompts).read_text().splitlines()]
        items = [item for _, item in sorted(enumerate(items), key=lambda pair: _turn(items, pair[0]))][: args.limit]
        means = circuit_means(found)

        def hooks(item: dict, index: int) -> dict:
            row = hook_faithfulness(model, found, item, means, seed=index)
            print(f"  prompt {index}: hooks done", flush=True)
            return row

        report_hook_faithfulness(measured_rows(out / "hooks.jsonl", items, hooks))
    if "cost" in args.sections:
        report_cost(cost_rows(model, found, out / "cost.jsonl"))
    if "page" in args.sections:
        timings = page_seconds(Path(args.run), model)
        (out / "page.json").write_text(json.dumps(timings, indent=1))


if __name__ == "__main__":
    main()
