"""Argument checks shared by the functions and the layer.

Every error names the argument and the value it received. Python values
and tensors whose values are known now (eager tensors, NumPy arrays) are
checked when called; a tensor whose value is only known when a traced
program runs is made NaN there instead (see `to_temperature`).
"""

import math
import numbers
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


class Logits(NamedTuple):
    """The logits as the softmax computes them, and the dtype it returns."""

    values: object
    output_dtype: str


def to_compute_dtype(x) -> Logits:
    """Converts `x` to a tensor in the dtype the softmax computes in.

    Half-precision inputs are computed in float32 and returned in their own
    dtype; integer and bool inputs are computed and returned in
    `keras.config.floatx()`.
    """
    x = _backend.to_tensor(x)
    dtype = output_dtype(x.dtype)
    if dtype in _FULL_DTYPES and keras.backend.standardize_dtype(x.dtype) == dtype:
        return Logits(x, dtype)
    return Logits(ops.cast(x, "float32" if dtype in HALF_DTYPES else dtype), dtype)


def output_dtype(input_dtype) -> str:
    """The dtype the softmax returns for logits of `input_dtype`."""
    dtype = keras.backend.standardize_dtype(input_dtype)
    if dtype in _FULL_DTYPES or dtype in HALF_DTYPES:
        return dtype
    if dtype == "bool" or "int" in dtype:
        return keras.config.floatx()
    raise ValueError(f"`x` must hold real numbers. Received: x.dtype={dtype}")


def check_axis_spec(axis):
    """Checks the form of `axis`: an int, a tuple of ints, or None (all)."""
    if axis is None:
        return None
    if isinstance(axis, list):
        axis = tuple(axis)
    items = axis if isinstance(axis, tuple) else (axis,)
    if not items or not all(_is_int(a) for a in items):
        raise ValueError(
            f"`axis` must be an int, a non-empty tuple of ints or None. "
            f"Received: axis={axis!r}"
        )
    if isinstance(axis, tuple):
        return tuple(int(a) for a in axis)
    return int(axis)


def normalize_axis(axis, rank: int):
    """`axis` with every entry made non-negative for `rank`.

    None means every axis. A single axis comes back as an int, since the
    backends' fused kernels take one axis.
    """
    axis = check_axis_spec(axis)
    if rank == 0:
        raise ValueError(
            f"`x` must have rank 1 or more: a scalar has no axis to normalise "
            f"over (rank 0). Received: axis={axis!r}"
        )
    if axis is None:
        axis = tuple(range(rank))
    items = axis if isinstance(axis, tuple) else (axis,)
    for a in items:
        if not -rank <= a < rank:
            raise ValueError(
                f"`axis` is out of range for an input of rank {rank}. "
                f"Received: axis={axis!r}"
            )
    normalized = tuple(sorted(a % rank for a in items))
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"`axis` repeats an axis. Received: axis={axis!r}")
    return normalized[0] if len(normalized) == 1 else normalized


def check_trainable_temperature(trainable_temperature) -> bool:
    """Checks the `trainable_temperature` flag: True or False."""
    if not isinstance(trainable_temperature, bool):
        raise ValueError(
            "`trainable_temperature` must be True or False. "
            f"Received: trainable_temperature={trainable_temperature!r}"
        )
    return trainable_temperature


