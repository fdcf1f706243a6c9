"""What each pipeline stage depends on and writes: declared once, read by both engines.

The Prefect tasks hash exactly a stage's `code` files and `params` into its cache key
(tasks/_stage.py), and dvc.yaml is generated from the same declaration
(`python -m lesionml.stage_spec > dvc.yaml`; a test fails when the committed file
differs), so `lesionml run` and `dvc repro` re-run a stage for the same reasons. A stage's
code is whole files, because that is what DVC can track; editing any function in
lesionml/data/stages.py re-runs every data stage under both. How to add a stage:
docs/development.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "${data.source}"  # the release folder; every other dep and out is in the workspace
MODEL = "{model}"  # stands for each enabled model in per-model stages

# Settings that change how fast a stage runs, never what it produces: no cache key, no
# run identity and no DVC stage includes them.
SPEED_ONLY = frozenset({"data.workers"})


@dataclass(frozen=True)
class StageSpec:
    code: tuple[str, ...]  # files (from the repository root) whose bytes define what the stage computes
    params: tuple[str, ...]  # params.yaml keys or whole sections the stage's result depends on
    deps: tuple[str, ...]  # inputs: SOURCE or paths inside the workspace
    outs: tuple[str, ...]  # outputs, paths inside the workspace
    per_model: bool = False  # runs once per enabled model; MODEL in any field names it


_DATA = ("lesionml/data/stages.py", "tasks/data.py")
_MODEL = ("lesionml/model_stages.py", "tasks/model.py")

# In run order (lesionml.workspace.STAGES).
STAGES: dict[str, StageSpec] = {
    "ingest": StageSpec(
        code=("lesionml/data/metadata.py", "lesionml/data/source.py", *_DATA),
        params=("data.source", "data.max_archive_bytes", "data.allow_external_links"),
        deps=(SOURCE,),
        outs=("ingest",),
    ),
    "preprocess": StageSpec(
        code=("lesionml/data/images.py", "lesionml/data/metadata.py", *_DATA),
        params=("data.image_size", "data.max_image_pixels"),
        deps=("ingest",),
        outs=("preprocess",),
    ),
    "split": StageSpec(
        code=("lesionml/data/split.py", *_DATA),
        params=("split",),
        deps=("preprocess/metadata.csv",),
        outs=("split",),
    ),
    "normalize": StageSpec(
        code=("lesionml/data/normalize.py", *_DATA),
        params=(),
        deps=("preprocess/images.npz", "split"),
        outs=("normalize",),
    ),
    "augment": StageSpec(
        code=("lesionml/data/augment.py", *_DATA),
        params=("augment",),
        deps=("preprocess/images.npz", "split"),
        outs=("augment",),
    ),
    "train": StageSpec(
        code=(
            "lesionml/config.py",
            "lesionml/data/augment.py",
            "lesionml/data/stages.py",
            "lesionml/models/__init__.py",
            "lesionml/models/cnn.py",
            "lesionml/models/cnn_lstm.py",
            "lesionml/models/patient.py",
            "lesionml/plots.py",
            "lesionml/provenance.py",
            "lesionml/training.py",
            *_MODEL,
        ),
        params=(f"models.{MODEL}", "train", "augment"),
        deps=("preprocess/images.npz", "preprocess/metadata.csv", "split", "normalize"),
        outs=(f"train/{MODEL}",),
        per_model=True,
    ),
    "evaluate": StageSpec(
        code=(
            "lesionml/data/stages.py",
            "lesionml/evaluation.py",
            "lesionml/explain.py",
            "lesionml/inference.py",
            "lesionml/models/patient.py",
            "lesionml/plots.py",
            *_MODEL,
        ),
        params=("evaluate",),
        deps=(f"train/{MODEL}", "preprocess/images.npz", "preprocess/metadata.csv", "split"),
        outs=(f"evaluate/{MODEL}",),
        per_model=True,
    ),
    "register": StageSpec(
        code=(
            "lesionml/data/source.py",
            "lesionml/model_card.py",
            "lesionml/provenance.py",
            "lesionml/serving_model.py",
            "lesionml/tracking.py",
            *_MODEL,
        ),
        params=("registry", "models.enabled"),
        deps=("ingest", "preprocess/metadata.csv", "split", "train", "evaluate"),
        outs=("register",),
    ),
}

# dvc metrics / dvc plots, per enabled model: (file in the workspace, y fields or the truth column).
METRICS = (f"evaluate/{MODEL}/metrics.json",)
PLOTS = (
    (
        "loss",
        "Training and validation loss per epoch",
        "linear",
        "epoch",
        f"train/{MODEL}/history.csv",
        "[loss, val_loss]",
    ),
    (
        "balanced accuracy",
        "Validation accuracy and balanced accuracy per epoch",
        "linear",
        "epoch",
        f"train/{MODEL}/history.csv",
        "[val_accuracy, val_balanced_accuracy]",
    ),
    (
        "confusion",
        "Confusion matrix (validation and test images)",
        "confusion",
        "predicted",
        f"evaluate/{MODEL}/predictions.csv",
        '"true"',
    ),
)


def code_digest(stage: str, root: Path = ROOT) -> str:
    """The bytes of the stage's code files, each with its name: what its cache key holds of the code."""
    h = hashlib.sha256()
    for name in sorted(set(STAGES[stage].code)):
        h.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return h.hexdigest()


