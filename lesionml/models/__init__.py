"""Model builders by name: params.yaml's `models.enabled` picks from this registry.

Every builder returns an uncompiled Keras model whose input is raw RGB pixels (0-255,
float32, shape (H, W, 3)) and whose first layer z-scores them with the training split's
statistics. The statistics therefore ship inside every saved model, and inference needs
nothing but resizing. The softmax layer is float32 whatever the precision, so probabilities
(and the losses, TTA averages and offsets computed from them) keep full precision; so is the
z-scoring, which bfloat16's 8-bit mantissa would round to whole pixel values before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from lesionml.data.normalize import NormStats

if TYPE_CHECKING:
    import keras

    from lesionml.models.patient import PatientStats

ENSEMBLE_AVERAGE = "ensemble_average"  # the layer that marks an ensemble and averages its members

Builder = Callable[[Any, tuple[int, int], NormStats, int, "PatientStats | None"], "keras.Model"]


def _builders() -> dict[str, Builder]:
    from lesionml.models.cnn import build_cnn
    from lesionml.models.cnn_lstm import build_cnn_lstm

    return {"cnn": build_cnn, "cnn_lstm": build_cnn_lstm}


def modules() -> tuple:
    """The builder modules, whose source is part of the training cache key."""
    from lesionml.models import cnn, cnn_lstm, patient

    return (cnn, cnn_lstm, patient)


def build_model(
    name: str,
    cfg: Any,
    image_size: tuple[int, int],
    stats: NormStats,
    n_classes: int,
    precision: str = "float32",
    patient: PatientStats | None = None,
) -> keras.Model:
    """Build under dtype policy `precision`: each layer keeps the policy it was built with,
    in training and in the saved model, so the global policy is restored straight after.

    `patient`: the metadata encoding fitted on the train split, which a model whose
    `metadata.enabled` is on needs (and any other model ignores)."""
    import keras

    from lesionml.models.patient import enabled

    builders = _builders()
    if name not in builders:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(builders)}")
    if enabled(cfg) and patient is None:
        raise ValueError(f"{name}: metadata is enabled, so the model needs the train split's PatientStats")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        return builders[name](cfg, image_size, stats, n_classes, patient if enabled(cfg) else None)
    finally:
        keras.config.set_dtype_policy(previous)


def classifier(
    image: keras.KerasTensor,
    features: keras.KerasTensor,
    cfg: Any,
    n_classes: int,
    patient: PatientStats | None,
    name: str,
) -> keras.Model:
    """The head both models share: Dense, dropout, softmax on the image features, which are
    first concatenated with the metadata branch's features when `patient` is given."""
    import keras
    from keras import layers

    from lesionml.models.patient import metadata_branch

    inputs = [image]
    x = features
    if patient is not None:
        extra, metadata = metadata_branch(patient, cfg.metadata.dense_units)
        inputs += extra
        x = layers.Concatenate(name="fuse_metadata")([x, metadata])
    x = layers.Dense(cfg.dense_units, activation="relu", name="dense")(x)
    x = layers.Dropout(cfg.dense_dropout, name="dense_dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    # One input stays a bare tensor: the model keeps the single-input interface (input_shape, arrays).
    return keras.Model(inputs if patient is not None else image, outputs, name=name)


def normalization_layer(stats: NormStats) -> keras.layers.Layer:
    import keras

    return keras.layers.Normalization(
        axis=-1,
        mean=list(stats.mean),
        variance=[s * s for s in stats.std],
        name="zscore_train_stats",
        dtype="float32",
    )


def conv_block(index: int, filters: int, convs: int, kernel_size: int, dropout: float) -> list[keras.layers.Layer]:
    """The layers of conv block `index`: `convs` ReLU convs, 2x2 max pool, batch norm, dropout.

    Batch norm comes after the pool, on a quarter of the values. Its per-channel affine map
    commutes with the max while its scale is positive, so the block computes much the same
    functions as with the norm first (the batch statistics are those of the pooled map), and
    training runs much faster, since full-resolution normalization was most of the cost
    (docs/benchmarks.md; its effect on validation scores: docs/results.md).
    """
    from keras import layers

    return [
        *(
            layers.Conv2D(filters, kernel_size, padding="same", activation="relu", name=f"b{index}_conv{c}")
            for c in range(convs)
        ),
        layers.MaxPooling2D(2, name=f"b{index}_pool"),
        layers.BatchNormalization(name=f"b{index}_bn"),
        layers.Dropout(dropout, name=f"b{index}_dropout"),
    ]


def ensemble(members: Sequence[keras.Model]) -> keras.Model:
    """One model whose output is the mean of its members' class probabilities, with the
    members' inputs: evaluated, registered, served and explained like any single model.
    Averaging probabilities (not logits) keeps each member's calibration in the mean."""
    import keras

    if len(members) == 1:
        return members[0]

    def by_name(tensors: list) -> Any:  # a model with the metadata branch takes its inputs by name
        return {t.name: t for t in tensors} if len(tensors) > 1 else tensors[0]

    inputs = by_name([keras.Input(shape=t.shape[1:], dtype=t.dtype, name=t.name) for t in members[0].inputs])
    # A functional model needs unique names for the models it holds: each member is re-wrapped
    # (same layers, same weights) under its own.
    renamed = [keras.Model(by_name(m.inputs), m.outputs[0], name=f"member_{k}") for k, m in enumerate(members, 1)]
    outputs = keras.layers.Average(name=ENSEMBLE_AVERAGE, dtype="float32")([m(inputs) for m in renamed])
    return keras.Model(inputs, outputs, name=f"{members[0].name}_ensemble_of_{len(members)}")


def ensemble_members(model: keras.Model) -> list[keras.Model]:
    """The members of an ensemble built by `ensemble`; a single model is its own one member."""
    import keras

    if not any(layer.name == ENSEMBLE_AVERAGE for layer in model.layers):
        return [model]
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]
