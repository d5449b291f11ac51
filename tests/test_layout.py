"""The package's stages import only downward: data flows corpus → activations → SAE → evaluation and
analysis → steering and circuits → the dashboard, and no module reaches back up (README, "Layout")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "saelab"
# A stage may import the stages of lower levels; eval and analysis stand side by side.
LEVEL = {
    "kernels": 0,
    "models": 1,
    "harvest": 2,
    "sae": 3,
    "train": 4,
    "eval": 5,
    "analysis": 5,
    "steer": 6,
    "circuits": 6,  # beside steering: attribution reads SAEs and feature stores; the dashboard edits through steer
    "browse": 7,
}
# What the dashboard's readers may take from training: the run's config schema, never training code.
BROWSE_MAY_READ_FROM_TRAIN = {"saelab.train.config"}


def saelab_imports(path: Path) -> set[str]:
    """Every absolute `saelab.…` module `path` imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("saelab.")}


def stage_imports() -> dict[str, dict[str, set[str]]]:
    """{stage: {module file: the saelab modules it imports}} for every stage folder."""
    stages: dict[str, dict[str, set[str]]] = {stage: {} for stage in LEVEL}
    for path in sorted(PACKAGE.rglob("*.py")):
        stage = path.relative_to(PACKAGE).parts[0]
        if stage in LEVEL:
            stages[stage][str(path.relative_to(PACKAGE.parent))] = saelab_imports(path)
    return stages


def upward(stage: str, modules: dict[str, set[str]]) -> list[str]:
    """The imports of `stage` that reach a stage at its own level or above."""
    return [
        f"{file} imports {name}"
        for file, names in modules.items()
        for name in sorted(names)
        if (target := name.split(".")[1]) in LEVEL and target != stage and LEVEL[target] >= LEVEL[stage]
    ]


@pytest.mark.parametrize("stage", list(LEVEL))
def test_a_stage_imports_only_stages_below_it(stage):
    assert stage_imports()[stage], f"saelab/{stage}/ holds no module: is LEVEL out of date?"
    assert upward(stage, stage_imports()[stage]) == []


def test_kernels_import_no_other_stage_and_browse_no_training_code():
    stages = stage_imports()
    kernels = {name for names in stages["kernels"].values() for name in names}
    assert all(name.startswith("saelab.kernels") for name in kernels), sorted(kernels)
    from_train = {name for names in stages["browse"].values() for name in names if name.startswith("saelab.train")}
    assert from_train <= BROWSE_MAY_READ_FROM_TRAIN, sorted(from_train)


def test_the_check_finds_an_import_that_runs_back_up(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from saelab.analysis.feature_store import FeatureStore\n")
    assert upward("eval", {"bad.py": saelab_imports(module)}) == ["bad.py imports saelab.analysis.feature_store"]


def test_no_benchmark_script_shadows_an_installed_module():
    """`python benchmarks/X.py` puts benchmarks/ first on sys.path, so a script named like a package that
    something imports (benchmarks/kernels.py shadowed `kernels`, which transformers imports) breaks every
    benchmark that loads a model."""
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    names = sorted(path.stem for path in benchmarks.glob("*.py"))
    # a fresh interpreter outside the repository: other tests put benchmarks/ on this process's sys.path
    probe = "import importlib.util, sys; print(*[n for n in sys.argv[1:] if importlib.util.find_spec(n)])"
    found = subprocess.run([sys.executable, "-c", probe, *names], capture_output=True, text=True, cwd="/", check=True)
    shadowing = found.stdout.split()
    assert not shadowing, f"rename {shadowing}: each is also an importable module"
