"""MODEL2: a convolutional front whose feature map an LSTM reads row by row.

The map (rows, cols, channels) is reshaped to (rows, cols * channels): step t of the
sequence is row t of the map, top to bottom, so the LSTM sees a spatially ordered
sequence (the seed notebook instead reshaped the map into an arbitrary order).
"""

from __future__ import annotations

from lesionml.config import CNNLSTMConfig
from lesionml.data.normalize import NormStats


def build_cnn_lstm(cfg: CNNLSTMConfig, image_size: tuple[int, int], stats: NormStats, n_classes: int):
    import keras
    from keras import layers

    from lesionml.models import conv_block, normalization_layer

    inputs = keras.Input(shape=(*image_size, 3), name="image")
    x = normalization_layer(stats)(inputs)
    for b, filters in enumerate(cfg.filters):
        for layer in conv_block(b, filters, 1, cfg.kernel_size, cfg.dropout):
            x = layer(x)
    rows, cols, channels = x.shape[1], x.shape[2], x.shape[3]
    x = layers.Reshape((rows, cols * channels), name="rows_as_sequence")(x)
    lstm = layers.LSTM(cfg.lstm_units, name="lstm")
    x = layers.Bidirectional(lstm, name="bilstm")(x) if cfg.bidirectional else lstm(x)
    x = layers.Dense(cfg.dense_units, activation="relu", name="dense")(x)
    x = layers.Dropout(cfg.dense_dropout, name="dense_dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="cnn_lstm")
