"""keras_softmax: a softmax for Keras 3 that is exact for any finite logits."""

import importlib.metadata

from keras_softmax import calibration
from keras_softmax.attention import dot_product_attention
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
