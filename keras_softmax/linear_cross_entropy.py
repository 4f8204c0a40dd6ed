"""Cross-entropy of a linear head that never builds the `[tokens, vocabulary]` logits.

The logits `inputs @ kernel + bias` of a large vocabulary are the largest
tensor a language model trains with. Here they are computed a chunk of
tokens at a time, inside one custom derivative: the forward pass keeps two
numbers per token (the slice maximum and the log of the shifted sum), and
the backward pass recomputes each chunk's logits to turn its upstream
gradient into those of the inputs, the kernel, the bias and the
temperature. Peak memory then grows with the chunk, not with the tokens.
"""

import math
import numbers
from typing import NamedTuple

import keras
from keras import ops

from keras_softmax import _backend
from keras_softmax import _checks

REDUCTIONS = ("sum_over_batch_size", "sum", "mean", "none", None)
# Logits held at once: a chunk of tokens times the vocabulary (64 MiB in
# float32).
_CHUNK_ELEMENTS = 1 << 24


def linear_cross_entropy(
    labels,
    inputs,
    kernel,
    bias=None,
    *,
    temperature=1.0,
    logit_soft_cap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_class: int | None = None,
    reduction: str | None = "sum_over_batch_size",
    chunk_size: int | None = None,
):
    """Sparse cross-entropy of `inputs @ kernel + bias`, without the logits.

    Per position, with `logits = inputs @ kernel + bias`, soft-capped to
    `c * tanh(logits / c)` when `logit_soft_cap = c`, and
    `z = logits / temperature` (divided after the shift by the maximum, as
    `stable_softmax` does):
    `loss = (1 - e) * (lse(z) - z[label]) + e * (lse(z) - mean(z))
    + z_loss * lse(z) ** 2`, with `e = label_smoothing`. A position whose
    label is `ignore_class` contributes 0 and gets no gradient.

    The default reduction equals
    `keras.losses.SparseCategoricalCrossentropy(from_logits=True,
    ignore_class=ignore_class)` on the materialised logits: the mean over
    the positions that are not ignored. Half-precision inputs are computed
    in float32.

    Args:
        labels: Integer class ids, of the leading shape of `inputs`.
        inputs: Hidden states `[..., D]`.
        kernel: `[D, V]`, the layout of `Dense(V)`'s kernel.
        bias: Optional `[V]`.
        temperature: A positive finite number or scalar tensor.
        logit_soft_cap: Optional positive number `c`.
        label_smoothing: In `[0, 1]`.
        z_loss: Non-negative weight of `lse(z) ** 2` (PaLM's z-loss).
        ignore_class: Optional class id whose positions are ignored.
        reduction: `"sum_over_batch_size"` (default), `"mean"` (the same),
            `"sum"`, or `None` / `"none"` for the per-position losses.
        chunk_size: Tokens per chunk. Defaults to as many as keep a chunk's
            logits at 2**24 elements.

    Returns:
        The reduced loss, or the per-position losses of `labels`' shape.

    Example:

    >>> import numpy as np
    >>> import keras_softmax
    >>> inputs = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    >>> kernel = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]], "float32")
    >>> loss = keras_softmax.linear_cross_entropy([0, 2], inputs, kernel)
    >>> round(float(loss), 5)
    0.16723
    """
    args = _checked(
        labels, inputs, kernel, bias, temperature, logit_soft_cap,
        label_smoothing, z_loss, ignore_class, reduction, chunk_size,
    )  # fmt: skip
    losses = _per_position(args)
    if args.reduction in (None, "none"):
        return ops.reshape(losses, args.leading_shape)
    total = ops.sum(losses)
    if args.reduction == "sum":
        return total
    valid = ops.sum(ops.cast(args.valid, losses.dtype))
    return ops.where(valid > 0, total / ops.maximum(valid, 1.0), 0.0)


class _Arguments(NamedTuple):
    labels: object  # [N] int32, ignored positions set to 0
    valid: object  # [N] bool: not ignored
    poison: object  # [N]: NaN where a label is out of range, else 0
    hidden: object  # [N, D] float32 or float64
    kernel: object
    bias: object
    temperature: object  # None, or a scalar tensor
    soft_cap: float | None
    smoothing: float
    z_loss: float
    chunk: int
    reduction: str | None
    leading_shape: tuple


