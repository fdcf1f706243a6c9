"""MODEL1: the seed notebook's CNN family, widths and depths from params."""

from __future__ import annotations

from lesionml.config import CNNConfig
from lesionml.data.normalize import NormStats


def build_cnn(cfg: CNNConfig, image_size: tuple[int, int], stats: NormStats, n_classes: int):
    import keras
    from keras import layers

    from lesionml.models import normalization_layer

    model = keras.Sequential(name="cnn")
    model.add(keras.Input(shape=(*image_size, 3), name="image"))
    model.add(normalization_layer(stats))
    for b, (filters, convs) in enumerate(zip(cfg.filters, cfg.block_convs())):
        for c in range(convs):
            model.add(layers.Conv2D(filters, cfg.kernel_size, padding="same", activation="relu", name=f"b{b}_conv{c}"))
        model.add(layers.BatchNormalization(name=f"b{b}_bn"))
        model.add(layers.MaxPooling2D(2, name=f"b{b}_pool"))
        model.add(layers.Dropout(cfg.dropout, name=f"b{b}_dropout"))
    model.add(layers.Flatten(name="flatten") if cfg.head == "flatten" else layers.GlobalAveragePooling2D(name="global_average"))
    model.add(layers.Dense(cfg.dense_units, activation="relu", name="dense"))
    model.add(layers.Dropout(cfg.dense_dropout, name="dense_dropout"))
    model.add(layers.Dense(n_classes, activation="softmax", name="probabilities", dtype="float32"))
    return model
