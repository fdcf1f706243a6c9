"""Plain helpers shared by the test modules (`from tests.helpers import ...`): paths to the
bundled sample and the shared full data, and releases and params files built in temp folders.

Imports nothing of Prefect, TensorFlow or the pipeline beyond the config's model names.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lesionml.config import MODEL_NAMES

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
FULL = ROOT.parent / "shared" / "data" / "ham10000"
METADATA = "HAM10000_metadata.csv"
LAYOUTS = ("flat", "parts", "zips")
PARTS = ("HAM10000_images_part_1", "HAM10000_images_part_2")


def full_data_or_skip() -> Path:
    if not (FULL / METADATA).is_file() or not (FULL / "images").is_dir():
        pytest.skip(f"full HAM10000 copy not present at {FULL} (only on machines with the shared data)")
    return FULL


def sample_metadata() -> pd.DataFrame:
    """The bundled sample's CSV exactly as the release has it: every value a string."""
    return pd.read_csv(SAMPLE / METADATA, dtype=str, keep_default_na=False)


def whole_lesion_rows(n: int) -> pd.DataFrame:
    """About `n` real sample rows made of whole lesions, taken class by class in turn.

    Whole lesions keep the release's structure (several images per lesion); taking the
    classes in turn gives every class several lesions even for small n.
    """
    meta = sample_metadata()
    if n >= len(meta):
        return meta
    queues = {dx: list(dict.fromkeys(g.lesion_id)) for dx, g in meta.groupby("dx", sort=True)}
    sizes = meta.lesion_id.value_counts()
    chosen: list[str] = []
    total = 0
    while total < n and any(queues.values()):
        for q in queues.values():
            if q and total < n:
                lesion = q.pop(0)
                chosen.append(lesion)
                total += int(sizes[lesion])
    return meta[meta.lesion_id.isin(chosen)].reset_index(drop=True)


def build_release(dest: Path, rows: pd.DataFrame, layout: str = "flat") -> Path:
    """A HAM10000 release in `dest`: the CSV rows and their real sample images, in a real layout.

    flat:  images beside the CSV;
    parts: HAM10000_images_part_1/ and HAM10000_images_part_2/ folders;
    zips:  HAM10000_images_part_1.zip and HAM10000_images_part_2.zip (the official download).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    dest.mkdir(parents=True, exist_ok=True)
    rows.to_csv(dest / METADATA, index=False)
    ids = list(dict.fromkeys(rows.image_id))
    halves = dict(zip(PARTS, (ids[: len(ids) // 2], ids[len(ids) // 2 :]), strict=False))
    if layout == "flat":
        for i in ids:
            shutil.copy2(SAMPLE / "images" / f"{i}.jpg", dest / f"{i}.jpg")
    elif layout == "parts":
        for folder, part in halves.items():
            (dest / folder).mkdir()
            for i in part:
                shutil.copy2(SAMPLE / "images" / f"{i}.jpg", dest / folder / f"{i}.jpg")
    else:
        for folder, part in halves.items():
            with zipfile.ZipFile(dest / f"{folder}.zip", "w", zipfile.ZIP_STORED) as zf:
                for i in part:
                    zf.write(SAMPLE / "images" / f"{i}.jpg", f"{i}.jpg")
    return dest


def write_params(tmp: Path, source: Path, **sections: dict) -> Path:
    """tmp/params.yaml: the project's params with a temp workspace and MLflow store.

    `sections` update single keys, e.g. write_params(tmp, src, split={"seed": 7}). A test's
    `train` section is meant for every model: the project's per-model train settings
    (`models.<name>.train`, e.g. the CNN+LSTM's own epochs) are dropped unless `sections` sets them.
    """
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for name in MODEL_NAMES:
        params["models"][name].pop("train", None)
    params["data"].update(source=str(source), workspace=str(tmp / "ws"))
    params["tracking"].update(uri=f"sqlite:///{tmp / 'mlruns.db'}", artifacts=str(tmp / "artifacts"))
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path
