"""Config loading: YAML + overrides into typed dataclasses; one-line errors."""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import saelab.atomic
import saelab.config
from saelab.config import config_changes, config_from_dict, config_to_dict, load_config, save_config
from saelab.errors import ConfigError
from saelab.harvest.config import CorpusConfig, HarvestConfig

# No example database: failing examples are not stored under the repo.
PROPERTY = settings(max_examples=300, database=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Inner:
    size: int = 4
    rate: float = 0.5

    def validate(self) -> None:
        if self.size <= 0:
            raise ConfigError(f"size: must be positive, got {self.size}")


@dataclass
class Outer:
    name: str = "run"
    mode: Literal["fast", "slow"] = "fast"
    seed: int | None = None
    flag: bool = False
    level: Literal[1, 2, 4] = 1
    layers: list[int] = field(default_factory=lambda: [1, 2])
    inner: Inner = field(default_factory=Inner)
    extra: Inner | None = None

    def validate(self) -> None:
        if self.mode == "slow" and self.seed is None:
            raise ConfigError("seed: required when mode is slow")


@dataclass
class BadDefault:
    """Its default section is invalid, so validate() must reach defaults too."""

    inner: Inner = field(default_factory=lambda: Inner(size=0))


@dataclass
class Required:
    path: str


def message(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    """The error's message, checked to be the one line the CLI prints."""
    text = str(excinfo.value)
    assert text and "\n" not in text, text
    return text


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- building and round trips ---------------------------------------------------------


def test_empty_dict_gives_defaults() -> None:
    assert config_from_dict(HarvestConfig, {}) == HarvestConfig()
    assert config_from_dict(Outer, {}) == Outer()


def test_round_trip_dict_config_dict() -> None:
    data = {
        "model": "gpt2",
        "hooks": ["blocks.3.hook_resid_post", "blocks.5.hook_resid_post"],
        "corpus": {"source": "datasets", "path": "data/*.jsonl", "seed": 7},
        "n_tokens": 1000,
        "prepend_bos": False,
        "dtype": "bfloat16",
    }
    config = config_from_dict(HarvestConfig, data)
    assert config.corpus == CorpusConfig(source="datasets", path="data/*.jsonl", seed=7)
    assert config.hooks == data["hooks"]
    plain = config_to_dict(config)
    assert plain == {
        **config_to_dict(HarvestConfig()),
        **data,
        "corpus": plain["corpus"],
    }
    assert plain["corpus"]["path"] == "data/*.jsonl"
    assert isinstance(plain["corpus"], dict)
    assert config_from_dict(HarvestConfig, plain) == config


def test_config_to_dict_copies_lists() -> None:
    config = Outer()
    config_to_dict(config)["layers"].append(99)
    assert config.layers == [1, 2]


def test_values_are_converted_by_annotation() -> None:
    config = config_from_dict(Outer, {"layers": 3, "seed": 2e5, "inner": {"rate": 2}})
    assert config.layers == [3]  # a lone scalar becomes a one-element list
    assert config.seed == 200_000 and type(config.seed) is int
    assert config.inner.rate == 2.0 and type(config.inner.rate) is float


def test_nested_section_accepts_an_instance() -> None:
    config = config_from_dict(Outer, {"inner": Inner(size=9)})
    assert config.inner == Inner(size=9)


def test_save_then_load_round_trip(tmp_path: Path) -> None:
    config = config_from_dict(HarvestConfig, {"hooks": ["blocks.1.hook_resid_post"], "corpus": {"name": "1"}})
    path = tmp_path / "runs" / "a" / "config.yaml"
    save_config(config, path)
    assert load_config(HarvestConfig, path) == config
    assert "name: '1'" in path.read_text()  # a string that looks like an int stays one
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]


def test_strings_that_look_like_numbers_survive_a_file(tmp_path: Path) -> None:
    # `_Loader` reads 2e5 as a float, so `save_config` must quote the string '2e5'.
    config = HarvestConfig(model="2e5", device="1.0e-3")
    save_config(config, tmp_path / "config.yaml")
    assert load_config(HarvestConfig, tmp_path / "config.yaml") == config


def test_save_config_keeps_old_file_when_replace_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "model: old\n")

    def fail(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(saelab.atomic.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_config(HarvestConfig(model="new"), path)
    assert path.read_text() == "model: old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# --- YAML files and overrides ---------------------------------------------------------


def test_yaml_file_with_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "model: gpt2\nn_tokens: 2e5\ncorpus:\n  source: datasets\n  path: data/*.jsonl\n  name: en\n  seed: 3\n",
    )
    config = load_config(
        HarvestConfig,
        path,
        [
            "n_tokens=1000",
            "hooks=[blocks.3.hook_resid_post,blocks.5.hook_resid_post]",
            "corpus.name=null",
            "corpus.split=validation",
        ],
    )
    assert config.model == "gpt2"
    assert config.n_tokens == 1000
    assert config.hooks == ["blocks.3.hook_resid_post", "blocks.5.hook_resid_post"]
    assert config.corpus == CorpusConfig(source="datasets", path="data/*.jsonl", split="validation", seed=3)


def test_overrides_without_file(tmp_path: Path) -> None:
    config = load_config(
        HarvestConfig,
        None,
        ["hooks=blocks.1.hook_resid_post", "corpus.seed=5", "corpus.seed=6"],
    )
    assert config.hooks == ["blocks.1.hook_resid_post"]
    assert config.corpus.seed == 6  # the later override wins


def test_override_replaces_a_whole_section() -> None:
    config = load_config(Outer, None, ["inner={size: 8}", "inner.rate=0.25"])
    assert config.inner == Inner(size=8, rate=0.25)


def test_optional_section_takes_null_a_mapping_or_overrides() -> None:
    assert config_from_dict(Outer, {"extra": None}).extra is None
    assert config_from_dict(Outer, {"extra": {"size": 2}}).extra == Inner(size=2)
    assert load_config(Outer, None, ["extra.size=3"]).extra == Inner(size=3)
    with pytest.raises(ConfigError) as excinfo:
        load_config(Outer, None, ["extra.size=-1"])
    assert message(excinfo) == "extra.size: must be positive, got -1"
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(Outer, {"extra": {"sise": 2}})
    assert message(excinfo).startswith("unknown key 'extra.sise' (did you mean")


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(HarvestConfig, write(tmp_path, "# nothing\n")) == HarvestConfig()


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "data", "expected"),
    [
        (
            HarvestConfig,
            {"corpus": {"source": "hub"}},
            "corpus.source: 'hub' is not one of: default, datasets",
        ),
        (
            HarvestConfig,
            {"n_tokens": "lots"},
            "n_tokens: expected an integer, got 'lots'",
        ),
        (HarvestConfig, {"n_tokens": 2.5}, "n_tokens: expected an integer, got 2.5"),
        (HarvestConfig, {"n_tokens": True}, "n_tokens: expected an integer, got True"),
        (HarvestConfig, {"prepend_bos": "yes"}, "prepend_bos: expected true or false"),
        (HarvestConfig, {"model": 3}, "model: expected a string, got 3"),
        (HarvestConfig, {"hooks": ["a", 1]}, "hooks[1]: expected a string, got 1"),
        (HarvestConfig, {"hooks": {"a": 1}}, "hooks: expected a list"),
        (HarvestConfig, {"hooks": None}, "hooks: expected a list, got None"),
        (HarvestConfig, {"corpus": "pile"}, "corpus: expected a mapping"),
        (
            HarvestConfig,
            {"corpus": {"path": 3}},
            "corpus.path: expected a string or null",
        ),
        (HarvestConfig, {"dtype": "fp16"}, "dtype: 'fp16' is not one of: float32,"),
        (Outer, {"seed": "x"}, "seed: expected an integer or null, got 'x'"),
        (Outer, {"inner": {"rate": "fast"}}, "inner.rate: expected a number"),
        (Outer, {"inner": {"rate": 10**400}}, "inner.rate: "),
        (Outer, {"mode": True}, "mode: True is not one of: fast, slow"),
        (Outer, {"level": True}, "level: True is not one of: 1, 2, 4"),
        (Outer, {"level": 2.0}, "level: 2.0 is not one of: 1, 2, 4"),
        (Required, {}, "path: required key is missing"),
    ],
)
def test_bad_values_name_the_key(cls: type, data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(cls, data)
    assert message(excinfo).startswith(expected)


def test_unknown_key_suggests_the_closest() -> None:
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(HarvestConfig, {"n_token": 5})
    assert message(excinfo).startswith("unknown key 'n_token' (did you mean 'n_tokens'?); allowed keys: model, hooks,")


def test_unknown_nested_key_is_dotted() -> None:
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(HarvestConfig, {"corpus": {"txt_column": "body"}})
    text = message(excinfo)
    assert text.startswith("unknown key 'corpus.txt_column' (did you mean 'corpus.text_column'?)")
    assert text.endswith("allowed keys: source, path, name, split, text_column, seed")


@pytest.mark.parametrize("key", ["zzzzzz", 3, "line\nbreak"])
def test_unknown_key_without_close_match(key: object) -> None:
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(Outer, {key: 1})
    text = message(excinfo)
    assert text.startswith(f"unknown key {str(key)!r}; allowed keys: name, mode,")
    assert "did you mean" not in text


def test_prefix_names_the_section() -> None:
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(Inner, {"size": "big"}, prefix="sae.inner")
    assert message(excinfo).startswith("sae.inner.size: expected an integer")


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(Outer, ["name"])  # type: ignore[arg-type]
    assert message(excinfo).startswith("config: expected a mapping")


# --- the validate() hook --------------------------------------------------------------


def test_validate_is_called_for_nested_sections() -> None:
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(Outer, {"inner": {"size": 0}})
    assert message(excinfo) == "inner.size: must be positive, got 0"


def test_validate_is_called_on_the_top_level() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(Outer, None, ["mode=slow"])
    assert message(excinfo) == "seed: required when mode is slow"
    assert load_config(Outer, None, ["mode=slow", "seed=1"]).seed == 1


def test_validate_reaches_defaulted_sections() -> None:
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(BadDefault, {})
    assert message(excinfo) == "inner.size: must be positive, got 0"


def test_harvest_config_validate_runs_through_the_loader() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(HarvestConfig, None, ["batch_size=0"])
    assert message(excinfo).startswith("batch_size: ")


# --- file and override errors ---------------------------------------------------------


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as excinfo:
        load_config(HarvestConfig, path)
    assert message(excinfo) == f"{path}: config file not found"


def test_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(HarvestConfig, tmp_path)
    assert message(excinfo).startswith(f"{tmp_path}: cannot read config file")


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model: gpt2\nhooks: [a, b\nn_tokens: 3\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(HarvestConfig, path)
    assert message(excinfo).startswith(f"{path}, line 3: invalid YAML:")


@pytest.mark.parametrize("text", ["- model\n- hooks\n", "just a string\n", "3\n"])
def test_top_level_of_file_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(HarvestConfig, path)
    assert message(excinfo).startswith(f"{path}: top level must be a mapping")


def test_value_errors_from_a_file_name_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "corpus:\n  source: hub\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(HarvestConfig, path)
    assert message(excinfo) == "corpus.source: 'hub' is not one of: default, datasets"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("n_tokens", "override 'n_tokens': expected dotted.key=value"),
        ("=5", "override '=5': expected dotted.key=value"),
        (
            "n_token=5",
            "override 'n_token=5': unknown key 'n_token' (did you mean 'n_tokens'?)",
        ),
        (
            "corpus.txt_column=body",
            "override 'corpus.txt_column=body': unknown key 'corpus.txt_column' (did you mean 'corpus.text_column'?)",
        ),
        (
            "model.name=gpt2",
            "override 'model.name=gpt2': model is a value, not a section",
        ),
        ("hooks=[a, b", "override 'hooks=[a, b', line 1: invalid YAML:"),
        ("out=2024-13-45", "override 'out=2024-13-45': invalid YAML value:"),
        ("n_tokens=lots", "n_tokens: expected an integer, got 'lots'"),
        ("corpus.source=hub", "corpus.source: 'hub' is not one of: default, datasets"),
    ],
)
def test_bad_overrides_are_named(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(HarvestConfig, None, [override])
    assert message(excinfo).startswith(expected)


def test_override_into_a_non_mapping_section(tmp_path: Path) -> None:
    path = write(tmp_path, "corpus: pile\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(HarvestConfig, path, ["corpus.seed=1"])
    assert message(excinfo).startswith("corpus: expected a mapping, got 'pile'")


# --- properties -----------------------------------------------------------------------

HARVEST_KEYS = [f.name for f in dataclasses.fields(HarvestConfig)]
CORPUS_KEYS = [f.name for f in dataclasses.fields(CorpusConfig)]
JUNK_KEYS = ["n_token", "corpus.path", "", "Model", "hook"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["default", "datasets", "float32", "bfloat16", "auto"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(CORPUS_KEYS) | st.text(max_size=6), inner)
    ),
    max_leaves=6,
)
harvest_dicts = st.dictionaries(
    st.sampled_from(HARVEST_KEYS + JUNK_KEYS) | st.text(max_size=6) | st.integers(),
    values,
    max_size=5,
)


@PROPERTY
@given(harvest_dicts)
def test_random_dicts_load_or_raise_one_line_config_error(data: dict[Any, Any]) -> None:
    try:
        config = config_from_dict(HarvestConfig, data)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(config, HarvestConfig)
        assert config_from_dict(HarvestConfig, config_to_dict(config)) == config


overrides = st.tuples(
    st.sampled_from(HARVEST_KEYS + [f"corpus.{k}" for k in CORPUS_KEYS] + JUNK_KEYS) | st.text(max_size=8),
    st.sampled_from(["=", "", "=="]),
    st.text(max_size=12) | st.sampled_from(["[a, b]", "null", "2e5", "{x: 1}", "[1"]),
).map("".join)


@PROPERTY
@given(st.lists(overrides, max_size=3))
def test_random_overrides_load_or_raise_one_line_config_error(args: list[str]) -> None:
    try:
        config = load_config(HarvestConfig, None, args)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(config, HarvestConfig)


# Valid by type and by HarvestConfig.validate (one hook or more, sizes positive).
NO_NUL = st.characters(exclude_characters="\x00")  # a NUL is refused in any string (no path or name holds one)
valid_harvest = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text(NO_NUL, max_size=10),
        "hooks": st.lists(st.text(NO_NUL, max_size=10), min_size=1, max_size=3),
        "n_tokens": st.integers(min_value=1),
        "prepend_bos": st.booleans(),
        "dtype": st.sampled_from(["float32", "bfloat16"]),
        "corpus": st.fixed_dictionaries(
            {"path": st.text(NO_NUL, min_size=1, max_size=10)},  # `datasets` needs a path
            optional={
                "source": st.sampled_from(["default", "datasets"]),
                "name": st.none() | st.text(NO_NUL, max_size=10),
                "seed": st.integers(),
            },
        ),
    },
)


