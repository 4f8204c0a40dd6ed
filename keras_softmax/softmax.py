"""The stable softmax and log-softmax: exact for every finite logit.

Written with `keras.ops` only, so one body of code serves every backend. The
backend's own fused softmax does the work wherever its answer is already
exact, which is every slice of ordinary logits; the rare slice it would get
wrong (a NaN, a +inf, nothing kept, or logits so large that dividing by the
temperature would overflow) is recomputed on an exact path that shifts by the
slice maximum before it divides.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_softmax import _backend
from keras_softmax import _checks

# exp(t) is exactly 0 in these dtypes for every t below -_UNDERFLOW.
_UNDERFLOW = {"float32": 104.0, "float64": 746.0}


def stable_softmax(x, axis=-1, mask=None, temperature=1.0):
    """Softmax that stays exact for any finite logits, with mask and temperature.

    Computes `exp(z - max z) / sum(exp(z - max z))` with `z = x / temperature`
    over the kept positions of each slice along `axis`. Unlike a plain
    softmax, it never overflows for finite `x`, masked positions are exactly
    0, a slice with nothing kept is all zeros (not NaN, not uniform), and a
    NaN or `+inf` logit makes its slice NaN rather than hiding the error.

    Args:
        x: Logits: a tensor, NumPy array or nested list. Half-precision
            inputs are computed in float32 and returned in their own dtype;
            integer and bool inputs are computed in `keras.config.floatx()`.
        axis: Integer, or tuple of integers to normalise jointly over
            several axes. Defaults to `-1`.
        mask: Optional bool tensor broadcastable to `x`, `True` to keep a
            position. A numeric mask keeps the positions where it is `> 0.5`.
            Masked values are ignored, except that a NaN still shows.
        temperature: Positive finite number, or scalar tensor or variable,
            that divides the logits. Below 1 the output sharpens towards the
            argmax; above 1 it flattens towards uniform.

    Returns:
        Probabilities of the same shape as `x`. On the TensorFlow backend
        they carry the tempered, masked logits as `_keras_logits`, so
        Keras' cross-entropy losses take their exact log-softmax path.

    Example:

    >>> import keras_softmax
    >>> p = keras_softmax.stable_softmax([[1000.0, 1001.0, 1002.0]])
    >>> [round(float(v), 6) for v in p[0]]
    [0.090031, 0.244728, 0.665241]
    >>> p = keras_softmax.stable_softmax([[1.0, 2.0, 3.0]], mask=[[1, 1, 0]])
    >>> [round(float(v), 6) for v in p[0]]
    [0.268941, 0.731059, 0.0]
    """
    return _stable(x, axis, mask, temperature, log=False)


def stable_log_softmax(x, axis=-1, mask=None, temperature=1.0):
    """Log-softmax that stays exact for any finite logits.

    The logarithm of `stable_softmax(x, axis, mask, temperature)`, computed
    in log space so that small probabilities keep their precision. Masked
    positions, and every position of a slice with nothing kept, are `-inf`,
    never NaN.

    Args:
        x: Logits, as for `stable_softmax`.
        axis: Integer or tuple of integers. Defaults to `-1`.
        mask: Optional mask, as for `stable_softmax`.
        temperature: Positive finite number or scalar tensor.

    Returns:
        Log-probabilities of the same shape as `x`.

    Example:

    >>> import keras_softmax
    >>> lp = keras_softmax.stable_log_softmax([[0.0, -2000.0]])
    >>> [float(v) for v in lp[0]]
    [0.0, -2000.0]
    """
    return _stable(x, axis, mask, temperature, log=True)


def _stable(x, axis, mask, temperature, log):
    x, output_dtype = _checks.logits(x)
    compute_dtype = keras.backend.standardize_dtype(x.dtype)
    axis = _checks.axis(axis, len(x.shape))
    temperature = _checks.temperature(temperature, compute_dtype)
    keep = _checks.mask(mask, x)

    if not _is_one(temperature):
        # A tensor, not a Python float, so a graph serves every temperature.
        temperature = ops.convert_to_tensor(temperature, compute_dtype)
    logits = None
    if _backend.eager() and isinstance(axis, int):
        outputs, logits = _fused_or_exact(x, axis, keep, temperature, log)
    else:
        outputs = _exact(x, axis, keep, temperature, log)
    outputs = ops.cast(outputs, output_dtype)
    if not log and _backend.losses_read_logits():
        if logits is None:
            logits = _logits(x, axis, keep, temperature, log)[1]
        outputs._keras_logits = ops.cast(logits, output_dtype)
    return outputs


def _fused_or_exact(x, axis, keep, t, log):
    """The backend's fused softmax, or the exact path where a slice needs it.

    Returns `(outputs, logits)`.
    """
    top, logits, bound = _logits(x, axis, keep, t, log)
    dtype = keras.backend.standardize_dtype(x.dtype)
    # The fused kernel is exact wherever the maximum is finite and, with a
    # mask, far enough above the fill that the fill underflows exp to 0.
    fast = ops.logical_and(top > -math.inf, top < math.inf)
    if keep is not None:
        if not log:
            fast = ops.logical_and(fast, top > -bound + _UNDERFLOW[dtype] * t)
        # The fill hid the masked values; a NaN among them must still show.
        # (TensorFlow's max propagates NaN; the exact path does not rely on it.)
        raw_top = ops.max(ops.stop_gradient(x), axis=axis, keepdims=True)
        fast = ops.logical_and(fast, ops.logical_not(ops.isnan(raw_top)))
    # The fused kernel stays inside its branch: outside, its gradient would
    # run on the NaN it gives for special slices, even when discarded.
    outputs = ops.cond(
        ops.all(fast),
        lambda: ops.log_softmax(logits, axis) if log else ops.softmax(logits, axis),
        lambda: _exact(x, axis, keep, t, log),
    )
    return outputs, logits


def _logits(x, axis, keep, t, log):
    """`(top, logits, bound)`: the masked logits' slice maxima, and the
    masked logits shifted and tempered.

    Masked positions are filled with -bound: finite, so the logits stay
    usable by TensorFlow's fused cross-entropy (0 * -inf is NaN there), and
    small enough that shifted and tempered they stay finite too.
    Log-probabilities of masked positions must be -inf, so for them the fill
    is -inf itself; only probabilities carry their logits to a loss.
    """
    dtype = keras.backend.standardize_dtype(x.dtype)
    half_max = ops.convert_to_tensor(float(np.finfo(dtype).max) / 2, dtype)
    bound = half_max if _is_one(t) else half_max * ops.where(t < 1.0, t, 1.0)
    z = x if keep is None else ops.where(keep, x, -math.inf if log else -bound)
    top = ops.max(ops.stop_gradient(z), axis=axis, keepdims=True)
    if _is_one(t):
        return top, z, bound
    # Shifting before dividing keeps the rounding error proportional to
    # z - max z, as in the reference, rather than to z.
    return top, (z - top) / t, bound


def _exact(x, axis, keep, t, log):
    """The softmax of any input: shifts by the slice maximum, then divides.

    Written without selecting between values that may be infinite: tf2onnx
    turns such a `where` into `c * a + (1 - c) * b`, where `0 * inf` is NaN.
    """
    dtype = keras.backend.standardize_dtype(x.dtype)
    z = x if keep is None else ops.where(keep, x, -math.inf)
    top = ops.max(ops.stop_gradient(z), axis=axis, keepdims=True)
    # A finite shift for every slice: one with nothing kept (top = -inf)
    # stays all -inf, so exp gives its zeros.
    # Bounds as tensors of `dtype`: Keras' PyTorch backend makes a Python
    # float float32, where float64's max is inf (and its maximum of two
    # float64 tensors is float32 too, as of Keras 3.15).
    largest = ops.convert_to_tensor(float(np.finfo(dtype).max), dtype)
    shift = ops.clip(top, -largest, largest)
    if _is_one(t):
        shifted = z - shift
    else:
        # Halves cannot overflow in the subtraction, and an overflow in the
        # division only ever means that exp underflows to 0.
        shifted = (z / 2 - shift / 2) / t * 2

    # A kept slice peaks at exactly exp(0) = 1, so only a slice with
    # nothing kept has a total of 0: it becomes 0 / 1, or -inf - 0.
    exps = ops.exp(shifted)
    if keep is not None:
        # Zeros that hold even where a converter turned the -inf fill into
        # the lowest float, as LiteRT's does: exp(fill - shift) <= 1.
        exps = exps * ops.cast(keep, dtype)
    total = _sum(exps, axis)
    # Not maximum(total, 1): JAX splits its gradient at the tie total = 1.
    total = ops.where(total > 0, total, 1.0)
    outputs = shifted - ops.log(total) if log else exps / total
    # NaN for the whole slice when it holds +inf (0 * inf) or any NaN.
    poison = 0.0 * ops.relu(top)
    if keep is not None:
        # A masked NaN; isnan, as some runtimes' max skips NaN.
        any_nan = ops.any(ops.isnan(x), axis=axis, keepdims=True)
        poison = poison + ops.cast(ops.where(any_nan, math.nan, 0.0), dtype)
    return outputs + poison


def _sum(x, axis):
    """Sums over `axis`, a tuple one axis at a time.

    Summing n terms in a row rounds up to n times; axis by axis, only as
    often as the axes are long together, which keeps a joint normalisation
    as exact on backends whose reductions run in a row (JAX on the CPU).
    """
    for a in axis if isinstance(axis, tuple) else (axis,):
        x = ops.sum(x, axis=a, keepdims=True)
    return x


def _is_one(t):
    return isinstance(t, float) and t == 1.0


_fused_or_exact = _backend.as_graph(_fused_or_exact)
