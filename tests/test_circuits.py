"""Circuits: the spliced model is the model; AtP, integrated gradients and edges against finite differences, exact
patching and brute-force hooks on a tiny random Llama with four dictionaries (a TopK SAE, a transcoder, a
layer-normalised BatchTopK SAE, a TopK SAE); pruning, mean-ablation faithfulness and the graph file against hand
computations and the schema; bad input in one line; and every path once on the real SmolLM2 (CLI and page)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jsonschema
import pytest
import torch

from saelab.circuits.attribution import exact_effects, node_effects
from saelab.circuits.dictionaries import Dictionary, sort_dictionaries, split_activation
from saelab.circuits.edges import METRIC, Edges, edge_effects, exact_edge_effects
from saelab.circuits.faithfulness import evaluate_circuits
from saelab.circuits.graph import build_graph, graph_schema
from saelab.circuits.means import NodeMeans
from saelab.circuits.metric import Metric
from saelab.circuits.nodes import ERROR, LATENT, TOKEN, TOKENS, Nodes, enumerate_nodes, vectors
from saelab.circuits.pruning import Pruning, drop_dangling, keep_nodes, prune, smallest_covering
from saelab.circuits.splice import spliced_logits
from saelab.circuits.trace import trace_prompt
from saelab.sae.config import SAEConfig
from saelab.sae.registry import build_sae

TARGET, CONTRAST = 1234, 4321
TOKENS_IDS = [1, 504, 2611, 30, 9120, 17, 777, 4040, 321, 88, 5000]


def random_dictionary(architecture: str, hook: str, seed: int, **fields) -> Dictionary:
    """An SAE (or transcoder) of the tiny model with random weights and biases, none of them trivial."""
    generator = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(architecture=architecture, d_in=32, d_sae=64, k=6, hook_name=hook, **fields)
    sae = build_sae(cfg, generator)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(32, 64, generator=generator))
        sae.b_enc.copy_(0.1 * torch.randn(64, generator=generator))
        sae.b_dec.copy_(0.02 * torch.randn(sae.b_dec.shape, generator=generator))
        sae.W_dec.mul_(0.05)
        sae.input_scale.fill_(20.0)
    return Dictionary(f"{architecture}-{seed}", sae.eval())


@pytest.fixture(scope="module")
def dictionaries() -> list[Dictionary]:
    mlp = {"hook_name_out": "blocks.1.hook_mlp_out", "l1_coefficient": 1.0}
    return sort_dictionaries(
        [
            random_dictionary("topk", "blocks.2.hook_resid_post", 4),
            random_dictionary("batchtopk", "blocks.1.hook_resid_post", 3),  # layer_norm by default
            random_dictionary("transcoder", "blocks.1.hook_resid_mid", 2, **mlp),
            random_dictionary("topk", "blocks.0.hook_resid_post", 1),
        ]
    )


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.tensor([TOKENS_IDS])


def logit_diff(logits: torch.Tensor) -> Metric:
    return Metric(TARGET, logits.shape[1] - 1, CONTRAST)


@pytest.fixture(scope="module")
def traced(tiny_model, dictionaries, tokens):
    trace = trace_prompt(tiny_model, tokens, dictionaries, 1, logit_diff)
    return trace, enumerate_nodes(trace)


def brute_metric(model, tokens: torch.Tensor, edits: dict[str, tuple[int, torch.Tensor]]) -> float:
    """logit(target) − logit(contrast) with `edits[hook] = (position, vector)` added, by plain hooks."""

    def add(position: int, vector: torch.Tensor):
        def hook(x, hook):
            x = x.clone()
            x[0, position] += vector.to(x.dtype)
            return x

        return hook

    with torch.no_grad(), model.hooks(fwd_hooks=[(name, add(*edit)) for name, edit in edits.items()]):
        logits = model(tokens)[0, -1]
    return float(logits[TARGET] - logits[CONTRAST])


def activations(model, tokens: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    _, cache = model.run_with_cache(tokens, names_filter=names, return_cache_object=False)
    return {name: cache[name][0] for name in names}


def node_vector(model, tokens, dictionaries, nodes: Nodes, index: int) -> tuple[str, torch.Tensor]:
    """(hook, what node `index` adds there), computed from the SAE itself, not from a trace."""
    kind, site, t, latent = nodes.key(index)
    if site == TOKENS:
        return "hook_embed", activations(model, tokens, ["hook_embed"])["hook_embed"][t]
    d = dictionaries[site]
    seen = activations(model, tokens, [d.reads, d.writes])
    x, y = seen[d.reads][t : t + 1], seen[d.writes][t : t + 1]
    norm = d.sae.token_norm(x)
    z = d.sae.encode(x, norm=norm)
    out_norm = d.sae.output_norm(norm)
    if kind == LATENT:
        return d.writes, out_norm.direction(z[0, latent] * d.sae.W_dec[latent]).reshape(-1)
    reconstruction = d.sae(x).reconstruction
    return d.writes, (y - reconstruction)[0]


# ---- splicing ---------------------------------------------------------------------------------------


def test_splicing_with_errors_leaves_the_logits_unchanged_and_the_nodes_rebuild_each_hook(
    tiny_model, dictionaries, tokens, traced
):
    with torch.no_grad():
        bare = tiny_model(tokens)
    spliced = spliced_logits(tiny_model, tokens, dictionaries, first=1)
    assert (spliced - bare).abs().max() <= 1e-5
    trace, nodes = traced
    assert trace.value == pytest.approx(float(bare[0, -1, TARGET] - bare[0, -1, CONTRAST]), abs=1e-5)
    for state, d in zip(trace.states, dictionaries, strict=True):
        rebuilt = state.base + state.decode(state.latents, d.sae.W_dec) + state.error  # base + zW/c + ε is y
        torch.testing.assert_close(rebuilt, state.output, atol=1e-5, rtol=0)
        assert (state.latents[0] == 0).all() and (state.error[0] == 0).all()  # the BOS is not a node
    assert set(nodes.kind.tolist()) == {LATENT, ERROR, TOKEN} and set(nodes.site.tolist()) == {-1, 0, 1, 2, 3}
    assert not dictionaries[1].is_cut and dictionaries[0].is_cut and dictionaries[2].is_cut  # the transcoder


# ---- node effects ------------------------------------------------------------------------------------


def sample(nodes: Nodes, per_site: int = 3) -> list[int]:
    """A few latents and errors of every dictionary and a few tokens, from the last positions (the first ones
    of the last hook cannot reach the metric: their effects are 0)."""
    picked = []
    for site in nodes.site.unique().tolist():
        for kind in (LATENT, ERROR, TOKEN):
            found = ((nodes.site == site) & (nodes.kind == kind)).nonzero().flatten()
            picked += found[-per_site:].tolist()
    return picked


def test_atp_is_the_derivative_of_the_metric_along_each_node(tiny_model, dictionaries, tokens, traced):
    trace, nodes = traced
    atp = node_effects(tiny_model, trace, nodes, "atp")
    step = 1e-2
    for index in sample(nodes):
        hook, vector = node_vector(tiny_model, tokens, dictionaries, nodes, index)
        t = int(nodes.position[index])
        down, up = (brute_metric(tiny_model, tokens, {hook: (t, sign * step * vector)}) for sign in (-1, 1))
        assert atp[index] == pytest.approx((down - up) / (2 * step), abs=2e-3 * atp.abs().max().item())


def test_exact_effects_are_one_ablation_each(tiny_model, dictionaries, tokens, traced):
    trace, nodes = traced
    picked = torch.tensor(sample(nodes, 2))
    exact = exact_effects(tiny_model, trace, nodes[picked])
    clean = brute_metric(tiny_model, tokens, {})
    for index, effect in zip(picked.tolist(), exact.tolist(), strict=True):
        hook, vector = node_vector(tiny_model, tokens, dictionaries, nodes, index)
        ablated = brute_metric(tiny_model, tokens, {hook: (int(nodes.position[index]), -vector)})
        assert effect == pytest.approx(ablated - clean, abs=1e-4)
        torch.testing.assert_close(vectors(trace, nodes[torch.tensor([index])])[0], vector, atol=1e-5, rtol=1e-4)


def test_integrated_gradients_with_one_step_are_atp_and_with_more_are_not(tiny_model, traced):
    trace, nodes = traced
    atp = node_effects(tiny_model, trace, nodes, "atp")
    torch.testing.assert_close(node_effects(tiny_model, trace, nodes, "ig", steps=1), atp, atol=1e-6, rtol=1e-5)
    assert (node_effects(tiny_model, trace, nodes, "ig", steps=5) - atp).abs().max() > 1e-3


def test_integrated_gradients_are_exact_when_the_model_is_linear_in_the_nodes(tiny_model, dictionaries, tokens):
    """With the final norm's scale frozen the logits are linear in the last residual stream, so the metric is
    linear in the last dictionary's nodes: every estimate must equal the exact effect there, and only there."""
    scale = activations(tiny_model, tokens, ["ln_final.hook_scale"])["ln_final.hook_scale"][-1]

    def frozen(x, hook):
        return scale.expand(*x.shape[:-1], 1)

    last = 3
    with warnings.catch_warnings(), tiny_model.hooks(fwd_hooks=[("ln_final.hook_scale", frozen)]):
        warnings.simplefilter("ignore")  # the bridge notes that an edited scale leaves its native path
        trace = trace_prompt(tiny_model, tokens, dictionaries, 1, logit_diff)
        nodes = enumerate_nodes(trace)
        exact = node_effects(tiny_model, trace, nodes, "exact")
        ig = node_effects(tiny_model, trace, nodes, "ig", steps=4)
        atp = node_effects(tiny_model, trace, nodes, "atp")
    here = nodes.site == last
    torch.testing.assert_close(ig[here], exact[here], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(atp[here], exact[here], atol=2e-5, rtol=1e-4)
    assert (ig[~here] - exact[~here]).abs().max() > 1e-3  # upstream of the blocks the model is not linear


# ---- edges -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_edges(tiny_model, traced) -> Edges:
    trace, nodes = traced
    return edge_effects(tiny_model, trace, nodes, torch.arange(len(nodes)))


def test_the_edges_out_of_a_node_sum_to_its_effect(tiny_model, traced, all_edges):
    trace, nodes = traced
    atp = node_effects(tiny_model, trace, nodes, "atp")
    outgoing = torch.zeros(len(nodes)).index_add_(0, all_edges.source, all_edges.effect)
    torch.testing.assert_close(outgoing, atp, atol=1e-6, rtol=1e-4)
    targets = {
        (int(nodes.site[s]), -9 if t == METRIC else int(nodes.site[t]))
        for s, t in zip(all_edges.source, all_edges.target, strict=True)
    }
    # tokens → 0; 0 → the transcoder and past it to 2; 2 → 3; 3 → the metric: nothing else
    assert targets == {(-1, 0), (0, 1), (0, 2), (1, 2), (2, 3), (3, -9)}


def test_edges_are_the_derivatives_of_brute_force_pair_patching(tiny_model, dictionaries, tokens, traced, all_edges):
    """Pair patching by hand: take a little of u away with every node between u and d held at its clean
    value (the transcoder's output), read d's new value, patch only that into the clean pass."""
    trace, nodes = traced
    fraction = 1e-2
    seen = activations(tiny_model, tokens, ["blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"])
    checked = 0
    for e in torch.randperm(len(all_edges), generator=torch.Generator().manual_seed(0)).tolist():
        source, target = int(all_edges.source[e]), int(all_edges.target[e])
        if nodes.site[source] != 0 or target == METRIC or nodes.site[target] != 2:
            continue
        hook, vector = node_vector(tiny_model, tokens, dictionaries, nodes, source)
        moved = _downstream_after(
            tiny_model, tokens, dictionaries[2], hook, int(nodes.position[source]), fraction * vector, seen
        )
        kind, _, t, latent = nodes.key(target)
        state = trace.states[2]
        if kind == LATENT:
            delta = (
                (moved[0][t, latent] - state.latents[t, latent]) * dictionaries[2].sae.W_dec[latent] / state.scale[t]
            )
        else:
            delta = moved[1][t] - state.error[t]
        patched = brute_metric(tiny_model, tokens, {"blocks.1.hook_resid_post": (t, delta)}) - trace.value
        assert patched / fraction == pytest.approx(
            float(all_edges.effect[e]), abs=5e-3 * all_edges.effect.abs().max().item()
        )
        checked += 1
        if checked == 6:
            break
    assert checked == 6
    largest = all_edges.effect.abs().argsort(descending=True)[:200]
    chosen = largest[torch.randperm(200, generator=torch.Generator().manual_seed(1))[:40]]
    sub = Edges(all_edges.source[chosen], all_edges.target[chosen], all_edges.effect[chosen])
    derivative = exact_edge_effects(tiny_model, trace, nodes, sub, fraction=fraction)
    torch.testing.assert_close(derivative, sub.effect, atol=5e-3 * all_edges.effect.abs().max().item(), rtol=0.05)


def _downstream_after(model, tokens, dictionary, hook, position, removed, seen):
    """dictionary's (latents, error) on a pass with `removed` taken from `hook` at `position` and the
    transcoder's output held at its clean value."""
    held = seen["blocks.1.hook_mlp_out"]
    captured = {}

    def take(x, hook):
        x = x.clone()
        x[0, position] -= removed
        return x

    def hold(x, hook):
        return held[None].to(x.dtype)

    def read(x, hook):
        captured["x"] = x[0]
        return x

    with (
        torch.no_grad(),
        model.hooks(fwd_hooks=[(hook, take), ("blocks.1.hook_mlp_out", hold), ("blocks.1.hook_resid_post", read)]),
    ):
        model(tokens)
    clean = split_activation(dictionary, seen["blocks.1.hook_resid_post"], seen["blocks.1.hook_resid_post"], 1)
    state = split_activation(dictionary, captured["x"], captured["x"], 1, clean)
    return state.latents, state.error


# ---- pruning, faithfulness, the graph file ---------------------------------------------------------


def hand_nodes(kinds: list[int], sites: list[int]) -> Nodes:
    n = len(kinds)
    return Nodes(
        torch.tensor(kinds), torch.tensor(sites), torch.arange(n), torch.zeros(n, dtype=torch.long), torch.ones(n)
    )


def test_pruning_keeps_the_fewest_nodes_covering_the_share_and_drops_dangling_ones():
    scores = torch.tensor([5.0, 1.0, 3.0, 0.5, 0.5, 0.0])
    assert smallest_covering(scores, 0.8).tolist() == [True, False, True, False, False, False]  # 8 of 10
    assert smallest_covering(scores, 0.81).tolist() == [True, True, True, False, False, False]
    nodes = hand_nodes([LATENT, LATENT, ERROR, LATENT, TOKEN], [0, 1, 1, 2, TOKENS])
    effects = torch.tensor([-4.0, 3.0, 2.0, 0.1, 9.0])
    assert keep_nodes(nodes, effects, Pruning("influence")).tolist() == [True, True, True, False, True]
    assert keep_nodes(nodes, effects, Pruning("top", top_nodes=1)).tolist() == [True, False, False, False, True]
    assert keep_nodes(nodes, effects, Pruning("threshold", 2.5)).tolist() == [True, True, False, False, True]
    # token 4 → latent 0 → latent 1 → metric; error 2 → latent 1; latent 3 has no way out
    edges = Edges(
        torch.tensor([4, 0, 1, 2, 3]), torch.tensor([0, 1, METRIC, 1, 1]), torch.tensor([1.0, 1, 1, 1, 0.001])
    )
    kept, kept_edges = drop_dangling(nodes, torch.ones(5, dtype=torch.bool), edges, torch.tensor([True] * 4 + [False]))
    assert kept.tolist() == [True, True, True, False, True] and kept_edges.tolist() == [True] * 4 + [False]
    kept, _ = drop_dangling(
        nodes, torch.ones(5, dtype=torch.bool), edges, torch.tensor([False, True, True, True, False])
    )
    assert kept.tolist() == [False, True, True, False, True]  # latent 0 lost its only input: it goes, and stays gone
    kept, kept_edges = prune(nodes, effects, edges, Pruning("influence", 0.99, 0.5))
    assert kept_edges.sum() >= 1 and kept[4]


def hand_ablation(model, tokens, dictionaries, keep: dict[int, tuple[torch.Tensor, torch.Tensor]], means) -> float:
    """F with the nodes outside `keep` (per dictionary: latents kept [T, d_sae], errors kept [T]) at their means,
    each hook's nodes recomputed from what reaches it."""

    def splice(k: int, d: Dictionary, seen: dict):
        def hook(y, hook):
            x = y if d.reads == d.writes else seen[d.reads]
            state = split_activation(d, x[0], y[0], 1)
            latents_kept, errors_kept = keep[k]
            z = torch.where(latents_kept, state.latents, means[k].latents)
            z[0] = state.latents[0]
            error = torch.where(errors_kept[:, None], state.error, means[k].error)
            error[0] = state.error[0]
            return state.with_nodes(z, error, d.sae.W_dec)[None]

        return hook

    seen = {}

    def remember(name):
        def hook(x, hook):
            seen[name] = x
            return x

        return hook

    hooks = [("blocks.1.hook_resid_mid", remember("blocks.1.hook_resid_mid"))]
    hooks += [(d.writes, splice(k, d, seen)) for k, d in enumerate(dictionaries)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(tokens)[0, -1]
    return float(logits[TARGET] - logits[CONTRAST])


def test_faithfulness_and_completeness_are_mean_ablations(tiny_model, dictionaries, tokens, traced):
    trace, nodes = traced
    generator = torch.Generator().manual_seed(5)
    zero = [NodeMeans(torch.zeros(64), torch.zeros(32)) for _ in dictionaries]
    effects = node_effects(tiny_model, trace, nodes, "atp")
    result = evaluate_circuits(tiny_model, trace, nodes, effects, zero, sizes=(10**6,), random_draws=1)
    assert result["faithfulness"][0] == pytest.approx(1.0, abs=1e-4)  # every node kept, the rest at 0: the model

    means = [
        NodeMeans(0.3 * torch.rand(64, generator=generator), 0.01 * torch.randn(32, generator=generator))
        for _ in dictionaries
    ]
    result = evaluate_circuits(tiny_model, trace, nodes, effects, means, sizes=(5, 20), random_draws=2)
    shape = (len(TOKENS_IDS), 64), (len(TOKENS_IDS),)
    top = {k: (torch.zeros(shape[0], dtype=torch.bool), torch.zeros(shape[1], dtype=torch.bool)) for k in range(4)}
    empty = hand_ablation(tiny_model, tokens, dictionaries, top, means)
    assert result["metric_empty"] == pytest.approx(empty, abs=1e-5)
    ranked = (nodes.kind != TOKEN).nonzero().flatten()
    for index in ranked[effects[ranked].abs().argsort(descending=True)][:5].tolist():
        kind, site, t, latent = nodes.key(index)
        if kind == LATENT:
            top[site][0][t, latent] = True
        else:
            top[site][1][t] = True
    kept = hand_ablation(tiny_model, tokens, dictionaries, top, means)
    rest = {k: (~latents, ~errors) for k, (latents, errors) in top.items()}
    removed = hand_ablation(tiny_model, tokens, dictionaries, rest, means)
    assert result["faithfulness"][0] == pytest.approx((kept - empty) / (trace.value - empty), abs=1e-4)
    assert result["completeness"][0] == pytest.approx((removed - empty) / (trace.value - empty), abs=1e-4)
    assert result["sizes"] == [5, 20] and len(result["random_faithfulness"]) == 2
    assert result["faithfulness"] != result["random_faithfulness"]

    # circuits of features: a latent (or an error) at every position it is a node at, by its summed effect
    features = evaluate_circuits(
        tiny_model, trace, nodes, effects, means, sizes=(1, 10**6), random_draws=1, by="feature"
    )
    assert features["circuit_nodes"][-1] == result["n_nodes"] and features["faithfulness"][-1] == pytest.approx(
        result["all_nodes"], abs=1e-6
    )
    candidates = nodes.kind != TOKEN
    sums: dict = {}
    for index in candidates.nonzero().flatten().tolist():
        key = (int(nodes.site[index]), int(nodes.latent[index]))
        sums[key] = sums.get(key, 0.0) + float(effects[index])
    best = max(sums, key=lambda key: abs(sums[key]))
    members = ((nodes.site == best[0]) & (nodes.latent == best[1]) & candidates).sum()
    assert features["circuit_nodes"][0] == members


def test_the_graph_file_validates_against_the_schema_and_a_broken_one_does_not(tiny_model, traced, all_edges):
    trace, nodes = traced
    effects = node_effects(tiny_model, trace, nodes, "atp")
    kept, kept_edges = prune(nodes, effects, all_edges, Pruning("influence"))
    info = {
        "prompt": "x",
        "model": "tiny",
        "method": "atp",
        "metric": {"kind": "logit_diff", "target": "a", "target_id": TARGET, "position": 10, "value": trace.value},
        "dictionaries": [
            {"label": d.label, "reads": d.reads, "writes": d.writes, "kind": d.kind, "layer": "1"}
            for d in trace.dictionaries
        ],
        "first_position": 1,
    }
    graph = build_graph(trace, nodes, effects, kept, all_edges, kept_edges, tiny_model.tokenizer, info)
    jsonschema.validate(json.loads(json.dumps(graph)), graph_schema())
    ids = [node["node_id"] for node in graph["nodes"]]
    assert len(ids) == len(set(ids)) and graph["links"]
    assert all(link["source"] in ids and link["target"] in ids for link in graph["links"])
    layers = {node["layer"] for node in graph["nodes"]}
    assert {"E", "0", "1", "1.1", "2"} <= layers  # the transcoder and the SAE of block 1 get their own rows
    types = {node["feature_type"] for node in graph["nodes"]}
    assert {"embedding", "cross layer transcoder", "logit"} <= types
    del graph["nodes"][0]["jsNodeId"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(graph, graph_schema())


def test_a_node_edit_through_steer_is_the_exact_effect(tiny_model, dictionaries, tokens, traced):
    from saelab.steer import NodeEdit, steer

    trace, nodes = traced
    picked = [i for i in sample(nodes, 2) if nodes.site[i] == 2]
    exact = exact_effects(tiny_model, trace, nodes[torch.tensor(picked)])
    for index, effect in zip(picked, exact.tolist(), strict=True):
        kind, site, t, latent = nodes.key(index)
        edit = NodeEdit(
            dictionaries[site].writes, sae=dictionaries[site].sae, nodes={(t, latent if kind == LATENT else None): 0.0}
        )
        with torch.no_grad(), steer(tiny_model, [edit]):
            logits = tiny_model(tokens)[0, -1]
        assert float(logits[TARGET] - logits[CONTRAST]) - trace.value == pytest.approx(effect, abs=1e-4)


# ---- bad input -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sae_folders(tmp_path_factory, tiny_model_dir, dictionaries) -> list[Path]:
    from saelab.sae.saelens_format import save_sae

    root = tmp_path_factory.mktemp("circuit-saes")
    folders = []
    for k in (0, 2):
        dictionaries[k].sae.cfg.model_name = str(tiny_model_dir)
        folders.append(save_sae(dictionaries[k].sae, root / f"L{k}"))
    other = random_dictionary("topk", "blocks.0.hook_resid_post", 9).sae
    other.cfg.model_name = "gpt2"
    folders.append(save_sae(other, root / "gpt2-sae"))
    return folders


def test_bad_input_is_one_line_naming_the_problem_and_the_fix(
    tiny_model, tiny_model_dir, sae_folders, monkeypatch, capsys, saelab_error
):
    from saelab import cli

    monkeypatch.setattr("saelab.models.load_model", lambda spec, device="auto": tiny_model)
    ours = [str(folder) for folder in sae_folders[:2]]
    cases = [
        (["--sae", *ours, "--prompt", "a b c", "--target", " hello world"], "--target ' hello world' is 2 tokens"),
        (
            ["--sae", *ours, "--prompt", "a b c", "--hooks", "blocks.7.hook_resid_post"],
            "no dictionary of the SAE folders",
        ),
        (["--sae", *ours, "--prompt", "word " * 300], "tokens (BOS included) but"),
        (["--sae", ours[1], str(sae_folders[2]), "--prompt", "a b"], "the dictionaries come from different models"),
        (["--sae", str(sae_folders[2]), "--model", str(tiny_model_dir), "--prompt", "a b"], "was trained on gpt2, not"),
        (["--sae", *ours, "--prompt", "a b c", "--evaluate"], "pass --store DIR"),
        (["--sae", *ours, "--prompt", "a b c", "--contrast", " c", "--target", " c"], "is the target token itself"),
    ]
    for args, expected in cases:
        assert cli.main(["attribute", *args, "--out", str(sae_folders[0].parent / "g.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("saelab attribute: error: ") and expected in err[0], err
    assert not (sae_folders[0].parent / "g.json").exists()  # nothing written by a failed run
    line = saelab_error("attribute", "--run", "x", "--sae", ours[0], "--prompt", "a")
    assert line.startswith("saelab attribute: error: give the dictionaries as --run DIR (a training run) or --sae DIR")


# ---- the real SmolLM2: every path once -------------------------------------------------------------------

CODE_PROMPT = "import os\n\ndef main(path):\n    return os.path.join(path, name"


@pytest.fixture(scope="module")
def circuit_run(smollm2, tmp_path_factory) -> Path:
    """A run with TopK SAEs (128 latents, k 8) at SmolLM2's blocks 3 and 9, trained on 24 contexts of 32 tokens
    stored from position 2, with feature stores for the labels."""
    from saelab.analysis.analyze import analyze
    from saelab.analysis.config import AnalyzeConfig
    from saelab.harvest.config import HarvestConfig
    from saelab.harvest.harvester import harvest
    from saelab.train.config import TrainConfig
    from saelab.train.trainer import train

    root = tmp_path_factory.mktemp("circuit-runs")
    hooks = ["blocks.3.hook_resid_post", "blocks.9.hook_resid_post"]
    store = root / "small" / "activations"
    harvest(
        HarvestConfig(out=str(store), hooks=hooks, n_tokens=30 * 24, context_size=32, first_position=2, device="cpu"),
        model=smollm2,
        progress=False,
    )
    saes = [SAEConfig(architecture="topk", d_sae=128, k=8, name=f"L{h[7]}", hook_name=h) for h in hooks]
    run = root / "small" / "circuits"
    cfg = TrainConfig(
        store=str(store), hook=hooks[0], out=str(run), saes=saes, n_tokens=8192, batch_size=256, device="cpu"
    )
    train(cfg, progress=False)
    small = {"top_n": 2, "window_before": 2, "window_after": 1, "n_bands": 2, "per_band": 1, "sample_size": 2}
    analyze(AnalyzeConfig(run=str(run), batch_size=30 * 8, **small), model=smollm2, progress=False)
    return run


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.mark.slow
def test_every_path_on_smollm2(smollm2, circuit_run):
    from saelab.circuits.job import CircuitRequest, attribute_circuit, prompt_tokens
    from saelab.circuits.sources import circuit_means, run_dictionaries

    found = run_dictionaries(circuit_run)
    assert [d.label for d in found.dictionaries] == ["L3", "L9"] and found.first_position == 2
    tokens = prompt_tokens(smollm2, CODE_PROMPT, found.model)
    with torch.no_grad():
        bare = smollm2(tokens)
    assert (spliced_logits(smollm2, tokens, found.dictionaries, 2) - bare).abs().max() <= 1e-5

    circuit = attribute_circuit(smollm2, found, CircuitRequest(CODE_PROMPT, contrast=" path", edges=True, max_nodes=24))
    trace, nodes, atp = circuit.trace, circuit.nodes, circuit.effects
    latents = (nodes.kind == LATENT).nonzero().flatten()
    top = latents[atp[latents].abs().argsort(descending=True)[:30]]
    exact = exact_effects(smollm2, trace, nodes[top])
    ig = node_effects(smollm2, trace, nodes[top], "ig", steps=3)
    print("r atp", pearson(atp[top], exact), "r ig", pearson(ig, exact))
    assert pearson(atp[top], exact) > 0.8  # small nodes: the linear estimate holds (errors and tokens: docs)
    assert (ig - atp[top]).abs().max() > 0 and pearson(ig, exact) > 0.5
    into_metric = circuit.edges.target == METRIC  # the last hook is a cut: its direct effect is its whole effect
    torch.testing.assert_close(
        circuit.edges.effect[into_metric], atp[circuit.edges.source[into_metric]], rtol=1e-3, atol=1e-5
    )
    evaluation = evaluate_circuits(smollm2, trace, nodes, atp, circuit_means(found), sizes=(10, 30), random_draws=2)
    assert all(f is not None for f in evaluation["faithfulness"])
    jsonschema.validate(json.loads(json.dumps(circuit.graph)), graph_schema())
    assert circuit.graph["links"] and any(n["clerp"].startswith("on ") for n in circuit.graph["nodes"])  # labels


@pytest.mark.slow
def test_attribute_cli_on_smollm2_prints_the_table_and_writes_the_graph(smollm2, circuit_run, monkeypatch, capsys):
    from saelab import cli

    monkeypatch.setattr("saelab.models.load_model", lambda spec, device="auto": smollm2)
    args = ["attribute", "--run", str(circuit_run), "--prompt", CODE_PROMPT, "--target", ")", "--edges", "--evaluate"]
    assert cli.main([*args, "--top", "5", "--slug", "join", "--max-nodes", "20"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("log p(')') at position ") and "top next tokens" in out[0]
    header = out[2].split()
    assert header == ["hook", "pos", "token", "latent", "effect", "label"] and len(out[3:8]) == 5
    assert any(line.lstrip().startswith("10 ") for line in out)  # the evaluation table's first size
    graph = json.loads((circuit_run / "graphs" / "join.json").read_text())
    jsonschema.validate(graph, graph_schema())
    assert graph["metadata"]["saelab"]["evaluation"]["sizes"][0] == 10
    assert "plotly" in (circuit_run / "graphs" / "join.html").read_text()


@pytest.mark.slow
def test_circuit_page_draws_the_graph_and_ablates_a_node(smollm2, circuit_run, monkeypatch):
    from dashboard_runs import assert_clean, open_page, texts

    import saelab.models

    monkeypatch.setenv("SAELAB_RUNS", str(circuit_run.parent.parent))
    monkeypatch.setattr(saelab.models, "load_model", lambda spec, device="auto": smollm2)
    at = open_page("circuit", run="small/circuits")
    at.text_area(key="circuit_prompt").set_value(CODE_PROMPT)
    next(b for b in at.button if b.label == "Attribute").click().run()
    assert_clean(at)
    assert [c.proto.id.endswith("circuit_chart") for c in at.get("plotly_chart")] == [True]
    graph = at.session_state["circuit_graph"]
    latent = max(
        (n for n in graph["nodes"] if n.get("saelab", {}).get("kind") == "latent"),
        key=lambda n: abs(n["saelab"]["effect"]),
    )
    at.multiselect(key="circuit_nodes").set_value([latent["node_id"]]).run()
    next(b for b in at.button if b.label == "Ablate selected").click().run()
    assert_clean(at)
    factor, result = at.session_state["circuit_edit"]
    assert factor == 0 and result.edited == 1 and "1 node(s) ablated" in texts(at.markdown)
    # the change is the node's exact effect, by hand: its decoder row times its activation taken from its hook
    from saelab.sae import load_sae

    extra = latent["saelab"]
    sae = load_sae(circuit_run / "saes" / extra["dictionary"])
    t, i = latent["ctx_idx"], extra["latent"]
    ids = torch.tensor([graph["metadata"]["saelab"]["token_ids"]])
    x = activations(smollm2, ids, [extra["hook"]])[extra["hook"]]
    z = sae.encode(x[t : t + 1])[0, i]

    def ablate(y, hook):
        y = y.clone()
        y[0, t] -= z * sae.W_dec[i] / sae.input_scale
        return y

    with torch.no_grad(), smollm2.hooks(fwd_hooks=[(extra["hook"], ablate)]):
        logits = smollm2(ids)[0, -1]
    target = graph["metadata"]["saelab"]["metric"]["target_id"]
    assert result.metric_after == pytest.approx(float(logits.log_softmax(-1)[target]), abs=1e-4)


def test_the_docs_name_only_flags_and_files_that_exist():
    """Every flag of a `saelab` command and every config, doc and module path that docs/circuits.md names: the
    flags on a `saelab <command>` line are that command's, on a `benchmarks/circuits.py` line the benchmark's,
    every other flag is `saelab attribute`'s."""
    import re

    from saelab.cli import _parser

    repo = Path(__file__).resolve().parents[1]
    text = (repo / "docs" / "circuits.md").read_text()
    commands = _parser()._subparsers._group_actions[0].choices

    def flags_of(command: str) -> set[str]:
        return {flag for action in commands[command]._actions for flag in action.option_strings}

    benchmark = set(re.findall(r'add_argument\(\s*"(--[a-z-]+)"', (repo / "benchmarks" / "circuits.py").read_text()))
    unknown = []
    for line in text.splitlines():
        named = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line))
        command = re.search(r"\bsaelab ([a-z]+)\b", line)
        known = flags_of(command.group(1) if command and command.group(1) in commands else "attribute")
        if "benchmarks/circuits.py" in line:
            known = benchmark
        unknown += sorted(named - known)
    assert re.search(r"--method", text) and not unknown, unknown
    paths = set(
        re.findall(
            r"\b((?:configs|docs|saelab|benchmarks|tools|dashboards)/[\w./-]+\.(?:yaml|md|py|jsonl|json))\b", text
        )
    )
    assert paths and all((repo / path).exists() for path in paths), sorted(p for p in paths if not (repo / p).exists())


def test_the_circuit_page_without_runs_says_how_to_make_one(tmp_path, monkeypatch):
    from dashboard_runs import assert_clean, open_page, texts

    monkeypatch.setenv("SAELAB_RUNS", str(tmp_path / "nothing-here"))
    at = open_page("circuit")
    assert_clean(at)
    assert "No training runs under" in texts(at.info) and "saelab train" in texts(at.info)
