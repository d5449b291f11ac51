"""The README and docs/ cannot rot: the site builds strictly, every `saelab …` command in them parses with
today's CLI and config classes, every `configs/…` file they name exists and loads, and the README's Python
API snippet runs."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saelab import cli
from saelab.analysis.config import AnalyzeConfig, ExplainConfig
from saelab.config import load_config
from saelab.errors import SaelabError
from saelab.eval.config import EvalConfig, ProbeConfig
from saelab.harvest.config import HarvestConfig
from saelab.steer.config import SteerConfig
from saelab.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CONFIG_OF = {  # the subcommands that take `--config` and `key=value` overrides, and their config class
    "harvest": HarvestConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "probe": ProbeConfig,
    "explain": ExplainConfig,
    "analyze": AnalyzeConfig,
    "steer": SteerConfig,
}
CONFIG_FILE = re.compile(r"configs/[\w.-]+\.ya?ml")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`((?:\.venv/bin/)?saelab [^`]+)`")
PLACEHOLDER = re.compile(r"…|<[^>]*>")  # `saelab eval run=<its out>`, `torchrun … -m saelab harvest …`


def commands(text: str) -> list[str]:
    """The `saelab …` command lines of a page: in code blocks (continued lines joined) and inline."""
    found = []
    for language, body in FENCE.findall(text):
        if language not in ("", "bash", "sh", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if re.match(r"(\.venv/bin/)?saelab |(\S*torchrun .*)?-m saelab ", line):
                found.append(line)
    found += [span for span in INLINE.findall(text)]
    return [command for command in found if not PLACEHOLDER.search(command)]


def argv_of(command: str) -> list[str]:
    """The arguments after `saelab` (or `-m saelab`), without shell comments."""
    words = shlex.split(command, comments=True)
    start = (
        words.index("saelab") + 1
        if "saelab" in words
        else next(i + 1 for i, word in enumerate(words) if word.endswith("saelab"))
    )
    return words[start:]


def check_command(command: str) -> None:
    """Parse `command` as the CLI would and build its config from its file and overrides, without running it;
    raises AssertionError naming what does not parse. A bare `saelab <subcommand>` in prose names a command:
    only the subcommand must exist."""
    argv = argv_of(command)
    if len(argv) == 1:
        subcommands = cli._parser()._subparsers._group_actions[0].choices
        assert argv[0] in subcommands, f"{command!r}: no subcommand {argv[0]!r} (there are {', '.join(subcommands)})"
        return
    with contextlib.redirect_stderr(io.StringIO()) as errors:
        try:
            args = cli._parser().parse_args(argv)
        except SystemExit:
            raise AssertionError(f"{command!r}: {errors.getvalue().strip().splitlines()[-1]}") from None
    config_class = CONFIG_OF.get(args.command)
    if config_class is not None:
        try:
            load_config(config_class, args.config, args.overrides)
        except (SaelabError, OSError) as error:
            raise AssertionError(f"{command!r}: {error}") from None


def documented_commands() -> list[tuple[str, str]]:
    return [(page.name, command) for page in PAGES for command in commands(page.read_text())]


def test_the_pages_document_commands_at_all():
    pages = {page for page, _ in documented_commands()}
    assert {"README.md", "training.md", "harvesting.md", "compare.md"} <= pages


@pytest.mark.parametrize("page,command", documented_commands())
def test_every_documented_command_parses(page, command):
    check_command(command)


@pytest.mark.parametrize(
    "broken, problem",
    [
        ("saelab train --resmue", "unrecognized arguments"),
        ("saelab trian --config configs/train-smollm2.yaml", "invalid choice"),
        ("saelab train --config configs/train-smollm2.yaml n_tokenz=5", "n_tokenz"),
        ("saelab harvest --config configs/no-such.yaml", "no-such.yaml"),
        ("saelab compare A B --threshhold 0.5", "unrecognized arguments"),
        ("saelab attributes", "no subcommand"),
    ],
)
def test_a_broken_command_fails_the_check(broken, problem):
    with pytest.raises(AssertionError, match=re.escape(problem)):
        check_command(broken)


def config_class_of(path: str) -> type:
    return CONFIG_OF[Path(path).name.split("-")[0]]


@pytest.mark.parametrize("path", sorted({m for page in PAGES for m in CONFIG_FILE.findall(page.read_text())}))
def test_every_named_config_exists_and_loads(path):
    assert (REPO / path).is_file(), f"{path} is named in the docs but does not exist"
    load_config(config_class_of(path), REPO / path).validate()


def test_every_config_in_the_repo_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(config_class_of(f"configs/{path.name}"), path).validate()


def test_readme_links_to_files_that_exist():
    for target in re.findall(r"\]\(([^)#]+)\)", (REPO / "README.md").read_text()):
        if not target.startswith("http"):
            assert (REPO / target).exists(), f"README links to {target}, which does not exist"


@pytest.mark.slow
def test_readme_python_api_snippet_runs(tmp_path, smollm2, monkeypatch):
    """The README's "Python API" block, on a random TopK SAE saved where the snippet reads one."""
    import saelab.models
    from saelab.sae import SAEConfig, build_sae, save_sae

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    snippet = FENCE.search(section).group(2)
    folder = re.search(r'load_sae\("([^"]+)"\)', snippet).group(1)
    sae = build_sae(SAEConfig(architecture="topk", d_in=576, d_sae=64, k=4, hook_name="blocks.15.hook_resid_post"))
    save_sae(sae, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(saelab.models, "load_model", lambda spec, device="auto": smollm2)
    namespace: dict = {}
    exec(compile(snippet, "README.md (Python API)", "exec"), namespace)
    latents, logits = namespace["latents"], namespace["logits"]
    assert latents.shape[-1] == 64 and ((latents != 0).sum(-1) <= 4).all()
    assert logits.shape[-1] == smollm2.cfg.d_vocab and torch.isfinite(logits).all()


def test_the_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link, a missing page or an API reference that does not resolve fails."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
