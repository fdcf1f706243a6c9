"""params.yaml -> typed Params: no defaults in code, strictness, --set overrides, path resolution."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from lesionml.config import Params, flatten, load_params, parse_override
from lesionml.errors import ConfigError
from tests.helpers import ROOT, project_params

PROJECT = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def _merged(base: dict, changes: dict) -> dict:
    """A deep copy of `base` with `changes` applied key by key."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = _merged(base[key], value) if both else value
    return out


def _write(folder: Path, tree: dict | str) -> Path:
    """A params file: text as given, or the project's params with `tree`'s keys changed."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(tree if isinstance(tree, str) else yaml.safe_dump(_merged(PROJECT, tree)), encoding="utf-8")
    return path


def _error(path: Path, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as err:
        load_params(path, list(overrides))
    message = str(err.value)
    assert "\n" not in message, "a config error is one line"
    return message


# --- one source of values -----------------------------------------------------------


def _sections(model: type[BaseModel], prefix: str = ""):
    """Every section class reachable from `model`, with its dotted name."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield f"{prefix}{name}", field.annotation
            yield from _sections(field.annotation, f"{prefix}{name}.")


def test_the_code_holds_no_values_only_types_and_bounds():
    """Drift guard: a value in code would be a second source that params.yaml can silently disagree with."""
    defaulted = {}
    for where, section in [("", Params), *_sections(Params)]:
        for name, field in section.model_fields.items():
            if field.is_required():
                continue
            default = field.get_default(call_default_factory=True)
            if default is not None and default != {} and default != ():
                defaulted[f"{where}.{name}".lstrip(".")] = default
    assert not defaulted, f"settings with a value in lesionml/config.py instead of params.yaml: {defaulted}"


def test_the_projects_params_file_names_every_setting_and_every_value_comes_from_it(sample_dir):
    params = Params.model_validate(PROJECT)  # nothing filled in: every required key is in the file
    assert params.flat() == flatten({k: v for k, v in PROJECT.items() if k != "profiles"})
    loaded = load_params(ROOT / "params.yaml")
    assert loaded.data.source == sample_dir.resolve()
    own_epochs = PROJECT["models"]["cnn_lstm"]["train"]["epochs"]
    assert loaded.train_for("cnn_lstm").epochs == own_epochs != loaded.train.epochs
    assert loaded.train_for("cnn").epochs == loaded.train.epochs


def test_a_missing_setting_is_named_in_one_line(tmp_path):
    tree = _merged(PROJECT, {})
    del tree["train"]["epochs"]
    assert _error(_write(tmp_path / "a", yaml.safe_dump(tree))).endswith("params.yaml: train.epochs: missing")
    del tree["models"]["cnn"]["head"], tree["evaluate"]["min_balanced_accuracy"]
    message = _error(_write(tmp_path / "b", yaml.safe_dump(tree)))
    assert message.endswith("params.yaml: models.cnn.head: missing (and 2 more missing)")
    assert _error(_write(tmp_path / "c", "")).endswith("params.yaml: data: missing (and 10 more missing)")


def test_a_section_left_empty_names_its_first_key_as_missing(tmp_path):
    text = yaml.safe_dump(_merged(PROJECT, {"split": None}))
    assert "split.seed: missing (and 2 more missing)" in _error(_write(tmp_path, text))


def test_a_models_own_train_settings_may_be_absent(tmp_path):
    tree = _merged(PROJECT, {})
    del tree["models"]["cnn_lstm"]["train"]
    params = load_params(_write(tmp_path, yaml.safe_dump(tree)))
    assert params.models.cnn_lstm.train == {} and params.train_for("cnn_lstm") == params.train


# --- unknown keys, wrong types, out of range ----------------------------------------


@pytest.mark.parametrize(
    "tree,key",
    [
        ({"dat": {"source": "x"}}, "dat"),
        ({"split": {"sead": 7}}, "split.sead"),
        ({"models": {"cnn": {"filter": [8]}}}, "models.cnn.filter"),
    ],
)
def test_unknown_key_is_named(tmp_path, tree, key):
    message = _error(_write(tmp_path, tree))
    assert message.endswith(f"unknown key '{key}'")
    assert str(tmp_path / "params.yaml") in message


@pytest.mark.parametrize(
    "tree,needle",
    [
        ({"split": {"seed": "seven"}}, "split.seed: Input should be a valid integer"),
        ({"data": {"workers": 2.5}}, "data.workers: Input should be a valid integer"),
        ({"augment": {"horizontal_flip": "sometimes"}}, "augment.horizontal_flip: Input should be a valid boolean"),
        ({"data": {"image_size": "75x100"}}, "data.image_size: Input should be a valid tuple"),
        (
            {"train": {"monitor": "loss"}},
            "train.monitor: Input should be 'val_loss', 'val_accuracy' or 'val_balanced_accuracy'",
        ),
    ],
)
def test_wrong_type_is_named_with_the_value(tmp_path, tree, needle):
    message = _error(_write(tmp_path, tree))
    assert needle in message
    _section, values = next(iter(tree.items()))
    assert f"(got {next(iter(values.values()))!r})" in message


