"""The dtype policy: what the math computes in, and what it returns.

Half-precision inputs are computed in float32 and returned in their own
dtype; integer and bool inputs are computed and returned in
`keras.config.floatx()`.
"""

from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_softmax import _backend

HALF_DTYPES = ("float16", "bfloat16")
# The lowest finite number of each dtype (NumPy has no bfloat16).
LOWEST = {
    "float16": -65504.0,
    "bfloat16": -3.3895313892515355e38,
    "float32": float(np.finfo(np.float32).min),
    "float64": float(np.finfo(np.float64).min),
}
_FULL_DTYPES = ("float32", "float64")
# (A framework's dtype object may compare equal to these names: TensorFlow's.)
_FLOAT_NAMES = _FULL_DTYPES + HALF_DTYPES


class Logits(NamedTuple):
    """The logits as the softmax computes them, and the dtype it returns."""

    values: object
    output_dtype: str


def to_compute_dtype(x) -> Logits:
    """Converts `x` to a tensor in the dtype the softmax computes in."""
    x = _backend.to_tensor(x)
    dtype = output_dtype(x.dtype)
    if keras.backend.standardize_dtype(x.dtype) == compute_dtype(dtype):
        return Logits(x, dtype)
    return Logits(ops.cast(x, compute_dtype(dtype)), dtype)


def output_dtype(input_dtype) -> str:
    """The dtype the softmax returns for logits of `input_dtype`."""
    if isinstance(input_dtype, str) and input_dtype in _FLOAT_NAMES:
        return input_dtype  # a standardised name already
    dtype = keras.backend.standardize_dtype(input_dtype)
    if dtype in _FULL_DTYPES or dtype in HALF_DTYPES:
        return dtype
    if dtype == "bool" or "int" in dtype:
        return keras.config.floatx()
    raise ValueError(f"`x` must hold real numbers. Received: x.dtype={dtype}")


def compute_dtype(dtype) -> str:
    """The dtype that inputs of floating `dtype` are computed in: float32
    for half precision, else their own."""
    if not (isinstance(dtype, str) and dtype in _FLOAT_NAMES):
        dtype = keras.backend.standardize_dtype(dtype)
    return "float32" if dtype in HALF_DTYPES else dtype


def lowest(dtype):
    """The lowest finite number of `dtype`, as a tensor of `dtype`.

    A tensor: Keras' PyTorch backend (3.15) makes a Python float float32,
    where float64's lowest is -inf.
    """
    dtype = keras.backend.standardize_dtype(dtype)
    return ops.convert_to_tensor(LOWEST[dtype], dtype)
