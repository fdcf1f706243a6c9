from pathlib import Path

import pytest

from lesionml.config import Params, load_params
from lesionml.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_project_params_are_valid_and_resolve_paths_against_their_folder():
    p = load_params(ROOT / "params.yaml")
    assert p.data.source == ROOT / "data" / "sample"
    assert p.data.image_size == (75, 100)
    assert p.tracking.uri == f"sqlite:///{ROOT / 'mlruns.db'}"
    assert p.models.enabled == ("cnn", "cnn_lstm")


def test_override_is_typed_from_yaml(tmp_path):
    p = load_params(ROOT / "params.yaml", ["split.seed=7", "data.image_size=[32, 48]", "train.class_weighting=false"])
    assert p.split.seed == 7 and p.data.image_size == (32, 48) and p.train.class_weighting is False


@pytest.mark.parametrize(
    "text,needle",
    [
        ("split:\n  sed: 3\n", "unknown key 'split.sed'"),
        ("bogus:\n  a: 1\n", "unknown key 'bogus'"),
        ("train:\n  epochs: many\n", "train.epochs"),
        ("train:\n  epochs: -1\n", "train.epochs: Input should be greater than or equal to 1"),
        ("split:\n  val_fraction: 0.5\n  test_fraction: 0.5\n", "val_fraction + test_fraction must be below 1"),
        ("models:\n  enabled: [cnn, resnet]\n", "unknown model 'resnet'; known models: cnn, cnn_lstm"),
        ("data:\n  image_size: [2, 2]\n", "image_size must be two sides between 8 and 1024"),
        ("- a\n- b\n", "expected a mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_params_are_one_line_errors_naming_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as err:
        load_params(_write(tmp_path, text))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["split.seed", "seed=3", "=3"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_params(ROOT / "params.yaml", [override])


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_flat_names_every_param():
    flat = Params().flat()
    assert flat["train.epochs"] == 10 and flat["models.cnn.filters"] == [32, 64, 128]
