"""End to end: a masked sequence classifier built on StableMultiHeadAttention."""

import keras
import numpy as np

from keras_softmax import StableMultiHeadAttention

VOCABULARY, LENGTH = 12, 24


def _sequences(count, rng):
    """Variable-length sequences, padded with 0; the label: more 1s than 2s.

    The other tokens (3 and up) are noise, and each sequence holds an odd
    number of 1s and 2s, so there is no tie. Half the positions of a batch
    are padding, so a model that attended to it would see its votes diluted
    differently for every length.
    """
    ids = np.zeros((count, LENGTH), "int32")
    labels = np.zeros(count, "int32")
    for i in range(count):
        length = rng.integers(3, LENGTH + 1)
        votes = 2 * rng.integers(0, (length + 1) // 2) + 1  # odd, <= length
        ones = rng.integers(0, votes + 1)
        tokens = np.concatenate(
            [
                np.ones(ones, "int32"),
                np.full(votes - ones, 2, "int32"),
                rng.integers(3, VOCABULARY, size=length - votes),
            ]
        )
        ids[i, :length] = rng.permutation(tokens)
        labels[i] = ones > votes - ones
    return ids, labels


def _classifier():
    tokens = keras.Input((LENGTH,), dtype="int32")
    x = keras.layers.Embedding(VOCABULARY, 16, mask_zero=True)(tokens)
    x = StableMultiHeadAttention(num_heads=2, key_dim=8)(x, x)
    # Masked average: padded positions count for nothing.
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(2, activation="softmax")(x)
    return keras.Model(tokens, outputs)


def test_masked_sequence_classifier_reaches_95_percent_test_accuracy():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x_train, y_train = _sequences(1500, rng)
    x_test, y_test = _sequences(1000, rng)
    model = _classifier()
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=64, epochs=8, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    assert accuracy >= 0.95
