"""Plain helpers shared by the test modules (`from tests.helpers import ...`): paths to the
bundled sample and the shared full data, and releases and params files built in temp folders.

Imports nothing of Prefect, TensorFlow or the pipeline beyond the config.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from pydantic import BaseModel

from lesionml.config import MODEL_NAMES, Params, load_params

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
FULL = ROOT.parent / "shared" / "data" / "ham10000"
METADATA = "HAM10000_metadata.csv"
LAYOUTS = ("flat", "parts", "zips")
PARTS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
BIN = Path(sys.executable).parent
LESIONML = str(BIN / "lesionml")  # the venv's command, for tests that run it as users do


# Params sections for a pipeline run that trains and registers a real model in seconds.
TINY = {
    "data": {"image_size": [32, 40]},
    "models": {"enabled": ["cnn"], "cnn": {"filters": [8, 16], "dense_units": 16}},
    "train": {"epochs": 1, "batch_size": 64},
    "evaluate": {"bootstrap": 100},
    "registry": {"bootstrap": 100},
}


def prefect_api(url: str, path: str, body: dict | None = None, method: str = "POST", attempts: int = 6):
    """One Prefect REST call, retried like Prefect's own client does on 429/502/503.

    The server answers 503 when its SQLite database is busy (a write from the serve process
    or a background service holds the lock); the request did not happen and is safe to repeat.
    """
    data = None if method in ("GET", "DELETE") else json.dumps(body or {}).encode()
    for attempt in range(attempts):
        req = urllib.request.Request(
            f"{url}{path}", data=data, headers={"Content-Type": "application/json"}, method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                body = r.read()
                return json.loads(body) if body else None
        except urllib.error.HTTPError as e:
            if e.code not in (429, 502, 503) or attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2**attempt)


def flow_run_logs(server: str, run_id: str, expect: str = "") -> str:
    """The run's log messages, waiting a little for `expect` (logs reach the API in batches)."""
    deadline = time.monotonic() + 15
    while True:
        logs = prefect_api(server, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
        text = "\n".join(entry["message"] for entry in logs)
        if expect in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def auto_scheduled_runs(server: str, deployment_id: str) -> list[dict]:
    """The deployment's runs that the server's scheduler created, oldest tick first."""
    runs = prefect_api(
        server,
        "/flow_runs/filter",
        {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC"},
    )
    return [r for r in runs if r["auto_scheduled"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_params(*overrides: str) -> Params:
    """The project's params.yaml with `--set`-style overrides: the code has no defaults to fall back on."""
    return load_params(ROOT / "params.yaml", list(overrides))


def config(section: str, **values) -> BaseModel:
    """One section of the project's params ("train", "models.cnn", ...) with `values` set, validated.

    A unit test states the settings its assertions depend on in `values`; the rest are the
    project's, which any valid setting must survive.
    """
    node = project_params()
    for part in section.split("."):
        node = getattr(node, part)
    return type(node).model_validate({**node.model_dump(), **values})


def start_mlflow_server(store: Path, start_server: Callable[..., tuple[subprocess.Popen, str]]):
    """A real `mlflow server` (UI included) over a SQLite store and artifact folder in `store`,
    started by the `start_server` fixture; its process and URL. One worker and no job runner:
    the machine it runs on may have two cores."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    argv = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination",
        str(store / "artifacts"),
    ]
    return start_server(argv, "/health", env, store / "server.log")


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


# Synthetic releases whose class is decided by a small coloured square and nothing else: a
# model trained a few epochs on them is near perfect, and an explanation of its decision must
# point at the square. The background is a real sample image chosen independently of the label.
PATCH_COLOURS: dict[str, tuple[int, int, int]] = {
    "akiec": (255, 0, 0),
    "bcc": (0, 255, 0),
    "bkl": (0, 0, 255),
    "df": (255, 255, 0),
    "mel": (255, 0, 255),
    "nv": (0, 255, 255),
    "vasc": (255, 255, 255),
}


def patch_images(
    labels: list[str], size: tuple[int, int] = (75, 100), patch_fraction: float = 0.08, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, 3) of real sample backgrounds, each with one square of its label's
    colour covering `patch_fraction` of the image at a random place; and the squares' masks."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = sorted((SAMPLE / "images").glob("*.jpg"))
    height, width = size
    side = max(2, round((patch_fraction * height * width) ** 0.5))
    images = np.empty((len(labels), height, width, 3), np.uint8)
    masks = np.zeros((len(labels), height, width), bool)
    for i, label in enumerate(labels):
        with Image.open(files[rng.integers(len(files))]) as im:
            images[i] = np.asarray(im.convert("RGB").resize((width, height), Image.BILINEAR))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        images[i, top : top + side, left : left + side] = PATCH_COLOURS[label]
        masks[i, top : top + side, left : left + side] = True
    return images, masks


def build_patch_release(
    dest: Path,
    per_class: int = 24,
    size: tuple[int, int] = (150, 200),
    seed: int = 0,
    flip: dict[str, str] | None = None,
) -> Path:
    """A HAM10000-layout release (CSV + JPEGs, one image per lesion) of `patch_images`.

    `flip` relabels classes in the CSV only (e.g. {"mel": "nv"}): the same pictures with some
    labels wrong, for a model that must come out clearly weaker.
    """
    from PIL import Image

    labels = [c for c in PATCH_COLOURS for _ in range(per_class)]
    images, _ = patch_images(labels, size, seed=seed)
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (label, image) in enumerate(zip(labels, images, strict=True)):
        image_id = f"ISIC_{9000000 + i:07d}"
        Image.fromarray(image).save(dest / f"{image_id}.jpg", quality=95)
        rows.append(
            {
                "lesion_id": f"HAM_{9000000 + i:07d}",
                "image_id": image_id,
                "dx": (flip or {}).get(label, label),
                "dx_type": "histo",
                "age": "50.0",
                "sex": "female",
                "localization": "back",
            }
        )
    pd.DataFrame(rows).to_csv(dest / METADATA, index=False)
    return dest
