"""MODEL2: a convolutional front whose feature map an LSTM reads row by row.

The map (rows, cols, channels) is reshaped to (rows, cols * channels): step t of the
sequence is row t of the map, top to bottom, so the LSTM sees a spatially ordered
sequence (the seed notebook instead reshaped the map into an arbitrary order).
"""

from __future__ import annotations

from lesionml.config import CNNLSTMConfig
from lesionml.data.normalize import NormStats
from lesionml.models.patient import PatientStats


def build_cnn_lstm(
    cfg: CNNLSTMConfig, image_size: tuple[int, int], stats: NormStats, n_classes: int, patient: PatientStats | None
):
    import keras
    from keras import layers

    from lesionml.models import classifier, conv_block, normalization_layer

    image = keras.Input(shape=(*image_size, 3), name="image")
    x = normalization_layer(stats)(image)
    for b, filters in enumerate(cfg.filters):
        for layer in conv_block(b, filters, 1, cfg.kernel_size, cfg.dropout):
            x = layer(x)
    rows, cols, channels = x.shape[1], x.shape[2], x.shape[3]
    x = layers.Reshape((rows, cols * channels), name="rows_as_sequence")(x)
    lstm = layers.LSTM(cfg.lstm_units, name="lstm")
    x = layers.Bidirectional(lstm, name="bilstm")(x) if cfg.bidirectional else lstm(x)
    return classifier(image, x, cfg, n_classes, patient, "cnn_lstm")