@pytest.mark.parametrize(
    "tree,needle",
    [
        ({"data": {"workers": -1}}, "data.workers: Input should be greater than or equal to 1 (got -1)"),
        ({"data": {"workers": 0}}, "data.workers: Input should be greater than or equal to 1 (got 0)"),
        ({"split": {"val_fraction": 0.0}}, "split.val_fraction: Input should be greater than 0"),
        ({"split": {"test_fraction": 1.5}}, "split.test_fraction: Input should be less than 1"),
        (
            {"split": {"val_fraction": 0.5, "test_fraction": 0.5}},
            "split: val_fraction + test_fraction must be below 1 to leave a training split, got 0.5 + 0.5",
        ),
        (
            {"split": {"val_fraction": 0.6, "test_fraction": 0.45}},
            "val_fraction + test_fraction must be below 1",
        ),
        ({"data": {"image_size": [4, 100]}}, "data: image_size must be two sides between 8 and 1024, got [4, 100]"),
        ({"augment": {"rotation_degrees": 270}}, "augment.rotation_degrees: Input should be less than or equal to 180"),
        (
            {"models": {"cnn": {"filters": [8, 16, 32], "convs_per_block": [1, 2]}}},
            "models.cnn: convs_per_block lists 2 counts for 3 blocks (filters [8, 16, 32])",
        ),
        ({"models": {"cnn": {"convs_per_block": 0}}}, "convs_per_block must be between 1 and 4 per block, got 0"),
        ({"train": {"precision": "float16"}}, "train.precision: Input should be 'float32' or 'mixed_bfloat16'"),
    ],
)
def test_out_of_range_is_named(tmp_path, tree, needle):
    assert needle in _error(_write(tmp_path, tree))


def test_fractions_just_below_one_are_accepted(tmp_path):
    params = load_params(_write(tmp_path, {"split": {"val_fraction": 0.49, "test_fraction": 0.5}}))
    assert params.split.val_fraction + params.split.test_fraction < 1


def test_several_problems_are_counted(tmp_path):
    message = _error(_write(tmp_path, {"data": {"workers": -1, "max_image_pixels": 0}}))
    assert "(and 1 more problems)" in message


# --- --set overrides ----------------------------------------------------------------


def test_overrides_are_typed_as_yaml_values(tmp_path):
    path = _write(tmp_path, {"split": {"seed": 42}})
    params = load_params(
        path,
        [
            "split.seed=7",
            "split.val_fraction=0.2",
            "augment.horizontal_flip=false",
            "data.image_size=[64, 80]",
            "models.enabled=[cnn]",
            "tracking.experiment=exp one",
        ],
    )
    assert params.split.seed == 7 and type(params.split.seed) is int
    assert params.split.val_fraction == 0.2 and type(params.split.val_fraction) is float
    assert params.augment.horizontal_flip is False
    assert params.data.image_size == (64, 80)
    assert params.models.enabled == ("cnn",)
    assert params.tracking.experiment == "exp one"
    assert load_params(path).split.seed == 42, "overrides never touch the file"


def test_override_wins_over_the_file_and_later_override_wins(tmp_path):
    path = _write(tmp_path, {"split": {"seed": 1}})
    assert load_params(path, ["split.seed=2", "split.seed=3"]).split.seed == 3


def test_override_is_validated_like_the_file(tmp_path):
    path = _write(tmp_path, {})
    message = _error(path, ["split.sed=7"])
    assert message.endswith("unknown key 'split.sed'") and "with --set split.sed=7" in message
    assert "data.workers: Input should be greater than or equal to 1 (got -3)" in _error(path, ["data.workers=-3"])
    assert "split.seed: Input should be a valid integer" in _error(path, ["split.seed=abc"])


@pytest.mark.parametrize(
    "text,needle",
    [
        ("split.seed", "expected section.key=value"),
        ("seed=7", "expected section.key=value"),
        ("=7", "expected section.key=value"),
        ("split.seed=[1, 2", "value is not valid YAML"),
    ],
)
def test_bad_override_syntax(text, needle):
    with pytest.raises(ConfigError) as err:
        parse_override(text)
    assert needle in str(err.value) and repr(text) in str(err.value)


def test_override_into_a_value_is_refused(tmp_path):
    message = _error(_write(tmp_path, {"split": {"seed": 42}}), ["split.seed.x=1"])
    assert "--set split.seed.x: 'seed' is a value, not a section" in message


# --- files and paths ----------------------------------------------------------------


