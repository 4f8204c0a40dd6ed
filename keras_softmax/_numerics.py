"""Numerics shared by the softmax, the attention blocks and the large-vocabulary
loss, each written once."""

import keras
import numpy as np
from keras import ops

from keras_softmax import _backend


def tanh(x):
    """`tanh(x)`, exact to a few ulps in `x`'s dtype.

    Through `expm1`: Keras' `tanh` on JAX (3.15) computes float64 in float32.
    """
    e = ops.expm1(-2.0 * ops.abs(x))
    return ops.sign(x) * (-e / (2.0 + e))


def soft_cap(x, cap: float | None):
    """`cap * tanh(x / cap)` (Gemma 2's soft cap), or `x` where `cap` is None."""
    if cap is None:
        return x
    return cap * tanh(x / cap)


def soft_cap_derivative(capped, cap: float):
    """`d soft_cap(x) / dx`, from the capped value: `1 - (capped / cap)**2`.

    Clipped, so that a stand-in beyond the cap (the lowest finite number
    at a masked score) gets 0 rather than a huge negative number.
    """
    return 1.0 - ops.square(ops.clip(capped / cap, -1.0, 1.0))


def sum_to_shape(x, shape):
    """Sums `x` down to `shape`, which broadcasts to it: a gradient's reverse
    of broadcasting."""
    shape = tuple(shape)
    extra = len(x.shape) - len(shape)
    if extra:
        x = ops.sum(x, axis=tuple(range(extra)))
    broadcast = tuple(
        i for i, size in enumerate(shape) if size == 1 and x.shape[i] != 1
    )
    if broadcast:
        x = ops.sum(x, axis=broadcast, keepdims=True)
    return x


def divide_by_temperature(x, t):
    """`x / t`, whose derivatives in `t` stay finite for any positive finite `t`.

    Autodiff's derivative of a quotient squares the divisor, and `t**2`
    underflows for `t` below about 1e-19 in float32 (1e-154 in float64):
    the zero upstream of a position the softmax flushes to 0, times the
    resulting infinity, is NaN. Here `x` is divided by `t * k`, `k` a power
    of two (a constant) that brings it near 1, then multiplied by `k`:
    both scalings are exact, so the quotient rounds as `x / t` does, and
    every derivative squares only `t * k`.
    """
    dtype = keras.backend.standardize_dtype(t.dtype)
    bound = int(np.finfo(dtype).maxexp) - 2
    exponent = ops.floor(ops.log2(ops.stop_gradient(t)))
    k = _backend.power_of_two(ops.clip(-exponent, -bound, bound), dtype)
    return (x / (t * k)) * k
