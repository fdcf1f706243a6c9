"""params.yaml -> typed, validated configuration: the one source of truth for every stage.

Every section is a frozen pydantic model that forbids unknown keys, so a typo in
params.yaml or in `--set` fails at load time with one line naming the key, instead of
being silently ignored and producing a run that differs from what the user asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lesionml.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    source: Path = Path("data/sample")
    workspace: Path = Path("workspace")
    image_size: tuple[int, int] = (75, 100)
    workers: int = Field(2, ge=1, le=64)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_archive_bytes: int = Field(20_000_000_000, ge=1)

    @model_validator(mode="after")
    def _check_size(self) -> DataConfig:
        height, width = self.image_size
        if not (8 <= height <= 1024 and 8 <= width <= 1024):
            raise ValueError(f"image_size must be two sides between 8 and 1024, got {list(self.image_size)}")
        return self


class SplitConfig(_Section):
    seed: int = 42
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)

    @model_validator(mode="after")
    def _check_fractions(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be below 1 to leave a training split, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        return self


class AugmentConfig(_Section):
    seed: int = 42
    rotation_degrees: float = Field(180.0, ge=0, le=180)
    shift_fraction: float = Field(0.1, ge=0, lt=1)
    zoom_fraction: float = Field(0.1, ge=0, lt=1)
    horizontal_flip: bool = True
    vertical_flip: bool = True
    brightness: float = Field(0.1, ge=0, le=1)
    contrast: float = Field(0.1, ge=0, lt=1)
    preview_images: int = Field(8, ge=1, le=32)


# The names lesionml.models can build; one config section per name below.
MODEL_NAMES = ("cnn", "cnn_lstm")


class MetadataConfig(_Section):
    """Patient age, sex and lesion site as extra model inputs, fused with the image features.

    `dense_units`: the width of the dense layer on the encoded metadata. `withhold`: the
    fraction of training images whose metadata is hidden in each epoch (a fresh draw per
    epoch), so the model also answers well without it. Never the diagnosis type (dx_type):
    how a diagnosis was confirmed leaks the diagnosis.
    """

    enabled: bool
    dense_units: int = Field(ge=1, le=1024)
    withhold: float = Field(ge=0, lt=1)


class _ModelSection(_Section):
    """A model's architecture, plus `train`: settings of the train section for this model only.

    Models of different depth peak at different points of a schedule: the CNN+LSTM overfits
    in the epochs the CNN still needs (see README, "Results"). Keys are `train` keys.
    """

    train: dict[str, Any] = Field(default_factory=dict)
    # Absent: image only, as with `enabled: false`.
    metadata: MetadataConfig | None = None

    @field_validator("train")
    @classmethod
    def _check_train_overrides(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(overrides) - set(TrainConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown train setting {unknown[0]!r}; known: {', '.join(TrainConfig.model_fields)}")
        try:
            TrainConfig.model_validate(overrides)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ValueError(f"{err['loc'][0]}: {err['msg']} (got {err['input']!r})") from None
        return overrides


class CNNConfig(_ModelSection):
    """MODEL1: conv blocks (convs + max pool + batch norm + dropout), a pooling head, two Dense.

    `head`: `flatten` keeps where each feature was (the seed's head, most parameters);
    `global_average` averages each feature map over the image, which suits lesions that
    can sit anywhere in the frame at any rotation.
    """

    filters: tuple[int, ...] = (32, 64, 128, 256)
    # One count for every block, or one per block: a conv at 12x16 costs a fraction of one at
    # full resolution, so depth is cheapest where the map is small.
    convs_per_block: int | tuple[int, ...] = 1
    kernel_size: int = Field(3, ge=1, le=11)
    dropout: float = Field(0.1, ge=0, lt=1)
    head: Literal["flatten", "global_average"] = "flatten"
    dense_units: int = Field(128, ge=1)
    dense_dropout: float = Field(0.5, ge=0, lt=1)

    @model_validator(mode="after")
    def _check_convs(self) -> CNNConfig:
        counts = self.convs_per_block
        if isinstance(counts, tuple) and len(counts) != len(self.filters):
            raise ValueError(
                f"convs_per_block lists {len(counts)} counts for {len(self.filters)} blocks (filters {list(self.filters)})"
            )
        if any(not 1 <= c <= 4 for c in self.block_convs()):
            raise ValueError(f"convs_per_block must be between 1 and 4 per block, got {counts}")
        return self

    def block_convs(self) -> tuple[int, ...]:
        """The number of convs of each block."""
        counts = self.convs_per_block
        return counts if isinstance(counts, tuple) else (counts,) * len(self.filters)


class CNNLSTMConfig(_ModelSection):
    """MODEL2: conv front (conv + max pool + batch norm), rows of the map read by an LSTM."""

    filters: tuple[int, ...] = (32, 64, 128)
    kernel_size: int = Field(3, ge=1, le=11)
    dropout: float = Field(0.25, ge=0, lt=1)
    lstm_units: int = Field(64, ge=1)
    bidirectional: bool = False
    dense_units: int = Field(64, ge=1)
    dense_dropout: float = Field(0.5, ge=0, lt=1)


class ModelsConfig(_Section):
    enabled: tuple[str, ...] = ("cnn", "cnn_lstm")
    cnn: CNNConfig = CNNConfig()
    cnn_lstm: CNNLSTMConfig = CNNLSTMConfig()

    @model_validator(mode="after")
    def _check_enabled(self) -> ModelsConfig:
        unknown = [m for m in self.enabled if m not in MODEL_NAMES]
        if unknown:
            raise ValueError(f"unknown model {unknown[0]!r}; known models: {', '.join(MODEL_NAMES)}")
        if not self.enabled:
            raise ValueError("enable at least one model")
        return self


class TrainConfig(_Section):
    """Optimisation: AdamW, a per-epoch learning-rate schedule, class weights, best-epoch restore.

    `lr_schedule: cosine` warms up linearly for `warmup_epochs` (at most epochs - 1), then
    decays to 0 by the last epoch (a known length suits a fixed time budget); `plateau` halves the rate when `monitor`
    stalls for `lr_patience` epochs. `class_weight_power` interpolates between no class
    weighting (0) and fully balanced weights n / (k * count) (1): HAM10000 is two thirds
    nv, and the power trades plain accuracy against rare-class recall.
    """

    seed: int = 42
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=4096)
    learning_rate: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, lt=1)  # AdamW, decoupled
    lr_schedule: Literal["cosine", "plateau"] = "cosine"
    warmup_epochs: int = Field(1, ge=0)
    class_weight_power: float = Field(0.5, ge=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    monitor: Literal["val_loss", "val_accuracy", "val_balanced_accuracy"] = "val_loss"
    early_stopping_patience: int = Field(0, ge=0)  # 0: never stop early
    lr_patience: int = Field(2, ge=1)  # plateau schedule only
    lr_factor: float = Field(0.5, gt=0, lt=1)
    min_lr: float = Field(1e-5, ge=0)
    # Validate, pick the best epoch and save with an exponential moving average of the
    # weights (and batch-norm statistics), updated after every step with this decay; 0: the
    # live weights. 0.999 remembers about 1,000 steps (5 epochs of the full data at batch 32).
    ema_decay: float = Field(0.0, ge=0, lt=1)
    deterministic: bool = False
    # mixed_bfloat16: layers compute in bfloat16, weights stay float32. Layers ran 1.2-1.5x
    # faster on the Intel machine's AMX/AVX512-BF16 cores, but whole epochs (augmentation shares
    # the cores) only 1.06x, for no better scores (README, "Results"); on a CPU without
    # bfloat16 units it is emulated, so slower.
    precision: Literal["float32", "mixed_bfloat16"] = "float32"


class EvaluateConfig(_Section):
    """How trained models are scored (and, since it travels with the registered model, served)."""

    tta: bool = True  # average the image and its 3 mirror images (see lesionml.inference.predict_proba)
    bootstrap: int = Field(1000, ge=100, le=100_000)  # lesion resamples for the 95% intervals
    # Divide prior**tau out of the decisions, tau tuned on val (see evaluation.tune_prior_correction):
    # the operating point between accuracy and balanced accuracy. With `min_balanced_accuracy`
    # null, tau maximizes val balanced accuracy (on the full data +0.015 test balanced accuracy for
    # -0.085 accuracy, before temperature scaling existed); with a floor, tau maximizes val
    # accuracy while val balanced accuracy stays at or above it (README, "Prior correction"). The
    # floor, like lr_patience for the plateau schedule, is read only when its rule is on.
    prior_correction: bool = True
    min_balanced_accuracy: float | None = Field(0.65, ge=0, le=1)
    # Fit one temperature on val so served probabilities match how often they are right (see
    # evaluation.fit_temperature). It changes no decision by itself; a prior correction is
    # tuned after it, on the tempered probabilities.
    temperature_scaling: bool = True


class TrackingConfig(_Section):
    uri: str = "sqlite:///mlruns.db"
    artifacts: Path = Path("mlartifacts")
    experiment: str = Field("lesionml", min_length=1)


class RegistryConfig(_Section):
    """Champion/challenger rule: promote only on a win larger than the test-set noise."""

    model_name: str = Field("lesionml", min_length=1)
    promotion_metric: Literal["balanced_accuracy", "accuracy", "macro_f1"] = "balanced_accuracy"
    alpha: float = Field(0.05, gt=0, lt=1)  # one-sided paired-bootstrap significance level
    bootstrap: int = Field(1000, ge=100, le=100_000)  # resamples of test lesions


class ScheduleConfig(_Section):
    """When `lesionml schedule` retrains: a 5-field cron expression in `timezone`."""

    cron: str = Field("0 3 * * 1", pattern=r"^\s*\S+(\s+\S+){4}\s*$")  # Mondays 03:00
    timezone: str = Field("UTC", min_length=1)


class Params(_Section):
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    augment: AugmentConfig = AugmentConfig()
    models: ModelsConfig = ModelsConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()
    schedule: ScheduleConfig = ScheduleConfig()

    def resolve_paths(self, root: Path) -> Params:
        """Anchor relative paths at the folder of params.yaml, so commands work from any cwd."""
        data = self.data.model_copy(
            update={
                "source": (root / self.data.source).resolve(),
                "workspace": (root / self.data.workspace).resolve(),
            }
        )
        tracking = self.tracking.model_copy(update={"artifacts": (root / self.tracking.artifacts).resolve()})
        if self.tracking.uri.startswith("sqlite:///") and not self.tracking.uri.startswith("sqlite:////"):
            db = (root / self.tracking.uri.removeprefix("sqlite:///")).resolve()
            tracking = tracking.model_copy(update={"uri": f"sqlite:///{db}"})
        return self.model_copy(update={"data": data, "tracking": tracking})

    def train_for(self, model: str) -> TrainConfig:
        """The train section as `model` trains: with its `models.<model>.train` settings applied."""
        return TrainConfig.model_validate({**self.train.model_dump(), **getattr(self.models, model).train})

    def flat(self) -> dict[str, Any]:
        """Every param as `section.key` -> value: how MLflow and DVC show them."""
        out: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = node

        walk("", self.model_dump(mode="json"))
        return out

    def section(self, name: str) -> dict[str, Any]:
        """A section as plain JSON-able data: what tasks hash into their cache keys."""
        return getattr(self, name).model_dump(mode="json")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value`, the value read as YAML so `3`, `0.5`, `true`, `[64, 64]` get their types."""
    key, sep, raw = text.partition("=")
    if not sep or not key or "." not in key:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. split.seed=7")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc.problem})") from None
    return key.strip(), value


def _format_error(origin: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{where}'"
    msg = err["msg"].removeprefix("Value error, ")
    # A whole section as input means a check across its keys, whose message names the values.
    got = "" if isinstance(err.get("input"), dict) else f" (got {err.get('input')!r})"
    more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    return f"{origin}: {where}: {msg}{got}{more}"


def load_params(path: Path | str = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read, override and validate params; relative paths resolve against the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    # A section whose keys are all commented out parses as None: it means "all defaults".
    tree = {k: ({} if v is None else v) for k, v in tree.items()}
    for item in overrides:
        _set_dotted(tree, *parse_override(item))
    origin = f"{path}" + (" with --set " + " ".join(overrides) if overrides else "")
    try:
        params = Params.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_error(origin, exc)) from None
    return params.resolve_paths(path.resolve().parent)
