"""The hooked model saelab loads: same numbers as transformers, the hook vocabulary, the load paths."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from saelab.errors import SaelabError
from saelab.models import SMOLLM2_SPEC, load_model, parse_hook, stop_at_layer
from saelab.models.smollm2 import GGUF_FILE, GGUF_PACKAGE

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
