"""One way to get a hooked language model: a TransformerLens `TransformerBridge` for a model spec.

A spec is the offline default `smollm2-135m`, a local Hugging Face model folder, or any
TransformerLens / Hugging Face hub name (`gpt2`, `pythia-70m`, `EleutherAI/pythia-160m`) when a
hub is reachable. TransformerLens 4.x has no `HookedTransformer`; the bridge wraps the loaded HF
model, keeps its raw numerics (no folded norms) and exposes the usual hook names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge

from saelab.errors import SaelabError
from saelab.models.device import resolve_device
from saelab.models.smollm2 import SMOLLM2_HF_NAME, SMOLLM2_SPEC, converted_smollm2_dir


def load_model(spec: str, device: str = "auto") -> TransformerBridge:
    """Load `spec` as an eval-mode, float32 `TransformerBridge` on `device`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # saelab's own bars are the ones worth reading
    device = resolve_device(device)
    if spec == SMOLLM2_SPEC:
        return _boot_local(converted_smollm2_dir(), device, bridge_name=SMOLLM2_HF_NAME)
    if Path(spec).is_dir():
        return _boot_local(Path(spec), device, bridge_name=str(spec))
    return _boot_hub(spec, device)


def _boot_local(folder: Path, device: str, bridge_name: str) -> TransformerBridge:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Given hf_model, the bridge takes its config from the model: nothing reaches for a hub.
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise SaelabError(f"could not load a Hugging Face causal LM from {folder}: {error}") from error
    bridge = TransformerBridge.boot_transformers(bridge_name, hf_model=hf_model, tokenizer=tokenizer, device=device)
    return bridge.eval()


def _boot_hub(spec: str, device: str) -> TransformerBridge:
    from transformer_lens.supported_models import get_official_model_name

    try:
        name = get_official_model_name(spec)
    except ValueError:
        name = spec  # not a TransformerLens alias; let the hub resolve it as an HF name
    try:
        bridge = TransformerBridge.boot_transformers(name, device=device, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise SaelabError(
            f"could not load model '{spec}' ({name}) from the Hugging Face hub: {error}. "
            f"Without a network, use model: {SMOLLM2_SPEC} or a local model folder"
        ) from error
    return bridge.eval()
