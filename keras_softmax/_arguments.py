"""Argument checks: every error names the argument and the value it received.

Python values and tensors whose values are known now (eager tensors, NumPy
arrays) are checked when called; a tensor whose value is only known when a
traced program runs is made NaN there instead (see `_temperature`).
"""

import math
import numbers

import numpy as np


def check_real(
    name: str,
    value,
    *,
    minimum: float = -math.inf,
    maximum: float = math.inf,
    open_minimum: bool = False,
    allow_none: bool = False,
) -> float | None:
    """`value` as a finite float in its range (`None` where allowed).

    Raises:
        ValueError: naming `name` and `value`, for anything else (a bool, a
            tensor, NaN, an infinity, a number out of range).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        above = number > minimum if open_minimum else number >= minimum
        if above and number <= maximum and math.isfinite(number):
            return number
    rule = _range_rule(minimum, maximum, open_minimum)
    if allow_none:
        rule += " or None"
    raise ValueError(f"`{name}` must be {rule}. Received: {name}={value!r}")


def check_positive(name: str, value) -> float:
    """`value` as a positive finite float, or a ValueError naming `name`."""
    return check_real(name, value, minimum=0.0, open_minimum=True)


def _range_rule(minimum, maximum, open_minimum):
    if maximum == math.inf and minimum == 0:
        return "a positive finite number" if open_minimum else "a finite number >= 0"
    low = "(" if open_minimum else "["
    return f"a number in {low}{minimum:g}, {maximum:g}]"


def check_positive_integer(name: str, value, *, allow_none: bool = False):
    """`value` as a positive int (`None` where allowed), or a ValueError."""
    return check_integer(name, value, allow_none=allow_none, positive=True)


def check_integer(
    name: str, value, *, allow_none: bool = False, positive: bool = False
):
    """`value` as an int, positive where asked (`None` where allowed), or a
    ValueError: not a bool, a float or a string."""
    if value is None and allow_none:
        return None
    if is_int(value) and (value > 0 or not positive):
        return int(value)
    rule = ("a positive integer" if positive else "an integer") + (
        " or None" if allow_none else ""
    )
    raise ValueError(f"`{name}` must be {rule}. Received: {name}={value!r}")


def check_flag(name: str, value, *, allow_none: bool = False) -> bool | None:
    """`value` if it is True or False (or None where allowed), else a ValueError."""
    if isinstance(value, bool) or (allow_none and value is None):
        return value
    choices = "True, False or None" if allow_none else "True or False"
    raise ValueError(f"`{name}` must be {choices}. Received: {name}={value!r}")


def check_choice(name: str, value, choices: tuple):
    """`value` if it is one of `choices`, else a ValueError listing them."""
    if any(value is c or (value is not None and value == c) for c in choices):
        return value
    raise ValueError(f"`{name}` must be one of {choices}. Received: {name}={value!r}")


def check_axis_spec(axis):
    """Checks the form of `axis`: an int, a tuple of ints, or None (all)."""
    if axis is None:
        return None
    if isinstance(axis, list):
        axis = tuple(axis)
    items = axis if isinstance(axis, tuple) else (axis,)
    if not items or not all(is_int(a) for a in items):
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


def is_int(value) -> bool:
    """Whether `value` is a Python or NumPy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """Whether `value` is a Python or NumPy number rather than a tensor."""
    if isinstance(value, np.ndarray):
        return value.ndim == 0
    return isinstance(value, numbers.Real)


def is_tensor_like(value) -> bool:
    """Whether `value` has a shape and a dtype (a tensor, variable or array)."""
    return hasattr(value, "shape") and hasattr(value, "dtype")
