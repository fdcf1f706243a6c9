"""What a result was made from: the data fingerprint, the code and the params, as one digest.

A scheduled retraining run compares this identity with the one recorded on the last
successful pipeline run: equal means the run would reproduce what already exists, so it
stops early instead of re-verifying every stage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lesionml.config import Params
from lesionml.stage_spec import SPEED_ONLY

PACKAGES = ("lesionml", "tasks", "flows")  # the code a pipeline run executes
ROOT = Path(__file__).resolve().parents[1]


def params_digest(params: Params) -> str:
    """Every param that can change a result: all but the SPEED_ONLY ones."""
    dump = params.model_dump(mode="json")
    for dotted in SPEED_ONLY:
        *sections, key = dotted.split(".")
        node = dump
        for section in sections:
            node = node[section]
        node.pop(key)
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


def model_identity(name: str, params: Params, images: str, split: str, stats: str, metadata: str | None = None) -> str:
    """What defines a trained model: the sha256 of its image array, split and normalization
    stats, its architecture, the train settings it trains with (its own applied) and the
    augmentation. The train stage's cache key and its resume folder are both this, so a
    cached model and a resumed one answer to the same settings.

    `metadata`: the sha256 of the patient table, given only for a model with the metadata
    branch; an image-only model's identity does not hold it, so its caches stay valid."""
    identity = [
        name,
        images,
        split,
        stats,
        getattr(params.models, name).model_dump(mode="json"),
        params.train_for(name).model_dump(mode="json"),
        params.section("augment"),
    ]
    if metadata is not None:
        identity.append(metadata)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def code_digest(root: Path = ROOT) -> str:
    """The bytes of every .py file of the pipeline's packages (a dirty tree counts, unlike a git commit)."""
    h = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def run_identity(params: Params, data_fingerprint: str) -> str:
    """data + code + params: two runs with the same identity compute the same things."""
    parts = f"{data_fingerprint}:{code_digest()}:{params_digest(params)}"
    return hashlib.sha256(parts.encode()).hexdigest()[:16]
