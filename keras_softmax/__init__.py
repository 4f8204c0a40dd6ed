"""keras_softmax: a softmax for Keras 3 that is exact for any finite logits."""

from keras_softmax import calibration
from keras_softmax.attention import dot_product_attention
from keras_softmax.layer import StableSoftmax
from keras_softmax.multi_head_attention import StableMultiHeadAttention
from keras_softmax.registration import register_activations
from keras_softmax.softmax import stable_log_softmax
from keras_softmax.softmax import stable_softmax

__version__ = "0.1.0"
__all__ = [
    "StableMultiHeadAttention",
    "StableSoftmax",
    "calibration",
    "dot_product_attention",
    "stable_log_softmax",
    "stable_softmax",
]

register_activations()
