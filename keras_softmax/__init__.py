"""keras_softmax: a softmax for Keras 3 that is exact for any finite logits."""

import importlib.metadata

from keras_softmax import _quiet

# Before Keras is imported: Keras imports TensorFlow, which logs as it loads.
if _quiet.entry_point_running():
    _quiet.quiet_tensorflow()

from keras_softmax import calibration  # noqa: E402
from keras_softmax.attention import dot_product_attention  # noqa: E402
from keras_softmax.head import StableSoftmaxHead  # noqa: E402
from keras_softmax.layer import StableSoftmax  # noqa: E402
from keras_softmax.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from keras_softmax.multi_head_attention import StableMultiHeadAttention  # noqa: E402
from keras_softmax.registration import register_activations  # noqa: E402
from keras_softmax.softmax import stable_log_softmax  # noqa: E402
from keras_softmax.softmax import stable_softmax  # noqa: E402

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
