"""keras_softmax: a softmax for Keras 3 that is exact for any finite logits.

The public API, written with `keras.ops`, so it runs on every backend:

Functions:
    stable_softmax: softmax with a mask and a temperature; never overflows.
    stable_log_softmax: its logarithm, computed in log space.

Layer:
    StableSoftmax: the softmax as a layer; takes Keras masks, and a fixed
        or learnable temperature.

Activation names (registered by `import keras_softmax`):
    "stable_softmax", "stable_log_softmax": e.g.
        `keras.layers.Dense(10, activation="stable_softmax")`.

Attention:
    dot_product_attention: `keras.ops.dot_product_attention` in which a
        fully masked query gives 0.
    BlockSizes: the blocks' query and key sizes, for `block_sizes=`.
    StableMultiHeadAttention: `keras.layers.MultiHeadAttention` that never
        attends to padding.

Large vocabularies:
    StableSoftmaxHead: a `Dense(V)` softmax head, or one tied to an
        embedding table, whose loss and metrics never build the
        `[tokens, V]` logits.
    FusedHeadModel: a functional model whose `evaluate` keeps its head
        fused too.
    linear_cross_entropy: the cross-entropy of `inputs @ kernel + bias`,
        a chunk of tokens at a time.

calibration (temperature scaling, `keras_softmax.calibration`):
    logits_model, fit_temperature, calibrate, expected_calibration_error,
    ExpectedCalibrationError, reliability_diagram.

Each name's docstring has the details; the API reference site is built
from them (`mkdocs serve`, see the README).
"""

import importlib.metadata

from keras_softmax import _extras

# Keras imports its backend here (TensorFlow by default); where that is not
# installed, the error names the extra that installs it.
try:
    importlib.import_module("keras")
except ModuleNotFoundError as error:
    _extras.raise_missing_backend(error)

from keras_softmax import calibration
from keras_softmax.attention import BlockSizes
from keras_softmax.attention import dot_product_attention
from keras_softmax.head import FusedHeadModel
from keras_softmax.head import StableSoftmaxHead
from keras_softmax.layer import StableSoftmax
from keras_softmax.linear_cross_entropy import linear_cross_entropy
from keras_softmax.multi_head_attention import StableMultiHeadAttention
from keras_softmax.registration import register_activations
from keras_softmax.softmax import stable_log_softmax
from keras_softmax.softmax import stable_softmax

# The version is written once, in pyproject.toml; an installed package,
# editable or not, carries it in its metadata.
__version__ = importlib.metadata.version("keras-softmax")
__all__ = [
    "BlockSizes",
    "FusedHeadModel",
    "StableMultiHeadAttention",
    "StableSoftmax",
    "StableSoftmaxHead",
    "calibration",
    "dot_product_attention",
    "linear_cross_entropy",
    "stable_log_softmax",
    "stable_softmax",
]

register_activations()
