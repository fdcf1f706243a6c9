"""MODEL1: the seed notebook's CNN family, widths and depths from params."""

from __future__ import annotations

from lesionml.config import CNNConfig
from lesionml.data.normalize import NormStats


def build_cnn(cfg: CNNConfig, image_size: tuple[int, int], stats: NormStats, n_classes: int):
    import keras
    from keras import layers

    from lesionml.models import conv_block, normalization_layer

    model = keras.Sequential(name="cnn")
    model.add(keras.Input(shape=(*image_size, 3), name="image"))
    model.add(normalization_layer(stats))
    for b, (filters, convs) in enumerate(zip(cfg.filters, cfg.block_convs(), strict=True)):
        for layer in conv_block(b, filters, convs, cfg.kernel_size, cfg.dropout):
            model.add(layer)
    model.add(
        layers.Flatten(name="flatten")
        if cfg.head == "flatten"
        else layers.GlobalAveragePooling2D(name="global_average")
    )
    model.add(layers.Dense(cfg.dense_units, activation="relu", name="dense"))
    model.add(layers.Dropout(cfg.dense_dropout, name="dense_dropout"))
    model.add(layers.Dense(n_classes, activation="softmax", name="probabilities", dtype="float32"))
    return model
