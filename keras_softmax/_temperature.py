"""The temperature: one normaliser, and what later code asks of it.

A temperature is a positive finite number, or a tensor or variable. Where
its values are known now (a Python number, an eager tensor) they are
checked, and a bad one raises a ValueError naming it; where they are only
known at run time (traced, exported, a variable assigned later), a
temperature that is not positive and finite makes the output NaN, never a
plausible distribution.
"""

import math
from typing import NamedTuple

import numpy as np
from keras import ops

from keras_softmax import _arguments
from keras_softmax import _backend


class Temperature(NamedTuple):
    """A checked temperature.

    `value` is a Python float (1.0 for none) or a tensor of the compute
    dtype, checked or made NaN where bad.
    """

    value: object

    @property
    def is_one(self) -> bool:
        """Whether it divides by nothing: no tensor to pass, no work to do."""
        return isinstance(self.value, float) and self.value == 1.0

    @property
    def varies(self) -> bool:
        """Whether it is a tensor, in which a derivative may be taken."""
        return not isinstance(self.value, float)

    @property
    def foldable(self) -> bool:
        """Whether it may be folded into attention's scale: a constant of at
        least 1, which cannot make finite scores overflow."""
        return isinstance(self.value, float) and self.value >= 1.0

    def tensor(self, dtype: str):
        """The temperature as a tensor of `dtype`, or None where it is 1."""
        if self.is_one:
            return None
        if isinstance(self.value, float):
            return ops.convert_to_tensor(self.value, dtype)
        return ops.cast(self.value, dtype)


_ONE = Temperature(1.0)


def check_temperature_value(temperature, dtype: str = "float32") -> float:
    """A Python temperature as a float: positive, and finite in `dtype`."""
    if not _arguments.is_number(temperature) or isinstance(temperature, bool):
        raise ValueError(
            f"`temperature` must be a positive finite number or a tensor. "
            f"Received: temperature={temperature!r}"
        )
    value = _arguments.check_positive("temperature", temperature)
    in_dtype = float(np.asarray(value, dtype=dtype))
    if not (math.isfinite(in_dtype) and in_dtype > 0):
        raise ValueError(
            f"`temperature` is not representable in {dtype}. "
            f"Received: temperature={temperature!r}"
        )
    return value


def normalize_temperature(
    temperature, dtype: str = "float32", x_shape=(), axis=(), *, per_slice=False
) -> Temperature:
    """The one normaliser of a temperature argument.

    Args:
        temperature: A number, or a tensor, variable or array: a scalar, or
            with `per_slice` one temperature per slice of `x`.
        dtype: The dtype the math computes in.
        x_shape: The static shape of what is divided (for `per_slice`).
        axis: The normalised axes of `x`, along which a temperature per
            slice has size 1 (for `per_slice`).
        per_slice: Whether a tensor may hold one temperature per slice
            (the softmax); else it must be a scalar (attention, the loss).

    Returns:
        A `Temperature`. A tensor whose values are all 1 and in which
        nothing is differentiated comes back as the Python float 1.
    """
    if type(temperature) is float and temperature == 1.0:
        return _ONE  # the default: no check to pay for on every call
    if isinstance(temperature, (list, tuple)):
        temperature = np.asarray(temperature)
    if _arguments.is_number(temperature):
        return Temperature(check_temperature_value(temperature, dtype))
    if not _arguments.is_tensor_like(temperature):
        raise ValueError(
            f"`temperature` must be a positive finite number or a tensor. "
            f"Received: temperature={temperature!r}"
        )
    if not per_slice and len(temperature.shape) != 0:
        raise ValueError(
            "`temperature` must be a positive finite number or a scalar tensor. "
            f"Received: temperature with shape {tuple(temperature.shape)}"
        )
    t = ops.cast(_backend.to_tensor(temperature), dtype)
    if per_slice:
        check_temperature_shape(_backend.static_shape(t), x_shape, axis)
    if _backend.is_concrete(t):
        values = _backend.read(t)
        if not np.all(np.isfinite(values) & (values > 0)):
            raise ValueError(
                f"`temperature` must be positive and finite. "
                f"Received: temperature={values.tolist()!r}"
            )
        if np.all(values == 1) and not _backend.may_differentiate(t):
            # The untempered path: a layer's default temperature costs nothing.
            return _ONE
        return Temperature(t)
    valid = _backend.reduce_all(ops.logical_and(t > 0, t < math.inf))
    return Temperature(ops.where(valid, t, math.nan))


def check_temperature_shape(t_shape, x_shape, axis):
    """Raises unless a temperature of `t_shape` fits `x`: a scalar, or
    broadcastable to `x` with size 1 along every normalised axis."""
    t_shape, x_shape = tuple(t_shape), tuple(x_shape)
    axes = axis if isinstance(axis, tuple) else (axis,)
    padded = (1,) * (len(x_shape) - len(t_shape)) + t_shape
    if not _arguments.broadcasts(t_shape, x_shape) or any(
        padded[a] not in (1, None) for a in axes
    ):
        raise ValueError(
            f"`temperature` must be a scalar, or broadcast to `x` with size 1 "
            f"along every normalised axis {axis}. Received: temperature with "
            f"shape {t_shape} for x.shape={x_shape}"
        )
