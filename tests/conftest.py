"""Shared fixtures: real sample data, releases built in temp dirs, isolated Prefect home."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
FULL = ROOT.parent / "shared" / "data" / "ham10000"

# Before anything imports prefect: a private Prefect home (its temporary server's database),
# no analytics, quiet logs; TensorFlow's C++ start-up chatter off.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="lesionml-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def sample_metadata() -> pd.DataFrame:
    return pd.read_csv(SAMPLE / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)


def make_release(dest: Path, rows: pd.DataFrame, layout: str = "flat") -> Path:
    """A HAM10000 release of the sample images for `rows`, in one of the real layouts."""
    dest.mkdir(parents=True, exist_ok=True)
    rows.to_csv(dest / "HAM10000_metadata.csv", index=False)
    ids = list(rows.image_id)
    halves = {"HAM10000_images_part_1": ids[: len(ids) // 2], "HAM10000_images_part_2": ids[len(ids) // 2 :]}
    if layout == "flat":
        for i in ids:
            shutil.copy(SAMPLE / "images" / f"{i}.jpg", dest / f"{i}.jpg")
    elif layout == "parts":
        for folder, part in halves.items():
            (dest / folder).mkdir()
            for i in part:
                shutil.copy(SAMPLE / "images" / f"{i}.jpg", dest / folder / f"{i}.jpg")
    elif layout == "zips":
        for folder, part in halves.items():
            with zipfile.ZipFile(dest / f"{folder}.zip", "w") as zf:
                for i in part:
                    zf.write(SAMPLE / "images" / f"{i}.jpg", f"{i}.jpg")
    else:
        raise ValueError(layout)
    return dest


@pytest.fixture
def small_rows() -> pd.DataFrame:
    """40 real rows: whole lesions, every class."""
    meta = sample_metadata()
    keep = meta.groupby("dx").lesion_id.apply(lambda s: list(dict.fromkeys(s))[:4]).explode()
    return meta[meta.lesion_id.isin(keep)].reset_index(drop=True)


@pytest.fixture
def release(tmp_path, small_rows) -> Path:
    return make_release(tmp_path / "release", small_rows)


def write_params(tmp: Path, source: Path, **sections) -> Path:
    """A params.yaml in `tmp` using the project's defaults, a temp workspace and MLflow store."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source=str(source), workspace=str(tmp / "ws"))
    params["tracking"].update(uri=f"sqlite:///{tmp / 'mlruns.db'}", artifacts=str(tmp / "artifacts"))
    for section, values in sections.items():
        params[section].update(values)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path