def check_temperature_value(temperature, dtype: str = "float32") -> float:
    """A Python temperature as a float: positive, and finite in `dtype`."""
    if isinstance(temperature, np.ndarray) and temperature.ndim == 0:
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(
            f"`temperature` must be a positive finite number or a tensor. "
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


def to_temperature(temperature, dtype: str, x_shape: tuple, axis):
    """A checked temperature: `None` for 1, else a tensor of `dtype`.

    A tensor may be a scalar or hold one temperature per slice: it must
    broadcast to `x_shape` with size 1 along every normalised axis. Where its
    values are known now they are checked like a Python number; where they
    are only known at run time (traced, exported, a variable assigned
    later), a temperature that is not positive and finite makes the whole
    output NaN, never a plausible distribution.
    """
    if type(temperature) is float and temperature == 1.0:
        return None  # the default: no check to pay for on every call
    if isinstance(temperature, (list, tuple)):
        temperature = np.asarray(temperature)
    if is_number(temperature):
        value = check_temperature_value(temperature, dtype)
        return None if value == 1.0 else ops.convert_to_tensor(value, dtype)
    if not _is_tensor_like(temperature):
        raise ValueError(
            f"`temperature` must be a positive finite number or a tensor. "
            f"Received: temperature={temperature!r}"
        )
    t = ops.cast(_backend.to_tensor(temperature), dtype)
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
            return None
        return t
    valid = _backend.reduce_all(ops.logical_and(t > 0, t < math.inf))
    return ops.where(valid, t, math.nan)


def check_scalar_temperature(temperature):
    """One temperature for a whole call: a checked Python float, or a scalar
    tensor as it is (attention folds a float of at least 1 into its scale).
    """
    if is_number(temperature):
        return check_temperature_value(temperature)
    if _is_tensor_like(temperature) and len(temperature.shape) == 0:
        return temperature
    raise ValueError(
        "`temperature` must be a positive finite number or a scalar tensor. "
        f"Received: temperature={temperature!r}"
    )


def to_scalar_temperature(temperature, dtype: str):
    """One temperature for a whole call: `None` for 1, or a scalar tensor.

    Checked like `to_temperature`: a bad value known now raises, one known
    only at run time becomes NaN.
    """
    temperature = check_scalar_temperature(temperature)
    return to_temperature(temperature, dtype, (), ())


def check_temperature_shape(t_shape, x_shape, axis):
    """Raises unless a temperature of `t_shape` fits `x` (see above)."""
    t_shape, x_shape = tuple(t_shape), tuple(x_shape)
    axes = axis if isinstance(axis, tuple) else (axis,)
    padded = (1,) * (len(x_shape) - len(t_shape)) + t_shape
    if not broadcasts(t_shape, x_shape) or any(
        padded[a] not in (1, None) for a in axes
    ):
        raise ValueError(
            f"`temperature` must be a scalar, or broadcast to `x` with size 1 "
            f"along every normalised axis {axis}. Received: temperature with "
            f"shape {t_shape} for x.shape={x_shape}"
        )


def to_keep_mask(mask, shape, align="trailing"):
    """`mask` as bools that broadcast to `shape`, `True` to keep; or None.

    The one place masks are normalised. A numeric mask keeps the positions
    where it is `> 0.5`.

    Args:
        mask: A mask, or None.
        shape: The static shape of what is masked (unknown sizes as None).
        align: How a mask of lower rank meets `shape`:
            `"trailing"`: as NumPy broadcasts, its last axis on the last.
            `"leading"`: a Keras mask, one value per leading position (a
            timestep): a mask shaped like the leading axes of `shape` gets
            trailing axes of size 1; any other aligns as `"trailing"`.
            A negative int `a`: the missing axes are inserted at axis `a`,
            as Keras' `MultiHeadAttention` inserts the heads' axes into an
            attention mask.
    """
    if mask is None:
        return None
    mask = _backend.to_tensor(mask)
    shape = tuple(shape)
    missing = len(shape) - len(mask.shape)
    if missing > 0 and align == "leading":
        if broadcasts_exactly(_backend.static_shape(mask), shape[: len(mask.shape)]):
            mask = ops.reshape(mask, tuple(ops.shape(mask)) + (1,) * missing)
    elif missing > 0 and isinstance(align, int):
        for _ in range(missing):
            mask = ops.expand_dims(mask, align)
    check_mask_shape(_backend.static_shape(mask), shape)
    if keras.backend.standardize_dtype(mask.dtype) != "bool":
        mask = ops.greater(mask, 0.5)
    return mask


def check_mask_shape(mask_shape, x_shape):
    """Raises unless a mask of `mask_shape` broadcasts to `x_shape`."""
    mask_shape, x_shape = tuple(mask_shape), tuple(x_shape)
    if not broadcasts(mask_shape, x_shape):
        extra = (
            " and must not have more dimensions"
            if len(mask_shape) > len(x_shape)
            else ""
        )
        raise ValueError(
            f"`mask` must be broadcastable to `x`{extra}. "
            f"Received: mask.shape={mask_shape}, x.shape={x_shape}"
        )


def broadcasts_exactly(shape, to_shape) -> bool:
    """Whether `shape` equals `to_shape` (unknown sizes fit anything)."""
    return len(shape) == len(to_shape) and all(
        a is None or b is None or a == b for a, b in zip(shape, to_shape, strict=True)
    )


def broadcasts(shape, to_shape) -> bool:
    """Whether `shape` broadcasts to `to_shape` (unknown sizes fit anything)."""
    return len(shape) <= len(to_shape) and all(
        a is None or b is None or a in (1, b)
        for a, b in zip(reversed(shape), reversed(to_shape), strict=False)
    )


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """Whether `value` is a Python or NumPy number rather than a tensor."""
    if isinstance(value, np.ndarray):
        return value.ndim == 0
    return isinstance(value, numbers.Real)


def _is_tensor_like(value):
    return hasattr(value, "shape") and hasattr(value, "dtype")


def check_real(
    name: str,
    value,
    *,
    minimum: float,
    maximum: float = math.inf,
    open_minimum: bool = False,
    allow_none: bool = False,
):
    """`value` as a float in its range (`None` where allowed), or a ValueError."""
    if value is None and allow_none:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        above = number > minimum if open_minimum else number >= minimum
        if above and number <= maximum and math.isfinite(number):
            return number
    low = "(" if open_minimum else "["
    rule = f"a number in {low}{minimum}, {maximum}]"
    if allow_none:
        rule += " or None"
    raise ValueError(f"`{name}` must be {rule}. Received: {name}={value!r}")