def stage_params(stage: str, params: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """The declared params of `stage` (for `model`) out of a params dump, by dotted name."""
    out: dict[str, Any] = {}
    for dotted in STAGES[stage].params:
        node: Any = params
        for part in dotted.replace(MODEL, model or MODEL).split("."):
            node = node[part]
        out[dotted] = node
    return out


def _dvc_path(path: str) -> str:
    return path if path == SOURCE else f"${{data.workspace}}/{path}".replace(MODEL, "${item}")


def render_dvc_yaml(models: Sequence[str]) -> str:
    """dvc.yaml for these stages; metrics and plots name the files of `models` (params.yaml's models.enabled)."""
    lines = [
        "# GENERATED from lesionml/stage_spec.py by `python -m lesionml.stage_spec > dvc.yaml`: edit",
        "# that declaration, not this file (tests/unit/test_stage_spec.py fails when they differ).",
        "# Each stage calls `lesionml stage <name>`, which runs the same Prefect flow as",
        "# `lesionml run` up to that stage (upstream stages are verified cache hits), so",
        "# `dvc repro` and `lesionml run` compute the same things the same way. See docs/dvc.md.",
        "stages:",
    ]
    for name, spec in STAGES.items():
        lines.append(f"  {name}:")
        pad = "    "
        if spec.per_model:
            lines += [f"{pad}foreach: ${{models.enabled}}", f"{pad}do:"]
            pad += "  "
        cmd = f"lesionml stage {name}" + (" --model ${item}" if spec.per_model else "")
        lines += [f"{pad}cmd: {cmd}", f"{pad}deps:"]
        lines += [f"{pad}  - {_dvc_path(d)}" for d in spec.deps]
        lines += [f"{pad}  - {c}" for c in spec.code]
        if spec.params:
            lines.append(f"{pad}params:")
            lines += [f"{pad}  - {p.replace(MODEL, '${item}')}" for p in spec.params]
        lines.append(f"{pad}outs:")
        lines += [f"{pad}  - {_dvc_path(o)}" for o in spec.outs]
        lines.append("")
    lines.append("metrics:")
    lines += [f"  - {_dvc_path(m.replace(MODEL, model))}" for m in METRICS for model in models]
    lines += ["", "plots:"]
    for plot_id, title, template, x, path, y in PLOTS:
        lines += [
            f"  - {plot_id}:",
            f"      title: {title}",
            f"      template: {template}",
            f"      x: {x}",
            "      y:",
        ]
        lines += [f"        {_dvc_path(path.replace(MODEL, model))}: {y}" for model in models]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from lesionml.config import load_params

    print(render_dvc_yaml(load_params(ROOT / "params.yaml").models.enabled), end="")