@PROPERTY
@given(valid_harvest)
def test_valid_dicts_always_load_and_survive_a_file(data: dict[str, Any]) -> None:
    config = config_from_dict(HarvestConfig, data)
    plain = config_to_dict(config)
    for key, value in data.items():
        if key == "corpus":
            assert value.items() <= plain["corpus"].items()
        else:
            assert plain[key] == value
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        save_config(config, path)
        assert load_config(HarvestConfig, path) == config


def test_config_changes_name_the_innermost_entry_that_differs():
    before = {"lr": 1e-3, "saes": [{"k": 32, "input_norm": "none"}, {"k": 8}], "corpus": {"path": "a"}}
    after = {"lr": 1e-3, "saes": [{"k": 32, "input_norm": "layer_norm"}, {"k": 16}], "corpus": {"path": "b"}}
    assert config_changes(before, after) == [
        "saes[0].input_norm: 'none' → 'layer_norm'",
        "saes[1].k: 8 → 16",
        "corpus.path: 'a' → 'b'",
    ]
    assert config_changes(before, {**after, "saes": [{"k": 32}]}) == [
        "saes: [{'k': 32, 'input_norm': 'none'}, {'k': 8}] → [{'k': 32}]",
        "corpus.path: 'a' → 'b'",
    ]
