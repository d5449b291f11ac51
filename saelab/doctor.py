"""`saelab doctor`: what this machine gives saelab, on one screen, for a newcomer and for a bug report.

Versions (Python, saelab, torch and its CUDA build, Triton, transformer-lens, transformers), the device
jobs run on and its memory, which implementation each kernel of a training step would use there and why,
the model cache and the offline model, and the free disk under the runs folder.

The kernel lines are read from the decisions the kernels themselves make (`saelab.kernels.backend`,
`encode.fused_topk_choice`, `selection.group_maxima_applies`, the train config's product dtype), and on a
Triton device each default kernel's self-check runs here (`saelab.kernels.self_check`), so a kernel that
would fall back to torch in training says so now. Nothing here imports the model stack, and every probe
that fails becomes a line saying so: a broken install is what a doctor is run on.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch and the kernels load inside the probes, so that a broken install is a line
    import torch

    from saelab.kernels.backend import BackendChoice

Level = Literal["ok", "warn", "fail"]
MIN_PYTHON = (3, 11)
LOW_DISK_BYTES = 2 * 2**30  # the demo's store, checkpoints and feature stores take ~1 GiB
STEP = {"d_sae": 4608, "k": 32, "tile": 4096}  # the default TopK SAE, and an `encoder_tile` to show the fused path
MARKS = {"ok": " ", "warn": "!", "fail": "✗"}


@dataclass
class Fact:
    section: str
    name: str
    value: str
    level: Level = "ok"


def gather(runs: str | Path = "runs") -> list[Fact]:
    """Every probe's facts; a probe that raises is one warning line naming what could not be read (a
    missing Python, torch or transformer-lens is a failure the probes report themselves)."""
    facts: list[Fact] = []
    probes: list[tuple[str, str, Callable[[], list[Fact]]]] = [
        ("versions", "python", _python),
        ("versions", "packages", _packages),
        ("device", "device", _device),
        ("kernels", "kernels", _kernels),
        ("files", "model files", _model_files),
        ("files", "disk", lambda: _disk(Path(runs))),
    ]
    for section, what, probe in probes:
        try:
            facts += probe()
        except Exception as error:  # noqa: BLE001 (each probe's failure is reported, never raised)
            facts.append(
                Fact(section, what, f"could not be read: {type(error).__name__}: {_first_line(error)}", "fail")
            )
    return facts


def usable(facts: list[Fact]) -> bool:
    return not any(fact.level == "fail" for fact in facts)


def render(facts: list[Fact]) -> str:
    """The facts as aligned lines under their sections; `!` marks a warning, `✗` a failure."""
    width = max((len(fact.name) for fact in facts), default=0)
    lines, section = [], None
    for fact in facts:
        if fact.section != section:
            section = fact.section
            lines.append(_TITLES.get(section, section))
        lines.append(f" {MARKS[fact.level]} {fact.name:<{width}}  {fact.value}")
    warnings = sum(fact.level == "warn" for fact in facts)
    failures = sum(fact.level == "fail" for fact in facts)
    verdict = "usable" if not failures else f"NOT usable: {failures} problem(s) marked ✗"
    lines.append(f"saelab doctor: {verdict}" + (f", {warnings} warning(s) marked !" if warnings else ""))
    return "\n".join(lines)


_TITLES = {
    "versions": "versions",
    "device": "device",
    "kernels": f"kernels of a training step (TopK, {STEP['d_sae']} latents, k {STEP['k']})",
    "files": "files",
}


# ---- probes ------------------------------------------------------------------------------------------


def _python() -> list[Fact]:
    version = ".".join(map(str, sys.version_info[:3]))
    level: Level = "ok" if sys.version_info >= MIN_PYTHON else "fail"
    note = "" if level == "ok" else f" (saelab needs ≥ {'.'.join(map(str, MIN_PYTHON))})"
    return [Fact("versions", "python", f"{version} at {sys.executable}{note}", level)]


def _packages() -> list[Fact]:
    import saelab

    facts = [Fact("versions", "saelab", f"{saelab.__version__} at {Path(saelab.__file__).parent}")]
    try:
        import torch
    except Exception as error:  # noqa: BLE001 (a broken torch is a line, with the fix)
        value = f"cannot be imported ({type(error).__name__}: {_first_line(error)}); reinstall it (docs/gpu.md)"
        return [*facts, Fact("versions", "torch", value, "fail")]
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    facts.append(Fact("versions", "torch", f"{torch.__version__} ({build})"))
    triton = _version("triton")
    facts.append(
        Fact("versions", "triton", triton or "not installed (the kernels run as torch; Triton runs only on CUDA)")
    )
    numba = _version("numba")
    facts.append(
        Fact(
            "versions",
            "numba",
            numba or "not installed: the CPU kernels run as torch (a slower step)",
            "ok" if numba else "warn",
        )
    )
    for package in ("transformer-lens", "transformers"):
        found = _version(package)
        missing = "not installed: harvest, eval, analyze and live text need it (`pip install -e .`)"
        facts.append(Fact("versions", package, found or missing, "ok" if found else "warn"))
    return facts


def _device() -> list[Fact]:
    import torch

    from saelab.models.device import resolve_device

    device = resolve_device("auto")
    if device != "cuda":
        reason = "no CUDA GPU visible to torch" + ("" if torch.version.cuda else " (a CPU-only torch: docs/gpu.md)")
        return [
            Fact("device", "jobs run on", f"cpu (device: auto): {reason}"),
            Fact("device", "cpu", f"{os.cpu_count()} cores, {platform.machine()}, {_memory()}"),
        ]
    index = torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    facts = [
        Fact("device", "jobs run on", f"cuda:{index} (device: auto), {torch.cuda.device_count()} GPU(s) visible"),
        Fact("device", "gpu", f"{properties.name}, compute capability {properties.major}.{properties.minor}"),
        Fact("device", "gpu memory", f"{_size(free)} free of {_size(total)}"),
    ]
    return facts


def _kernels() -> list[Fact]:
    import torch

    from saelab.kernels import RowTopK, backend, self_check
    from saelab.kernels.backend import use_compiled
    from saelab.kernels.encode import fused_topk_choice
    from saelab.kernels.selection import group_maxima_applies
    from saelab.models.device import resolve_device
    from saelab.train.config import TrainConfig

    device = torch.device(resolve_device("auto"))
    dtype_name = TrainConfig().resolved_dtype(device.type)
    dtype = getattr(torch, dtype_name)
    choice = backend.backend_choice(device)
    rule = [RowTopK(STEP["k"])]
    grouped = group_maxima_applies(STEP["d_sae"], STEP["k"], device.type == "cuda")
    pre_activations = torch.empty((), dtype=dtype).expand(4096, STEP["d_sae"])  # a step's u, of no memory
    compiled = device.type == "cpu" and use_compiled(pre_activations)
    topk = f"top-k by group maxima (row_topk{', compiled' if compiled else ''})" if grouped else "torch.topk"
    fused_default = fused_topk_choice(rule, None, None, device, dtype)
    fused_tiled = fused_topk_choice(rule, STEP["tile"], None, device, dtype)
    facts = [
        Fact("kernels", "backend", f"{'Triton' if choice.triton else 'torch'}: {choice.reason}"),
        Fact("kernels", "encoder product", f"dense addmm in {dtype_name} (dtype: auto on {device.type})"),
        Fact("kernels", "selection", f"{topk}; not fused: {fused_default[1]}"),
        Fact(
            "kernels",
            "encoder_tile set",
            f"{'fused Triton top-k' if fused_tiled[0] else 'scan by tiles'}: {fused_tiled[1]}",
        ),
    ]
    for kernel, what in self_check.DEFAULT_KERNELS.items():
        facts.append(_kernel_fact(kernel, what, choice, device, compiled))
    return facts


# The default kernels that the CPU runs compiled where numba is installed (`saelab/kernels/compiled_*.py`; the
# decoder's backward computes its ∂L/∂values there too, in the pass of its rows_transpose_matmul).
COMPILED_ON_CPU = ("rows_transpose_matmul", "remove_parallel_")


def _kernel_fact(kernel: str, what: str, choice: BackendChoice, device: torch.device, compiled: bool) -> Fact:
    """One default Triton kernel: torch or numba-compiled (`COMPILED_ON_CPU`), Triton forced, or Triton after
    its self-check (run here)."""
    from saelab.kernels import self_check

    what = what.split(" (")[0]
    if not choice.triton:
        route = "compiled with numba" if compiled and kernel in COMPILED_ON_CPU else "torch"
        return Fact("kernels", kernel, f"{route} ({what})")
    if not choice.self_check:
        return Fact("kernels", kernel, f"Triton, unchecked (SAELAB_TRITON=1) ({what})")
    result = self_check.check(kernel, device)
    if result.passed:
        return Fact("kernels", kernel, f"Triton, self-check passed: {result.detail} ({what})")
    return Fact("kernels", kernel, f"torch: Triton failed its self-check: {result.detail}", "warn")


def _model_files() -> list[Fact]:
    from saelab.models.smollm2 import CACHE_MARKER, SMOLLM2_SPEC, cache_root, gguf_path

    models = cache_root() / "models"
    size = _folder_size(models) if models.is_dir() else 0
    converted = (models / SMOLLM2_SPEC / CACHE_MARKER).is_file()
    cached = f"{_size(size)}" + (f", {SMOLLM2_SPEC} converted" if converted else f", {SMOLLM2_SPEC} not converted yet")
    facts = [
        Fact("files", "model cache", f"{models} (moved by $SAELAB_CACHE): {cached if models.is_dir() else 'empty'}")
    ]
    try:
        gguf = gguf_path()
    except Exception as error:  # noqa: BLE001 (missing wheel: the message says how to install it)
        facts.append(Fact("files", "offline model", _first_line(error), "warn"))
    else:
        facts.append(Fact("files", "offline model", f"{gguf.name} ({_size(gguf.stat().st_size)}) in {gguf.parent}"))
    return facts


def _disk(runs: Path) -> list[Fact]:
    existing = runs.resolve()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    level: Level = "ok" if free >= LOW_DISK_BYTES else "warn"
    where = f"{runs.resolve()}" + ("" if existing == runs.resolve() else " (not made yet)")
    return [Fact("files", "runs folder", f"{where}: {_size(free)} free", level)]


# ---- helpers -----------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _memory() -> str:
    """Total and available memory (Linux: /proc/meminfo; elsewhere the total only)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return f"{_size(total)} memory"
    return f"{_size(total)} memory, {_size(available)} available"


def _folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} GiB"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