def _checked(
    labels,
    inputs,
    kernel,
    bias,
    temperature,
    soft_cap,
    smoothing,
    z_loss,
    ignore_class,
    reduction,
    chunk_size,
) -> _Arguments:
    """The arguments checked, flattened to `[N, D]` and in the compute dtype."""
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"`reduction` must be one of {REDUCTIONS}. "
            f"Received: reduction={reduction!r}"
        )
    hidden, _ = _checks.to_compute_dtype(inputs)
    dtype = keras.backend.standardize_dtype(hidden.dtype)
    kernel = ops.cast(_backend.to_tensor(kernel), dtype)
    if len(hidden.shape) < 1 or len(kernel.shape) != 2:
        raise ValueError(
            "`inputs` must be [..., D] and `kernel` [D, V]. Received: "
            f"inputs.shape={tuple(hidden.shape)}, kernel.shape={tuple(kernel.shape)}"
        )
    depth, vocabulary = kernel.shape
    if hidden.shape[-1] != depth:
        raise ValueError(
            "The last axis of `inputs` must match the first of `kernel`. "
            f"Received: inputs.shape={tuple(hidden.shape)}, "
            f"kernel.shape={tuple(kernel.shape)}"
        )
    if bias is not None:
        bias = ops.cast(_backend.to_tensor(bias), dtype)
        if tuple(bias.shape) != (vocabulary,):
            raise ValueError(
                f"`bias` must have shape ({vocabulary},). "
                f"Received: bias.shape={tuple(bias.shape)}"
            )
    leading_shape = tuple(hidden.shape[:-1])
    labels = _backend.to_tensor(labels)
    if tuple(labels.shape) != leading_shape:
        raise ValueError(
            "`labels` must have the leading shape of `inputs`. Received: "
            f"labels.shape={tuple(labels.shape)}, inputs.shape={tuple(hidden.shape)}"
        )
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    valid = (
        ops.ones(ops.shape(labels), "bool")
        if ignore_class is None
        else ops.not_equal(labels, int(ignore_class))
    )
    in_range = ops.logical_and(labels >= 0, labels < vocabulary)
    if _backend.is_concrete(labels):
        values = _backend.read(labels)[_backend.read(valid)]
        bad = values[(values < 0) | (values >= vocabulary)]
        if bad.size:
            raise ValueError(
                f"`labels` must be class ids in [0, {vocabulary}) or "
                f"`ignore_class`. Received: a label of {int(bad[0])}"
            )
    # A label known bad only at run time makes its position's loss NaN.
    dtype_nan = ops.cast(math.nan, dtype)
    poison = ops.where(ops.logical_and(valid, ~in_range), dtype_nan, 0.0)
    return _Arguments(
        labels=ops.where(ops.logical_and(valid, in_range), labels, 0),
        valid=valid,
        poison=ops.cast(poison, dtype),
        hidden=ops.reshape(hidden, (-1, depth)),
        kernel=kernel,
        bias=bias,
        temperature=_temperature(temperature, dtype),
        soft_cap=_positive_or_none("logit_soft_cap", soft_cap),
        smoothing=_fraction("label_smoothing", smoothing),
        z_loss=_non_negative("z_loss", z_loss),
        chunk=_chunk(chunk_size, vocabulary),
        reduction=reduction,
        leading_shape=leading_shape,
    )


def _temperature(temperature, dtype):
    """None for 1, or a scalar tensor (NaN if only known bad at run time)."""
    if _checks.is_number(temperature):
        value = _checks.check_temperature_value(temperature, dtype)
        return None if value == 1.0 else ops.convert_to_tensor(value, dtype)
    t = ops.cast(_backend.to_tensor(temperature), dtype)
    if len(t.shape) != 0:
        raise ValueError(
            "`temperature` must be a number or a scalar tensor. "
            f"Received: temperature with shape {tuple(t.shape)}"
        )
    return _checks.to_temperature(t, ops.zeros((1,), dtype), 0)


def _positive_or_none(name, value):
    if value is None:
        return None
    if (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    ):
        return float(value)
    raise ValueError(
        f"`{name}` must be a positive number or None. Received: {name}={value!r}"
    )


def _fraction(name, value):
    if (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and 0 <= value <= 1
    ):
        return float(value)
    raise ValueError(f"`{name}` must be a number in [0, 1]. Received: {name}={value!r}")


def _non_negative(name, value):
    if (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    ):
        return float(value)
    raise ValueError(
        f"`{name}` must be a non-negative number. Received: {name}={value!r}"
    )


def _chunk(chunk_size, vocabulary):
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // max(int(vocabulary), 1))
    if isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool):
        if chunk_size > 0:
            return int(chunk_size)
    raise ValueError(
        f"`chunk_size` must be a positive integer. Received: chunk_size={chunk_size!r}"
    )


def _per_position(args: _Arguments):
    """`[N]` losses, 0 where ignored, through one custom derivative."""
    n = int(args.hidden.shape[0])
    chunk = min(args.chunk, max(n, 1))
    pad = (-n) % chunk
    hidden, labels, valid = args.hidden, args.labels, args.valid
    if pad:
        hidden = ops.pad(hidden, ((0, pad), (0, 0)))
        labels = ops.pad(labels, ((0, pad),))
        valid = ops.pad(valid, ((0, pad),))
    chunks = (n + pad) // chunk
    spec = _Spec(args.soft_cap, args.smoothing, args.z_loss, chunk, chunks)
    bias = (
        ops.zeros((args.kernel.shape[1],), args.kernel.dtype)
        if args.bias is None
        else args.bias
    )
    t = (
        ops.ones((), args.kernel.dtype)
        if args.temperature is None
        else args.temperature
    )
    losses = _backend.custom_vjp(
        lambda h, w, b, t, y, v: _forward(spec, h, w, b, t, y, v),
        lambda inputs, saved, upstream: _backward(spec, inputs, saved, upstream),
    )(hidden, args.kernel, bias, t, labels, valid)
    return losses[:n] + args.poison


