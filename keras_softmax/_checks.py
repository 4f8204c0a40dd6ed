"""Argument checks shared by the functions and the layer.

Every error names the argument and the value it received.
"""

import math
import numbers

import keras
import numpy as np
from keras import ops

_HALF_DTYPES = ("float16", "bfloat16")
_FULL_DTYPES = ("float32", "float64")


def logits(x):
    """Converts `x` to a tensor in the dtype the softmax computes in.

    Returns:
        `(x, output_dtype)`: half-precision inputs are computed in float32
        and returned in their own dtype; integer and bool inputs are
        computed and returned in `keras.config.floatx()`.
    """
    x = ops.convert_to_tensor(x)
    dtype = keras.backend.standardize_dtype(x.dtype)
    if dtype in _FULL_DTYPES:
        return x, dtype
    if dtype in _HALF_DTYPES:
        return ops.cast(x, "float32"), dtype
    if dtype == "bool" or "int" in dtype:
        floatx = keras.config.floatx()
        return ops.cast(x, floatx), floatx
    raise ValueError(f"`x` must hold real numbers. Received: x.dtype={dtype}")


def axis_spec(axis):
    """Checks the form of `axis` (an int or a tuple of ints) without a rank."""
    if isinstance(axis, list):
        axis = tuple(axis)
    items = axis if isinstance(axis, tuple) else (axis,)
    if not items or not all(_is_int(a) for a in items):
        raise ValueError(
            f"`axis` must be an int or a non-empty tuple of ints. "
            f"Received: axis={axis!r}"
        )
    if isinstance(axis, tuple):
        return tuple(int(a) for a in axis)
    return int(axis)


def axis(axis, rank):
    """Returns `axis` with every entry made non-negative for `rank`."""
    axis = axis_spec(axis)
    items = axis if isinstance(axis, tuple) else (axis,)
    for a in items:
        if not -rank <= a < rank:
            raise ValueError(
                f"`axis` is out of range for an input of rank {rank}. "
                f"Received: axis={axis!r}"
            )
    normalised = tuple(a % rank for a in items)
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"`axis` repeats an axis. Received: axis={axis!r}")
    return normalised if isinstance(axis, tuple) else normalised[0]


def temperature_value(temperature, dtype="float32"):
    """Checks a Python temperature: a positive number, finite in `dtype`."""
    if isinstance(temperature, np.ndarray) and temperature.ndim == 0:
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(
            f"`temperature` must be a positive finite number. "
            f"Received: temperature={temperature!r}"
        )
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"`temperature` must be a positive finite number. "
            f"Received: temperature={temperature!r}"
        )
    in_dtype = float(np.asarray(value, dtype=dtype))
    if not (math.isfinite(in_dtype) and in_dtype > 0):
        raise ValueError(
            f"`temperature` is not representable in {dtype}. "
            f"Received: temperature={temperature!r}"
        )
    return value


def temperature(temperature, dtype):
    """A checked Python float, or a scalar tensor cast to `dtype`."""
    if not _is_number(temperature) and _is_tensor_like(temperature):
        t = ops.convert_to_tensor(temperature)
        if len(t.shape) != 0:
            raise ValueError(
                f"`temperature` must be a scalar. "
                f"Received: temperature with shape {tuple(t.shape)}"
            )
        return ops.cast(t, dtype)
    return temperature_value(temperature, dtype)


def mask(mask, x):
    """Returns `mask` as a bool tensor broadcastable to `x`, or None."""
    if mask is None:
        return None
    mask = ops.convert_to_tensor(mask)
    mask_shape, x_shape = tuple(mask.shape), tuple(x.shape)
    broadcastable = len(mask_shape) <= len(x_shape) and all(
        m is None or i is None or m in (1, i)
        for m, i in zip(reversed(mask_shape), reversed(x_shape), strict=False)
    )
    if not broadcastable:
        raise ValueError(
            f"`mask` must be broadcastable to `x`. "
            f"Received: mask.shape={mask_shape}, x.shape={x_shape}"
        )
    if keras.backend.standardize_dtype(mask.dtype) != "bool":
        mask = ops.greater(mask, 0.5)
    return mask


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value):
    if isinstance(value, np.ndarray):
        return value.ndim == 0
    return isinstance(value, numbers.Real)


def _is_tensor_like(value):
    return hasattr(value, "shape") and hasattr(value, "dtype")