def test_relative_paths_resolve_against_the_params_folder_not_the_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "conf"
    _write(
        folder,
        {
            "data": {"source": "../releases/ham", "workspace": "ws"},
            "tracking": {"uri": "sqlite:///db/mlruns.db", "artifacts": "art"},
        },
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    params = load_params("../project/conf/params.yaml")
    assert params.data.source == tmp_path / "project" / "releases" / "ham"
    assert params.data.workspace == folder / "ws"
    assert params.tracking.artifacts == folder / "art"
    assert params.tracking.uri == f"sqlite:///{folder / 'db' / 'mlruns.db'}"


def test_absolute_paths_and_remote_tracking_uri_are_kept(tmp_path):
    src = tmp_path / "abs" / "src"
    path = _write(tmp_path / "p", {"data": {"source": str(src)}, "tracking": {"uri": "http://127.0.0.1:5000"}})
    params = load_params(path)
    assert params.data.source == src
    assert params.tracking.uri == "http://127.0.0.1:5000"


def test_relative_override_path_resolves_against_the_params_folder(tmp_path):
    params = load_params(_write(tmp_path / "p", {}), ["data.source=rel"])
    assert params.data.source == tmp_path / "p" / "rel"


def test_missing_file_invalid_yaml_and_non_mapping(tmp_path):
    assert _error(tmp_path / "nope.yaml").endswith("nope.yaml: params file not found")
    message = _error(_write(tmp_path / "a", "split:\n  seed: [1, 2\n"))
    assert "not valid YAML at line" in message
    assert _error(_write(tmp_path / "b", "- just\n- a list\n")).endswith(
        "expected a mapping of sections at the top level"
    )


def test_params_are_frozen_and_flat_names_every_param():
    params = project_params(
        "split.seed=42", "split.val_fraction=0.15", "split.test_fraction=0.15", "data.image_size=[75, 100]"
    )
    with pytest.raises(ValidationError):
        params.split.seed = 1  # type: ignore[misc]
    flat = params.flat()
    assert flat["split.seed"] == 42 and flat["data.image_size"] == [75, 100]
    assert flat["augment.horizontal_flip"] is PROJECT["augment"]["horizontal_flip"]
    assert params.section("split") == {"seed": 42, "val_fraction": 0.15, "test_fraction": 0.15}


def test_a_models_own_train_settings_win_for_that_model_only(tmp_path):
    path = _write(tmp_path, {"train": {"epochs": 40, "learning_rate": 0.002}})
    params = load_params(path, ["models.cnn_lstm.train.epochs=20"])
    assert params.train_for("cnn_lstm").epochs == 20
    assert params.train_for("cnn_lstm").learning_rate == 0.002, "settings it does not name come from train"
    assert params.train_for("cnn").epochs == 40
    assert params.flat()["models.cnn_lstm.train.epochs"] == 20


@pytest.mark.parametrize(
    "override, needle",
    [
        ("models.cnn.train.epoch=5", "models.cnn.train: unknown train setting 'epoch'"),
        ("models.cnn_lstm.train.epochs=0", "models.cnn_lstm.train: epochs: Input should be greater than or equal to 1"),
        ("models.cnn.train.monitor=auc", "models.cnn.train: monitor: Input should be"),
    ],
)
def test_bad_per_model_train_settings_are_named(tmp_path, override, needle):
    assert needle in _error(_write(tmp_path, {}), [override])


# --- profiles -------------------------------------------------------------------------


def test_a_profile_overlays_the_file_and_set_still_wins(tmp_path):
    path = _write(tmp_path, {})
    plain = load_params(path)
    thorough = load_params(path, ["profile=thorough", "train.epochs=3"])
    overlay = PROJECT["profiles"]["thorough"]
    assert plain.profile is None and thorough.profile == "thorough"
    assert thorough.data.image_size == tuple(overlay["data"]["image_size"]) != plain.data.image_size
    assert thorough.models.cnn.ensemble == overlay["models"]["cnn"]["ensemble"]
    assert thorough.models.cnn.filters == plain.models.cnn.filters, "a nested overlay keeps the keys it does not name"
    assert thorough.train.epochs == 3, "--set wins over the profile"
    assert "profiles.thorough.data.image_size" not in thorough.flat() and thorough.flat()["profile"] == "thorough"


def test_an_unknown_profile_names_the_known_ones(tmp_path):
    path = _write(tmp_path, {})
    assert (
        _error(path, ["profile=fast"])
        == f"{path} with --set profile=fast: profile: unknown profile 'fast'; known: thorough"
    )


def test_a_typo_in_a_profile_fails_even_when_it_is_not_used(tmp_path):
    path = _write(tmp_path, {"profiles": {"thorough": {"train": {"epoch": 50}}}})
    assert _error(path) == f"{path}: profiles.thorough: unknown key 'train.epoch'"