class _Spec(NamedTuple):
    soft_cap: float | None
    smoothing: float
    z_loss: float
    chunk: int
    chunks: int


class _Chunk(NamedTuple):
    """One chunk's tempered, shifted logits and what the loss needs of them."""

    logits: object  # soft-capped, before the temperature
    shifted: object  # (logits - top) / t
    top: object  # [C, 1]
    log_total: object  # [C, 1]: log sum exp(shifted)


def _chunk_logits(spec, h, w, b, t):
    logits = _capped(spec, _backend.matmul(h, w) + b)
    top = ops.max(logits, axis=-1, keepdims=True)
    shifted = (logits - top) / t
    log_total = ops.log(ops.sum(ops.exp(shifted), axis=-1, keepdims=True))
    return _Chunk(logits, shifted, top, log_total)


def _capped(spec, logits):
    """`c * tanh(logits / c)` (Gemma 2's soft cap), or the logits as they are."""
    if spec.soft_cap is None:
        return logits
    # tanh through expm1, exact to a few ulps: Keras' tanh on JAX (3.15)
    # returns float32 for float64.
    u = logits / spec.soft_cap
    e = ops.expm1(-2.0 * ops.abs(u))
    return spec.soft_cap * ops.sign(u) * (-e / (2.0 + e))


def _forward(spec, h, w, b, t, y, v):
    """Per-position losses, and per position the maximum and log-sum."""

    def step(carry, xs):
        h_c, y_c, v_c = xs
        c = _chunk_logits(spec, h_c, w, b, t)
        lse = c.top / t + c.log_total
        picked = ops.take_along_axis(c.shifted, y_c[:, None], axis=-1)
        loss = (1 - spec.smoothing) * (c.log_total - picked)
        if spec.smoothing:
            # (Keras' mean on JAX, 3.15, sums float64 in float32.)
            mean = ops.sum(c.shifted, axis=-1, keepdims=True) / w.shape[1]
            loss = loss + spec.smoothing * (c.log_total - mean)
        if spec.z_loss:
            loss = loss + spec.z_loss * ops.square(lse)
        loss = ops.where(v_c, loss[:, 0], 0.0)
        return carry, (loss, c.top[:, 0], c.log_total[:, 0])

    xs = _split(spec, h, y, v)
    _, (loss, top, log_total) = _backend.scan(step, (), xs)
    flat = lambda a: ops.reshape(a, (-1,))  # noqa: E731
    return flat(loss), (flat(top), flat(log_total))


def _backward(spec, inputs, saved, upstream):
    h, w, b, t, y, v = inputs
    top, log_total = saved
    vocabulary = w.shape[1]
    scale = ops.where(v, upstream, 0.0)

    def step(carry, xs):
        dw, db, dt = carry
        h_c, y_c, g_c, top_c, log_total_c = xs
        capped = _capped(spec, _backend.matmul(h_c, w) + b)
        shifted = (capped - top_c[:, None]) / t
        p = ops.exp(shifted - log_total_c[:, None])
        lse = top_c[:, None] / t + log_total_c[:, None]
        dz = p * (1.0 + 2.0 * spec.z_loss * lse)
        dz = dz - (1.0 - spec.smoothing) * ops.one_hot(y_c, vocabulary, dtype=p.dtype)
        if spec.smoothing:
            dz = dz - spec.smoothing / vocabulary
        dz = dz * g_c[:, None]
        # d z / d t = -z / t, with z = shifted + top / t.
        dt = (
            dt
            - ops.sum(dz * shifted) / t
            - ops.sum(ops.sum(dz, axis=-1) * top_c) / (t * t)
        )
        d_logits = dz / t
        if spec.soft_cap is not None:
            d_logits = d_logits * (1.0 - ops.square(capped / spec.soft_cap))
        dh_c = _backend.matmul(d_logits, ops.transpose(w))
        dw = dw + _backend.matmul(ops.transpose(h_c), d_logits)
        db = db + ops.sum(d_logits, axis=0)
        return (dw, db, dt), (dh_c,)

    xs = _split(spec, h, y, scale) + (
        ops.reshape(top, (spec.chunks, spec.chunk)),
        ops.reshape(log_total, (spec.chunks, spec.chunk)),
    )
    init = (ops.zeros_like(w), ops.zeros_like(b), ops.zeros((), t.dtype))
    (dw, db, dt), (dh,) = _backend.scan(step, init, xs)
    return ops.reshape(dh, ops.shape(h)), dw, db, dt, None, None


def _split(spec, h, *per_position):
    """`h` and per-position tensors as `chunks` chunks of `chunk` rows."""
    return (ops.reshape(h, (spec.chunks, spec.chunk, -1)),) + tuple(
        ops.reshape(a, (spec.chunks, spec.chunk)) for a in per_position
    )
