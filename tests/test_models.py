"""The hooked model saelab loads: same numbers as transformers, the hook vocabulary, the load paths."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from saelab.errors import SaelabError
from saelab.models import SMOLLM2_SPEC, load_model, parse_hook, stop_at_layer
from saelab.models.smollm2 import GGUF_FILE, GGUF_PACKAGE
from saelab.models.upper_layers import UpperLayers

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def reference_hf_model():
    """SmolLM2 loaded by transformers straight from the GGUF, bypassing saelab's cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = list(importlib.util.find_spec(GGUF_PACKAGE).submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    return model.eval(), tokenizer


def test_logits_match_transformers_on_a_real_prompt(smollm2, reference_hf_model):
    hf_model, tokenizer = reference_hf_model
    ids = tokenizer(PROMPT + " a city where people", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = smollm2(ids)
    assert got.shape == expected.shape == (1, ids.shape[1], 49152)
    assert (got - expected).abs().max().item() < 1e-4


def test_greedy_generation_says_paris(smollm2):
    ids = smollm2.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(2):
            next_id = smollm2(ids)[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    continuation = smollm2.tokenizer.decode(ids[0, -2:])
    assert continuation.startswith(" Paris"), continuation


def test_cached_default_loads_fast(smollm2):
    start = time.perf_counter()
    model = load_model(SMOLLM2_SPEC, device="cpu")
    assert time.perf_counter() - start < 10, "the converted model cache should make a reload take seconds"
    assert model.cfg.n_layers == 30 and model.cfg.d_model == 576


def test_resid_post_hook_equals_hf_hidden_states(smollm2):
    ids = torch.randint(3, 49000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = smollm2.original_model(ids, output_hidden_states=True).hidden_states
        _, cache = smollm2.run_with_cache(
            ids, names_filter=["blocks.15.hook_resid_post", "blocks.15.hook_resid_pre"], stop_at_layer=16
        )
    assert torch.equal(cache["blocks.15.hook_resid_post"], hidden[16])
    assert torch.equal(cache["blocks.15.hook_resid_pre"], hidden[15])


def test_local_folder_loads_through_the_hub_path(tiny_model, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (tiny_model(ids) - hf_model(ids).logits).abs().max().item() < 1e-5
    assert tiny_model.cfg.n_layers == 3


def test_unreachable_hub_model_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SaelabError, match="smollm2-135m"):
        load_model("saelab-test/no-such-model-anywhere", device="cpu")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("blocks.3.hook_resid_post", None),
        ("blocks.0.hook_mlp_out", None),
        ("blocks.30.hook_resid_post", "layers 0..29"),
        ("blocks.3.hook_banana", "hook_resid_pre"),
        ("resid_post", "blocks.<layer>"),
    ],
)
def test_parse_hook(name, message):
    if message is None:
        assert parse_hook(name, n_layers=30).name == name
    else:
        with pytest.raises(SaelabError, match=message):
            parse_hook(name, n_layers=30)


def test_stop_at_layer_reaches_the_deepest_hook():
    hooks = [parse_hook(name, 30) for name in ("blocks.2.hook_resid_pre", "blocks.7.hook_mlp_out")]
    assert stop_at_layer(hooks) == 8


# ---- a forward pass resumed from one block ---------------------------------------------------------


def _scaled(factor: float):
    def hook(x: torch.Tensor, hook) -> torch.Tensor:
        return factor * x

    return hook


@pytest.mark.parametrize("start", [0, 1, 2])
@pytest.mark.parametrize("kind", ["hook_resid_pre", "hook_mlp_out", "hook_resid_post"])
def test_upper_layers_equal_the_full_pass_with_and_without_a_hook(tiny_model, start, kind):
    tokens = torch.randint(1, 1000, (3, 12), generator=torch.Generator().manual_seed(start))
    upper = UpperLayers(tiny_model, start)
    with torch.inference_mode():
        with upper.recording():
            clean = tiny_model(tokens)
        assert upper.reproduces(clean)
        torch.testing.assert_close(upper(), clean, rtol=0, atol=1e-5)
        hooks = [(f"blocks.{start}.{kind}", _scaled(0.5))]
        with tiny_model.hooks(fwd_hooks=hooks):
            spliced = tiny_model(tokens)
            resumed = upper()
            again = upper()  # a second pass reads nothing the first left behind (no key-value cache)
    assert (spliced - clean).abs().max() > 1e-3, "the hook changes the logits"
    torch.testing.assert_close(resumed, spliced, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, spliced, rtol=0, atol=0)


def test_upper_layers_run_no_block_below_the_start_and_record_detached_inputs(tiny_model):
    tokens = torch.randint(1, 1000, (2, 10), generator=torch.Generator().manual_seed(5))
    calls = {i: 0 for i in range(3)}
    counters = [
        block.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(tiny_model.blocks)
    ]
    upper = UpperLayers(tiny_model, 2)
    try:
        with torch.enable_grad(), upper.recording():
            tiny_model(tokens)
        assert calls == {0: 1, 1: 1, 2: 1}
        assert not upper._args[0].requires_grad
        with torch.inference_mode():
            upper()
        assert calls == {0: 1, 1: 1, 2: 2}
    finally:
        for handle in counters:
            handle.remove()


def test_upper_layers_notice_logits_they_do_not_reproduce_and_refuse_bad_blocks(tiny_model):
    tokens = torch.randint(1, 1000, (2, 10), generator=torch.Generator().manual_seed(6))
    upper = UpperLayers(tiny_model, 1)
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        upper()
    with torch.inference_mode(), upper.recording():
        clean = tiny_model(tokens)
    assert upper.reproduces(clean) and not upper.reproduces(torch.tanh(clean))  # a soft-cap it lacks
    with pytest.raises(ValueError, match="block 3 is not in"):
        UpperLayers(tiny_model, 3)


@pytest.mark.slow
def test_upper_layers_equal_the_full_pass_on_smollm2(smollm2):
    tokens = torch.randint(100, 40000, (2, 24), generator=torch.Generator().manual_seed(7))
    tokens[:, 0] = smollm2.tokenizer.bos_token_id
    upper = UpperLayers(smollm2, 15)
    with torch.inference_mode():
        with upper.recording():
            clean = smollm2(tokens)
        torch.testing.assert_close(upper(), clean, rtol=0, atol=1e-4)
        with smollm2.hooks(fwd_hooks=[("blocks.15.hook_resid_post", _scaled(0.8))]):
            torch.testing.assert_close(upper(), smollm2(tokens), rtol=0, atol=1e-4)
