"""params.yaml -> typed, validated configuration.

params.yaml holds every value; the sections here hold only types and bounds. A setting
has no default in code (a missing key is an error naming it) unless its absence means
something (a model's own `train` settings: none), so the file and the code cannot disagree
about what a run does. What each setting does and why it has its value: docs/configuration.md.

Every section is a frozen pydantic model that forbids unknown keys, so a typo in
params.yaml or in `--set` fails at load time with one line naming the key, instead of
being silently ignored and producing a run that differs from what the user asked for.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from lesionml.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    source: Path
    workspace: Path
    image_size: tuple[int, int]
    workers: int = Field(ge=1, le=64)
    max_image_pixels: int = Field(ge=1)
    max_archive_bytes: int = Field(ge=1)
    allow_external_links: bool

    @model_validator(mode="after")
    def _check_size(self) -> DataConfig:
        height, width = self.image_size
        if not (8 <= height <= 1024 and 8 <= width <= 1024):
            raise ValueError(f"image_size must be two sides between 8 and 1024, got {list(self.image_size)}")
        return self


class SplitConfig(_Section):
    seed: int
    val_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _check_fractions(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be below 1 to leave a training split, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        return self


class AugmentConfig(_Section):
    seed: int
    rotation_degrees: float = Field(ge=0, le=180)
    shift_fraction: float = Field(ge=0, lt=1)
    zoom_fraction: float = Field(ge=0, lt=1)
    horizontal_flip: bool
    vertical_flip: bool
    brightness: float = Field(ge=0, le=1)
    contrast: float = Field(ge=0, lt=1)
    preview_images: int = Field(ge=1, le=32)


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

    Models of different depth peak at different points of a schedule (docs/results.md), so
    a model may name its own values of some `train` keys; absent, it trains as `train` says.
    """

    train: dict[str, Any] = Field(default_factory=dict)
    # Absent: image only, as with `enabled: false`.
    metadata: MetadataConfig | None = None
    # Independently seeded copies (seeds train.seed, +1, ...) whose mean probabilities are the model.
    ensemble: int = Field(ge=1, le=10)

    @field_validator("train")
    @classmethod
    def _check_train_overrides(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        fields = TrainConfig.model_fields
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(f"unknown train setting {unknown[0]!r}; known: {', '.join(fields)}")
        for key, value in overrides.items():
            try:
                field = fields[key]
                bounded = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
                TypeAdapter(bounded).validate_python(value)
            except ValidationError as exc:
                raise ValueError(f"{key}: {exc.errors()[0]['msg']} (got {value!r})") from None
        return overrides


class CNNConfig(_ModelSection):
    """MODEL1: conv blocks (convs + max pool + batch norm + dropout), a pooling head, two Dense.

    `head`: `flatten` keeps where each feature was (the seed's head, most parameters);
    `global_average` averages each feature map over the image, which suits lesions that
    can sit anywhere in the frame at any rotation.
    """

    filters: tuple[int, ...]
    # One count for every block, or one per block: a conv at 12x16 costs a fraction of one at
    # full resolution, so depth is cheapest where the map is small.
    convs_per_block: int | tuple[int, ...]
    kernel_size: int = Field(ge=1, le=11)
    dropout: float = Field(ge=0, lt=1)
    head: Literal["flatten", "global_average"]
    dense_units: int = Field(ge=1)
    dense_dropout: float = Field(ge=0, lt=1)

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

    filters: tuple[int, ...]
    kernel_size: int = Field(ge=1, le=11)
    dropout: float = Field(ge=0, lt=1)
    lstm_units: int = Field(ge=1)
    bidirectional: bool
    dense_units: int = Field(ge=1)
    dense_dropout: float = Field(ge=0, lt=1)


class ModelsConfig(_Section):
    enabled: tuple[str, ...]
    cnn: CNNConfig
    cnn_lstm: CNNLSTMConfig

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

    seed: int
    epochs: int = Field(ge=1, le=1000)
    batch_size: int = Field(ge=1, le=4096)
    learning_rate: float = Field(gt=0, le=1)
    weight_decay: float = Field(ge=0, lt=1)  # AdamW, decoupled
    lr_schedule: Literal["cosine", "plateau"]
    warmup_epochs: int = Field(ge=0)
    class_weight_power: float = Field(ge=0, le=1)
    label_smoothing: float = Field(ge=0, lt=1)
    monitor: Literal["val_loss", "val_accuracy", "val_balanced_accuracy"]
    early_stopping_patience: int = Field(ge=0)  # 0: never stop early
    lr_patience: int = Field(ge=1)  # plateau schedule only
    lr_factor: float = Field(gt=0, lt=1)
    min_lr: float = Field(ge=0)
    # Validate, pick the best epoch and save with an exponential moving average of the
    # weights (and batch-norm statistics), updated after every step with this decay; 0: the
    # live weights. A decay d averages over about 1 / (1 - d) steps.
    ema_decay: float = Field(ge=0, lt=1)
    deterministic: bool
    # mixed_bfloat16: layers compute in bfloat16, weights stay float32. It pays only on CPUs
    # with bfloat16 units (AMX/AVX512-BF16), where augmentation still shares the cores; on
    # others it is emulated, so slower. Measurements: docs/results.md.
    precision: Literal["float32", "mixed_bfloat16"]


class EvaluateConfig(_Section):
    """How trained models are scored (and, since it travels with the registered model, served)."""

    tta: bool  # average the image and its 3 mirror images (see lesionml.inference.predict_proba)
    bootstrap: int = Field(ge=100, le=100_000)  # lesion resamples for the 95% intervals
    # Divide prior**tau out of the decisions, tau tuned on val (see evaluation.tune_prior_correction):
    # the operating point between accuracy and balanced accuracy. With `min_balanced_accuracy`
    # null, tau maximizes val balanced accuracy; with a floor, tau maximizes val accuracy while
    # val balanced accuracy stays at or above it (docs/evaluation.md). The floor, like
    # lr_patience for the plateau schedule, is read only when its rule is on; null is a choice,
    # so it is stated, not defaulted.
    prior_correction: bool
    min_balanced_accuracy: float | None = Field(ge=0, le=1)
    # Fit one temperature on val so served probabilities match how often they are right (see
    # evaluation.fit_temperature). It changes no decision by itself; a prior correction is
    # tuned after it, on the tempered probabilities.
    temperature_scaling: bool
    # prior_correction: the rule above. melanoma_sensitivity: that rule, then an offset on the
    # melanoma log-probability, the smallest giving val melanoma sensitivity >= the target (see
    # evaluation.melanoma_operating_point); the target is read only under that operating point.
    operating_point: Literal["prior_correction", "melanoma_sensitivity"]
    mel_sensitivity_target: float = Field(gt=0, le=1)


class TrackingConfig(_Section):
    uri: str
    artifacts: Path
    experiment: str = Field(min_length=1)


class RegistryConfig(_Section):
    """Champion/challenger rule: promote only on a win larger than the test-set noise."""

    model_name: str = Field(min_length=1)
    promotion_metric: Literal["balanced_accuracy", "accuracy", "macro_f1"]
    alpha: float = Field(gt=0, lt=1)  # one-sided paired-bootstrap significance level
    bootstrap: int = Field(ge=100, le=100_000)  # resamples of test lesions


class ScheduleConfig(_Section):
    """When `lesionml schedule` retrains: a 5-field cron expression in `timezone`."""

    cron: str = Field(pattern=r"^\s*\S+(\s+\S+){4}\s*$")
    timezone: str = Field(min_length=1)


class Params(_Section):
    data: DataConfig
    split: SplitConfig
    augment: AugmentConfig
    models: ModelsConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    tracking: TrackingConfig
    registry: RegistryConfig
    schedule: ScheduleConfig
    profile: str | None  # the overlay of `profiles` this run applied (load_params merged it in); None: none
    profiles: dict[str, dict[str, Any]]  # named overlays over the sections above, e.g. `thorough`

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
        """Every param as `section.key` -> value: how MLflow and DVC show them (the profiles not
        applied are no part of a run: `profile` names the one that is, already merged in)."""
        return flatten(self.model_dump(mode="json", exclude={"profiles"}))

    def section(self, name: str) -> dict[str, Any]:
        """A section as plain JSON-able data."""
        return getattr(self, name).model_dump(mode="json")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as `section.key` -> leaf value."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


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
    if not sep or not key or ("." not in key and key.strip() != "profile"):
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
    if err["type"] == "missing":
        missing = [e for e in exc.errors() if e["type"] == "missing"]
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        return f"{origin}: {where}: missing{more}"
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
    # A section whose keys are all commented out parses as None: its keys are then named as missing.
    tree = {k: ({} if v is None and k != "profile" else v) for k, v in tree.items()}
    changes = [parse_override(item) for item in overrides]
    for change in changes:
        _set_dotted(tree, *change)
    origin = f"{path}" + (" with --set " + " ".join(overrides) if overrides else "")
    chosen = tree.get("profile")
    params = _validate(tree if chosen is None else _overlaid(tree, chosen, changes, origin), origin)
    for name in set(params.profiles) - {chosen}:  # a typo in a profile fails before anyone uses it
        _validate(_overlaid(tree, name, changes), f"{path}: profiles.{name}")
    return params.resolve_paths(path.resolve().parent)


def _validate(tree: dict[str, Any], origin: str) -> Params:
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_error(origin, exc)) from None


def _overlaid(tree: dict[str, Any], name: Any, changes: list[tuple[str, Any]], origin: str = "") -> dict[str, Any]:
    """`tree` with profile `name` deep-merged over it, then the --set changes again: they win."""
    profiles = tree.get("profiles") if isinstance(tree.get("profiles"), dict) else {}
    if name not in profiles or not isinstance(profiles[name], dict):
        known = ", ".join(profiles) or "none in profiles:"
        raise ConfigError(f"{origin}: profile: unknown profile {name!r}; known: {known}")
    merged = copy.deepcopy(tree)
    _merge(merged, profiles[name])
    merged["profile"] = name
    for change in changes:
        _set_dotted(merged, *change)
    return merged


def _merge(tree: dict[str, Any], overlay: dict[str, Any]) -> None:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge(tree[key], value)
        else:
            tree[key] = copy.deepcopy(value)
