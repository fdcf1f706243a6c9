"""MODEL1: the seed notebook's CNN family, widths and depths from params."""

from __future__ import annotations

from lesionml.config import CNNConfig
from lesionml.data.normalize import NormStats
from lesionml.models.patient import PatientStats


def build_cnn(
    cfg: CNNConfig, image_size: tuple[int, int], stats: NormStats, n_classes: int, patient: PatientStats | None
):
    import keras
    from keras import layers

    from lesionml.models import classifier, conv_block, normalization_layer

    image = keras.Input(shape=(*image_size, 3), name="image")
    x = normalization_layer(stats)(image)
    for b, (filters, convs) in enumerate(zip(cfg.filters, cfg.block_convs(), strict=True)):
        for layer in conv_block(b, filters, convs, cfg.kernel_size, cfg.dropout):
            x = layer(x)
    pool = (
        layers.Flatten(name="flatten")
        if cfg.head == "flatten"
        else layers.GlobalAveragePooling2D(name="global_average")
    )
    return classifier(image, pool(x), cfg, n_classes, patient, "cnn")
