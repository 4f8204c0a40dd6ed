"""The private Keras APIs keras_softmax relies on, each checked against Keras 3.15.

Gathered here so that a Keras release that moves one breaks one import.
"""

from keras.src.backend import get_keras_mask  # noqa: F401 (3.15)
from keras.src.backend import set_keras_mask  # noqa: F401 (3.15)
