"""The stable softmax and log-softmax: exact for every finite logit.

Written with `keras.ops`, so one body of code serves every backend; the
little that depends on the backend asks `_backend`. Two paths compute the
same result:

- The fused path, where ops run one kernel at a time (TensorFlow eagerly or
  in a `tf.function` without XLA, PyTorch eagerly): the backend's own fused
  softmax does the work, and a check that costs one read picks the exact
  formula for the rare slice the kernel would get wrong (a NaN, a `+inf`,
  nothing kept, or a temperature so large that the shifted logits may
  overflow before the division).
- The exact formula (`_exact`) alone, where a compiler fuses it into as
  few passes as a softmax anyway (XLA, JAX, `torch.compile`), and for
  joint normalisation over several axes. It is also the fused path's
  fallback, and where a graph may be exported it is written so that
  tf2onnx and LiteRT keep it exact.

Both shift by the slice maximum before they divide by the temperature.

Every intermediate is finite wherever a derivative is taken (a masked or
-inf position stands in with a finite logit whose exp is discarded, and a
derivative of exactly 0), so each backend's own autodiff gives exact and
finite derivatives in every mode and to every order: reverse and forward,
Jacobians and Hessians, `vmap`, `torch.func`, for tensors and variables
alike. On TensorFlow the fused path adds reverse-mode rules
(`_backend.with_reverse_rule`) that spare a gradient the derivative of its
branch; they are written so that TensorFlow can differentiate them again.
"""

import math
import warnings
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_softmax import _arguments
from keras_softmax import _backend
from keras_softmax import _dtypes
from keras_softmax import _keras_internals
from keras_softmax import _masks
from keras_softmax import _numerics
from keras_softmax import _temperature

# exp(t) is exactly 0 in these dtypes for every t below -_UNDERFLOW. The
# fused kernels that take half precision compute exp in float32.
_UNDERFLOW = {"float32": 104.0, "float64": 746.0, "float16": 104.0, "bfloat16": 104.0}
# The most outputs of an eager call the fused path's check reads whole.
_READ_WHOLE = 1 << 16


