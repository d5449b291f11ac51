"""Bad configs and arguments, generated: random config files (a small working config with keys replaced by
random values, unknown keys added, sections broken) and random `key=value` overrides, for `saelab harvest`,
`train` and `analyze`. Every one either works or fails with exit 2 and one line on stderr that names the
key; never a traceback, and never a partly written output folder (a new one is not left behind, an
existing run folder is unchanged).

The CLI runs in this process (`saelab.cli.main`, stderr captured: an exception escaping it fails the test
with its traceback); a few cases run as a real subprocess too.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from faultlib import folder_snapshot, in_process_cli, one_line_error, run_cli
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pipeline import HOOK

from saelab.analysis.config import AnalyzeConfig
from saelab.config import load_config
from saelab.errors import ConfigError
from saelab.harvest.config import HarvestConfig
from saelab.train.config import TrainConfig

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces, the time is stable
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
COUNTER = itertools.count()

# Values of any type, but never a size so large that a "working" config would run for minutes.
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 0),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not (math.isfinite(x) and x > 64)),
    st.text(max_size=12),
    st.lists(st.integers(-3, 3) | st.text(max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-3, 3), max_size=2),
)
# Values a user might type: right type, often wrong value; these reach the jobs themselves.
plausible = st.one_of(
    st.integers(-3, 300),
    st.sampled_from([0.0, -1.0, 1e-9, 0.5, 1.0, 2.0, math.nan, math.inf]),
    st.booleans(),
    st.sampled_from(
        ["cpu", "cuda", "auto", "meta", "gpu7", "float16", "bfloat16", "float32", "topk", "batchtopk", "gba", "gsae",
         HOOK, "blocks.0.hook_mlp_out", "blocks.3.hook_resid_post", "hook_embed", "default", "datasets", "text", ""]
    ),
    st.sampled_from([[HOOK], [], ["blocks.0.hook_attn_out", HOOK], [HOOK, HOOK]]),
)  # fmt: skip
key_names = st.text(st.characters(categories=["L", "N"]) | st.just("_"), min_size=1, max_size=10)
# Paths are relative (the CLI runs in a scratch folder), or one of the bad ones: empty, NUL, unwritable.
paths = st.sampled_from(["", "\x00", "a\x00b", "/proc/1/nope", "out/../out", "out"]) | st.text(max_size=8).map(
    lambda s: s.lstrip("/") or "x"
).filter(lambda s: s not in (".", ".."))


def harvest_base(model_dir: Path, out: Path) -> dict[str, Any]:
    return {
        "model": str(model_dir),
        "hooks": [HOOK],
        "out": str(out),
        "n_tokens": 62,
        "context_size": 32,
        "batch_size": 2,
        "shard_contexts": 2,
        "device": "cpu",
        "corpus": {"source": "default", "seed": 0},
    }


def train_base(store: Path, out: Path) -> dict[str, Any]:
    return {
        "store": str(store),
        "out": str(out),
        "saes": [{"architecture": "topk", "d_sae": 64, "k": 4}],
        "n_tokens": 1024,
        "batch_size": 256,
        "init_sample_rows": 512,
        "checkpoint_every_tokens": 512,
        "device": "cpu",
    }


def analyze_base(run: Path) -> dict[str, Any]:
    return {"run": str(run), "n_tokens": 62, "top_n": 2, "sample_size": 8, "per_band": 2, "device": "cpu"}


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any], cls: type) -> tuple[dict[str, Any], list[str]]:
    """`base` with 1–3 mutations; returns the dict and the keys touched (dotted, last part first)."""
    data = yaml.safe_load(yaml.safe_dump(base))
    fields = [f for f in cls.__dataclass_fields__ if f not in ("out", "run", "store")]  # paths: below
    touched = []
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["value", "value", "value", "unknown", "section", "section", "path"]))
        if kind == "value":
            key = draw(st.sampled_from(fields))
            data[key] = draw(st.one_of(plausible, plausible, junk))
            touched.append(key)
        elif kind == "unknown":
            key = draw(key_names.filter(lambda k: k not in cls.__dataclass_fields__))
            data[key] = draw(junk)
            touched.append(key)
        elif kind == "section" and isinstance(data.get("corpus"), dict):
            key = draw(st.sampled_from(["source", "path", "split", "text_column", "seed", "nope"]))
            data["corpus"][key] = draw(st.one_of(plausible, junk))
            touched.append(key)
        elif kind == "section" and isinstance(data.get("saes"), list) and data["saes"]:
            key = draw(st.sampled_from(["architecture", "d_sae", "k", "beta", "n_groups", "target_l0", "nope"]))
            if isinstance(data["saes"][0], dict):
                data["saes"][0][key] = draw(st.one_of(plausible, plausible, junk))
                touched.append(key)
        elif kind == "path":
            key = next(k for k in ("out", "run", "store") if k in data)
            data[key] = draw(paths | junk)
            touched.append(key)
    return data, touched


def check(command: str, cls: type, data: dict[str, Any], touched: list[str], overrides: list[str], tmp: Path) -> str:
    """Run the CLI on `data` (a file) + `overrides` in the scratch folder `tmp`; check that it worked, or
    failed in one line naming a key, leaving its output folder as it was. Returns the outcome."""
    config = tmp / f"config-{next(COUNTER)}.yaml"
    config.write_text(yaml.safe_dump(data, allow_unicode=True))
    key = {"harvest": "out", "train": "out", "analyze": "run"}[command]
    target = [o.partition("=")[2] for o in overrides if o.partition("=")[0].strip() == key] or [data.get(key)]
    target = tmp / target[-1] if isinstance(target[-1], str) and "\x00" not in target[-1] else None
    before = folder_snapshot(target) if target is not None and target.is_relative_to(tmp) else None
    with contextlib.chdir(tmp):
        code, _, stderr = in_process_cli(command, "--quiet", "--config", str(config), *overrides)
    if code == 0:
        event("worked")
        return "worked"
    line = one_line_error((code, stderr))
    assert line.startswith(f"saelab {command}: error: ")
    try:
        with contextlib.chdir(tmp):
            load_config(cls, config, overrides)
    except ConfigError as error:
        keys = touched + [o.partition("=")[0].strip().split(".")[-1] for o in overrides]
        assert any(k and k in line for k in keys) or "override" in line or str(config) in line, (line, keys)
        assert str(error) in line
    if before is not None or (target is not None and target.is_relative_to(tmp)):
        assert folder_snapshot(target) == before, (line, sorted(p.name for p in target.iterdir()))
    event("failed: " + line.split(": error: ", 1)[1][:50])
    return "failed"


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-input")


@SETTINGS
@given(data=st.data())
def test_random_harvest_configs_work_or_fail_in_one_line(data, tiny_model_dir, tmp_root):
    out = tmp_root / "out"
    base = harvest_base(tiny_model_dir, out)
    config, touched = data.draw(mutated(base, HarvestConfig))
    for key in ("out",):
        if config.get(key) == base[key]:
            config[key] = str(tmp_root / "out")
    check("harvest", HarvestConfig, config, touched, [], tmp_root)
    _clear(out)


@SETTINGS
@given(data=st.data())
def test_random_train_configs_work_or_fail_in_one_line(data, reference, tmp_root):
    out = tmp_root / "out"
    config, touched = data.draw(mutated(train_base(reference["store"], out), TrainConfig))
    check("train", TrainConfig, config, touched, [], tmp_root)
    _clear(out)


@settings(SETTINGS, max_examples=30)
@given(data=st.data())
def test_random_analyze_configs_work_or_fail_in_one_line(data, reference, tmp_root):
    config, touched = data.draw(mutated(analyze_base(reference["analyzed"]), AnalyzeConfig))
    if config.get("run") == str(reference["analyzed"]):
        config["run"] = str(_analysis_copy(reference, tmp_root))
    check("analyze", AnalyzeConfig, config, touched, [], tmp_root)


override_keys = st.sampled_from(
    ["n_tokens", "context_size", "batch_size", "hooks", "dtype", "corpus", "corpus.source", "corpus.seed",
     "corpus.nope", "n_tokens.x", "prepend_bos", "out", "model", "device", "nope", ""]
) | key_names  # fmt: skip
override_values = st.sampled_from(
    ["", "[", "{", "]", "null", "-1", "0", "1e400", "nan", "[a, b]", "{a: 1}", "'x'", "2024-13-45",
     "!!python/object:os.system", "yes", "\t", "é", "😀", "a=b", "0x10", "1_000", "*anchor", "&a [1]", "? a"]
) | st.text(max_size=8)  # fmt: skip


@SETTINGS
@given(
    overrides=st.lists(
        st.one_of(st.tuples(override_keys, override_values).map("=".join), st.text(max_size=10)), min_size=1, max_size=3
    )
)
def test_random_overrides_work_or_fail_in_one_line(overrides, tiny_model_dir, tmp_root):
    out = tmp_root / "out"
    base = harvest_base(tiny_model_dir, out)
    overrides = [o for o in overrides if not o.startswith("-")]  # an option, not an override: argparse's
    check("harvest", HarvestConfig, base, [], overrides, tmp_root)
    _clear(out)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["harvest", "hooks=[blocks.99.hook_resid_post]"], "blocks.99"),  # found after the model loads
    ],
)
def test_bad_arguments_in_a_real_subprocess(args, named, tiny_model_dir, reference, tmp_path):
    command, override = args
    target = {
        "harvest": [f"model={tiny_model_dir}", f"out={tmp_path / 'out'}", "n_tokens=62", "context_size=32"],
        "train": [f"store={reference['store']}", f"out={tmp_path / 'out'}", "n_tokens=512", "batch_size=256"],
        "analyze": [f"run={reference['analyzed']}"],
    }[command]
    line = one_line_error(run_cli(command, "--quiet", *target, override))
    assert named in line
    assert not (tmp_path / "out").exists()


def _clear(out: Path) -> None:
    import shutil

    shutil.rmtree(out, ignore_errors=True)


def _analysis_copy(reference: dict[str, Path], tmp_root: Path) -> Path:
    import shutil

    copy = tmp_root / "analyzed"
    if not copy.exists():
        shutil.copytree(reference["analyzed"], copy)
    return copy
