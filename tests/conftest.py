"""Shared fixtures: the real SmolLM2 model (loaded once per session) and a tiny random Llama folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported (transformers imports it early), so the
# CPU-only runs that check the Triton kernels through the interpreter must say so before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2():
    """The real offline default model as saelab loads it (a TransformerBridge on the CPU).

    saelab.models is imported here, not at the top: the kernel and trainer tests also run on a GPU
    machine that has torch but not transformer-lens (benchmarks/gpu_check.sh)."""
    from saelab.models import SMOLLM2_SPEC, load_model

    return load_model(SMOLLM2_SPEC, device="cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer random Llama saved as a local Hugging Face folder, with SmolLM2's real tokenizer.

    It goes through the same loading path as any hub model a user names, without a network.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from saelab.models.smollm2 import converted_smollm2_dir

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(converted_smollm2_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    from saelab.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture
def saelab_error():
    """Run `python -m saelab ARGS…`, check it failed with exit 2 and ONE line on stderr; return that line."""

    def run(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "saelab", *args], capture_output=True, text=True, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        return lines[0]

    return run