def stable_softmax(x, axis=-1, mask=None, temperature=1.0):
    """Softmax that stays exact for any finite logits, with mask and temperature.

    Computes `exp(z - max z) / sum(exp(z - max z))` with `z = x / temperature`
    over the kept positions of each slice along `axis`. Unlike a plain
    softmax, it never overflows for finite `x`, masked positions are exactly
    0, a slice with nothing kept is all zeros (not NaN, not uniform), and a
    NaN or `+inf` logit makes its slice NaN rather than hiding the error.

    Args:
        x: Logits: a tensor, NumPy array, nested list or `keras.KerasTensor`
            (then the result is a symbolic tensor for a functional model).
            Half-precision inputs are computed in float32 and returned in
            their own dtype; integer and bool inputs are computed in
            `keras.config.floatx()`.
        axis: Integer, tuple of integers to normalise jointly over several
            axes, or `None` for all axes. Defaults to `-1`.
        mask: Optional bool tensor broadcastable to `x`, `True` to keep a
            position. A numeric mask keeps the positions where it is `> 0.5`.
            Masked values are ignored, except that a NaN still shows.
        temperature: Divides the logits: below 1 the output sharpens
            towards the argmax, above 1 it flattens towards uniform. A
            positive finite number, or a tensor or variable: a scalar, or
            one temperature per slice (broadcastable to `x`, with size 1
            along every normalised axis). A tensor that turns out not
            positive and finite only at run time makes the whole output NaN.

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
    >>> p = keras_softmax.stable_softmax([[2.0, 0.0], [2.0, 0.0]],
    ...                                  temperature=[[1.0], [2.0]])
    >>> [[round(float(v), 4) for v in row] for row in p]
    [[0.8808, 0.1192], [0.7311, 0.2689]]
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
        axis: Integer, tuple of integers or `None`. Defaults to `-1`.
        mask: Optional mask, as for `stable_softmax`.
        temperature: As for `stable_softmax`.

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
    """Checks the arguments, then takes the path this backend runs best."""
    if _any_symbolic(x, mask, temperature):
        return _symbolic(x, axis, mask, temperature, log)
    # The running backend's edge, asked once: small eager calls feel each ask.
    edge = _backend.edge()
    x = edge.to_tensor(x)
    input_dtype = keras.backend.standardize_dtype(x.dtype)
    output_dtype = _dtypes.output_dtype(input_dtype)
    dtype = _dtypes.compute_dtype(output_dtype)
    axis = _arguments.normalize_axis(axis, len(x.shape))
    shape = edge.static_shape(x)
    temperature = _temperature.normalize_temperature(
        temperature, dtype, shape, axis, per_slice=True
    )
    t = temperature.tensor(dtype)
    keep = _masks.to_keep_mask(mask, shape)
    if 0 in shape:
        return ops.zeros(ops.shape(x), output_dtype)
    # A Python temperature is a constant: no derivative in it is ever taken.
    t_varies = temperature.varies

    single = isinstance(axis, int)
    if single and shape[axis] == 1:
        # Keras' own hint, word for word; the compiled path does not repeat it.
        warnings.warn(
            f"You are using a softmax over axis {axis} of a tensor of shape "
            f"{tuple(x.shape)}. This axis has size 1. The softmax operation "
            "will always return the value 1, which is likely not what you "
            "intended. Did you mean to use a sigmoid instead?",
            stacklevel=3,
        )
        single = False
    # Where ops run one by one, a graph may be traced for an exporter.
    op_by_op = edge.takes_fused_path(x)
    in_half = (
        single
        and op_by_op
        and t is None
        and output_dtype in _dtypes.HALF_DTYPES
        and edge.half_kernels_accumulate_in_float32()
    )
    if not in_half and input_dtype != dtype:
        # Half precision is computed in float32; integers in floatx.
        x = ops.cast(x, dtype)
    read_logits = not log and edge.losses_read_logits()
    if single and op_by_op:
        result = _fused(x, axis, keep, t, log, t_varies)
    else:
        result = _exact(
            x,
            axis,
            keep,
            t,
            log,
            for_exporters=op_by_op,
            loss_logits=read_logits,
            t_varies=t_varies,
        )
    outputs = result.outputs
    if not in_half and output_dtype != dtype:
        outputs = ops.cast(outputs, output_dtype)
    if read_logits:
        logits = _cast(result.logits, output_dtype)
        _keras_internals.attach_loss_logits(outputs, logits)
    return outputs


def _cast(x, dtype):
    if keras.backend.standardize_dtype(x.dtype) == dtype:
        return x
    return ops.cast(x, dtype)


class _Result(NamedTuple):
    """The softmax (or log-softmax), and the tempered logits it came from."""

    outputs: object
    logits: object


@_backend.graph_when_large
def _fused(x, axis, keep, t, log, t_varies):
    """The backend's fused kernel, checked with one read for special slices.

    The check is one small tensor (a value per slice at most), with a NaN
    exactly where the kernel's answer might not be exact, so that an eager
    call reads a few numbers (a small one, its outputs). Half-precision `x`
    (a kernel that accumulates in float32, untempered) stays in its dtype;
    the exact formula, for the rare slice, computes in float32.
    """
    edge = _backend.edge()
    dtype = keras.backend.standardize_dtype(x.dtype)

    def exact():
        values = _cast(x, _dtypes.compute_dtype(dtype))
        return _cast(
            _exact(values, axis, keep, t, log, t_varies=t_varies).outputs, dtype
        )

    if keep is None and t is None:
        # The kernel shifts by the maximum itself, and a special slice (a
        # NaN, +inf, or only -inf) gives a NaN among its outputs, which the
        # slice's sum carries. (Log-probabilities may sum to -inf, never to
        # NaN.)
        def witness(fast):
            # An eager call's few outputs are read as they are: one more
            # op, the sum, costs more than reading them (at [1, 32000] on a
            # CPU, 28 us against 9). NumPy would read half ones as a
            # float32 copy.
            if (
                dtype not in _dtypes.HALF_DTYPES
                and edge.is_concrete(fast)
                and math.prod(fast.shape) <= _READ_WHOLE
            ):
                return fast
            return ops.sum(fast, axis=axis)

        return _fused_kernel(x, axis, witness, exact, log)

    largest = -_dtypes.LOWEST[dtype]
    if keep is None:
        z = x
        top = edge.reduce_max(ops.stop_gradient(z), axis, keepdims=True)
        # NaN for a NaN (the maxima propagate it), +inf or -inf (nothing
        # kept) maximum: 0 * inf is NaN.
        check = _nan_where_infinite(top)
    else:
        # A finite fill, far enough below every kept slice maximum that exp
        # flushes it to 0, and small enough that shifted and tempered it
        # stays finite too: Keras' losses read the logits of probabilities
        # (0 * -inf is NaN in TensorFlow's fused cross-entropy), and every
        # logit stays finite for the derivatives (log-probabilities get
        # their -inf afterwards).
        fill = _constant(-largest / 2, dtype)
        if t is not None:
            # A constant as far as derivatives go: masked positions have none.
            fill = fill * ops.minimum(ops.stop_gradient(t), _constant(1.0, dtype))
        lowest_top = fill + _UNDERFLOW[dtype] * (1.0 if t is None else t)
        z = ops.where(keep, x, fill)
        top = edge.reduce_max(ops.stop_gradient(z), axis, keepdims=True)
        # The log is finite only where the maximum is finite and above its
        # lowest.
        check = _nan_where_infinite(ops.log(top - lowest_top))
    if keep is not None:
        # The fill hid the masked values; a NaN among them must still show.
        # (A masked +inf takes the exact path too, which ignores it.)
        check = check + _nan_where_infinite(edge.reduce_max(x))
    if t is not None:
        # Beyond this, z - top may overflow where (z - top) / t would not.
        limit = _constant(largest / _UNDERFLOW[dtype], dtype)
        check = check + _nan_where_infinite(ops.log(limit - t))
    # With T = 1 the kernel shifts by the maximum itself.
    logits = z if t is None else _divided_by_temperature(z - top, t, t_varies, keep)
    return _fused_kernel(
        logits,
        axis,
        lambda fast: check,
        exact,
        log,
        keep,
    )


def _fused_kernel(logits, axis, witness, exact, log, keep=None):
    """The fused softmax of `logits`, or `exact()` if `witness` holds a NaN.

    `keep` marks the positions whose log-probabilities are kept; the others
    become -inf.
    """

    edge = _backend.edge()

    def forward(logits):
        if log:
            fast = ops.log_softmax(logits, axis)
            if keep is not None:
                fast = ops.where(keep, fast, -math.inf)
        else:
            fast = ops.softmax(logits, axis)
        return edge.cond_no_nan(witness(fast), lambda: fast, exact)

    def backward(logits, outputs):
        return lambda upstream: (_softmax_vjp(outputs, upstream, axis, log),)

    return _Result(edge.with_reverse_rule(forward, backward, logits), logits)


def _softmax_vjp(outputs, upstream, axis, log):
    """The softmax's (or log-softmax's) reverse-mode derivative at `outputs`.

    The same as the backends' own; as a rule it spares TensorFlow the
    derivative of the branch. Zero at masked positions and in slices with
    nothing kept, and finite wherever the outputs are.
    """
    if log:
        # Positions at -inf are constants: their upstream is dropped, and
        # 0 stands in for them inside exp, whose derivative there would
        # otherwise multiply 0 by the -inf position's own (second order).
        live = outputs > -math.inf
        upstream = ops.where(live, upstream, 0.0)
        probabilities = ops.exp(ops.where(live, outputs, 0.0))
        return ops.where(live, upstream - probabilities * _sum(upstream, axis), 0.0)
    return outputs * (upstream - _sum(upstream * outputs, axis))


def _divided_by_temperature(shifted, t, t_varies, keep):
    """`shifted / t`, with derivatives in `t` that stay finite and exact.

    A masked or -inf position is a constant, but the quotient's derivatives
    in `t` there, `-shifted / t**2` and beyond, are huge or infinite: left
    alone, autodiff would multiply 0 by them. Where `t` is a constant
    nobody differentiates, the plain quotient.
    """
    if not t_varies:
        return shifted / t
    if _backend.has_reverse_rules():
        return _backend.with_reverse_rule(_divide, _division_vjp, shifted, t)
    free = shifted > -math.inf
    if keep is not None:
        free = ops.logical_and(keep, free)
    return ops.where(
        free,
        _numerics.divide_by_temperature(ops.where(free, shifted, 0.0), t),
        shifted / ops.stop_gradient(t),
    )


def _divide(shifted, t):
    return shifted / t


def _division_vjp(shifted, t, logits):
    """The reverse-mode derivative of `shifted / t`, finite beside -inf.

    Where `shifted` is -inf its logit is a constant; 0 stands in for it, so
    that the rule's own derivatives (forward mode, second order) are finite.
    Masked positions get an upstream of 0 from the softmax.
    """

    def vjp(upstream):
        finite = ops.where(shifted > -math.inf, shifted, 0.0)
        # Divided twice rather than by t * t, which may overflow.
        t_grad = -_numerics.sum_to_shape(upstream * finite, t.shape) / t / t
        return upstream / t, t_grad

    return vjp


def _exact(x, axis, keep, t, log, for_exporters=True, loss_logits=False, t_varies=True):
    """The exact formula: shift by the slice maximum, then divide.

    One formula for two readers. Compilers (XLA, JAX, `torch.compile`) fuse
    it into as few passes as a softmax; with `for_exporters`, it is also
    written so that exported graphs keep it exact: it multiplies masked
    positions by the mask rather than trusting a fill, which LiteRT's
    converter turns from -inf into the lowest float; it selects only
    between finite values, for tf2onnx turns a `where` into
    `c * a + (1 - c) * b`, where `0 * inf` is NaN; and it looks for NaN
    with `isnan`, as some runtimes' maximum skips it.

    Returns:
        A `_Result`, whose logits (with `loss_logits`; else None) are the
        tempered logits with the masked ones finite and far below the rest,
        for a loss to read.
    """
    dtype = keras.backend.standardize_dtype(x.dtype)
    # Bounds as tensors of `dtype`: Keras' PyTorch backend makes a Python
    # float float32, where float64's max is inf.
    largest = _constant(float(np.finfo(dtype).max), dtype)
    top = _slice_maximum(x, keep, axis, carries_nan=not for_exporters)
    # A finite shift for every slice, so that a slice with nothing kept
    # (top = -inf) still gives finite logits.
    shift = ops.clip(top, -largest, largest)
    # Compared with the lowest float, not with -inf, which LiteRT's converter
    # would turn into the lowest float. NaN is not valid: the carrier below
    # brings it back.
    valid = ops.greater_equal(x, -largest)
    if keep is not None:
        valid = ops.logical_and(keep, valid)
    select = _Selection(valid, dtype, for_exporters)
    # For exporters, no inf to select away.
    bounded = ops.clip(x, -largest, largest) if for_exporters else x
    logits = _shifted_logits(bounded, shift, t, select, t_varies)
    exps = select.zero_elsewhere(ops.exp(logits))
    total = _sum(exps, axis)
    # A slice with nothing kept sums to 0: it becomes 0 / 1, or -inf. Not
    # maximum(total, 1): JAX splits its derivative at the tie.
    total = ops.where(total > 0, total, 1.0)
    if log:
        outputs = select.minus_inf_elsewhere(logits - ops.log(total))
    else:
        outputs = exps / total
    outputs = outputs + _nan_of_special_slices(x, top, t, axis, for_exporters)
    if not loss_logits:
        return _Result(outputs, None)
    # What a loss reads: the masked logits finite, and far below the rest.
    return _Result(outputs, ops.where(valid, logits, -largest / 2))


class _Selection:
    """`where(valid, values, c)` for the formula; for exporters, arithmetic.

    tf2onnx turns a `where` into `c * a + (1 - c) * b`, where `0 * inf` is
    NaN; multiplying by the mask, and adding `log(mask)` for -inf, selects
    without it.
    """

    def __init__(self, valid, dtype, for_exporters):
        self.valid = valid
        self.kept = ops.cast(valid, dtype) if for_exporters else None

    def zero_elsewhere(self, values):
        if self.kept is None:
            return ops.where(self.valid, values, 0.0)
        return values * self.kept

    def minus_inf_elsewhere(self, values):
        if self.kept is None:
            return ops.where(self.valid, values, -math.inf)
        # log(0) puts the -inf in (a constant: its derivative is never taken).
        return values * self.kept + ops.stop_gradient(ops.log(self.kept))


def _slice_maximum(x, keep, axis, carries_nan):
    """The maximum of each slice's kept logits: -inf where nothing is kept.

    With `carries_nan`, a NaN, masked or not, makes its slice's maximum NaN
    (compilers' maxima propagate NaN), so that no second pass looks for it.
    """
    if keep is not None:
        if carries_nan:
            keep = ops.logical_or(keep, ops.isnan(x))
        x = ops.where(keep, x, -math.inf)
    return _backend.reduce_max(ops.stop_gradient(x), axis, keepdims=True)


def _nan_of_special_slices(x, top, t, axis, for_exporters):
    """NaN for a slice with a NaN or a kept `+inf`, and everywhere for a
    temperature that turned out bad at run time; else 0.

    Added to the result, for XLA's exp clamps its argument rather than
    carry a NaN through.
    """
    if for_exporters:
        # relu, not a selection (tf2onnx): a -inf maximum carries nothing.
        nan = _nan_where_infinite(ops.relu(top))
        any_nan = ops.any(ops.isnan(x), axis=axis, keepdims=True)
        nan = nan + ops.cast(ops.where(any_nan, math.nan, 0.0), x.dtype)
    else:
        # The maximum carries NaN already.
        nan = _nan_where_infinite(ops.where(top == -math.inf, 0.0, top))
    if t is not None:
        nan = nan + _nan_where_infinite(t)
    return nan


def _shifted_logits(x, shift, t, select, t_varies):
    """`(x - shift) / t` where valid, and 0 (whose exp is discarded) elsewhere.

    The 0 keeps every derivative of a masked or -inf position finite (and
    zero), in any mode and to any order: the backend's own autodiff then
    needs no custom rule. With a temperature, halves cannot overflow in the
    subtraction, and halving both sides of the division rounds exactly as
    the division itself. A temperature that varies (a tensor) divides
    through `divide_by_temperature`, whose derivatives never square it; a
    constant one plainly.
    """
    if t is None:
        return select.zero_elsewhere(x - shift)
    halves = select.zero_elsewhere(x / 2 - shift / 2)
    if t_varies:
        return _numerics.divide_by_temperature(halves, t / 2)
    return halves / (t / 2)


def _nan_where_infinite(value):
    """0, or NaN where `value` is NaN or infinite: a NaN carrier to add on."""
    return 0.0 * value


def _constant(value, dtype):
    """`value` as a tensor of `dtype`.

    Keras' PyTorch backend makes a Python float float32, where float64's
    max is inf (as of Keras 3.15).
    """
    return ops.convert_to_tensor(value, dtype)


def _sum(x, axis):
    """Sums over `axis`, a tuple one axis at a time.

    Summing n terms in a row rounds up to n times; axis by axis, only as
    often as the axes are long together, which keeps a joint normalisation
    as exact on backends whose reductions run in a row (JAX on the CPU).
    """
    for a in axis if isinstance(axis, tuple) else (axis,):
        x = ops.sum(x, axis=a, keepdims=True)
    return x


def _any_symbolic(*values):
    return any(isinstance(v, keras.KerasTensor) for v in values)


def _symbolic(x, axis, mask, temperature, log):
    """A functional model's node: the softmax of a `keras.KerasTensor`."""
    if _arguments.is_number(temperature):
        return StableSoftmaxOperation(axis, temperature, log)(x, mask)
    return StableSoftmaxOperation(axis, None, log)(x, mask, temperature)


@keras.saving.register_keras_serializable(package="keras_softmax")
class StableSoftmaxOperation(keras.Operation):
    """`stable_softmax` (or `stable_log_softmax`) as a functional-model node.

    Args:
        axis: As for `stable_softmax`.
        temperature: A Python number, or None when it is a call input.
        log: Whether it computes the log-softmax.
    """

    def __init__(self, axis=-1, temperature=1.0, log=False, *, name=None):
        super().__init__(name=name)
        self.axis = _arguments.check_axis_spec(axis)
        if temperature is not None:
            temperature = _temperature.check_temperature_value(temperature)
        self.temperature = temperature
        self.log = bool(log)

    def call(self, x, mask=None, temperature=None):
        if temperature is None:
            temperature = self.temperature
        return _stable(x, self.axis, mask, temperature, self.log)

    def compute_output_spec(self, x, mask=None, temperature=None):
        axis = _arguments.normalize_axis(self.axis, len(x.shape))
        if mask is not None:
            _masks.check_mask_shape(mask.shape, x.shape)
        if temperature is not None:
            _temperature.check_temperature_shape(temperature.shape, x.shape, axis)
        return keras.KerasTensor(x.shape, dtype=_dtypes.output_dtype(x.dtype))

    def get_config(self):
        return {
            "axis": self.axis,
            "temperature": self.temperature,
            "log": self.log,
            "name": self.name,
        }
