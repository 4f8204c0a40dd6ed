"""Cross-entropy of a linear head that never builds the `[tokens, vocabulary]` logits.

The logits `inputs @ kernel + bias` of a large vocabulary are the largest
tensor a language model trains with. Here they are computed a chunk of
tokens at a time, inside one custom derivative. Where a derivative of a
reduced loss may be taken, the same pass over the chunks computes the
gradients of the inputs, the kernel, the bias and the temperature: three
matrix products, as many as the logits and their gradient cost. Otherwise
the forward pass keeps nothing, and a reverse pass recomputes each chunk.
Peak memory then grows with the chunk, not with the tokens.
"""

import math
from typing import NamedTuple

import keras
from keras import ops

from keras_softmax import _arguments
from keras_softmax import _backend
from keras_softmax import _dtypes
from keras_softmax import _numerics
from keras_softmax import _temperature

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
    args = _checked_arguments(
        labels, inputs, kernel, bias, temperature, logit_soft_cap,
        label_smoothing, z_loss, ignore_class, reduction, chunk_size,
    )  # fmt: skip
    valid = ops.cast(args.valid, args.hidden.dtype)
    if args.reduction in (None, "none"):
        losses = _through_rule(args, _per_position_rule, valid)
        return ops.reshape(losses + args.poison, args.leading_shape)
    if args.reduction == "sum":
        weights = valid
    else:
        weights = valid / ops.maximum(ops.sum(valid), 1.0)
    return _through_rule(args, _weighted_sum_rule, weights) + ops.sum(args.poison)


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


def _checked_arguments(
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
    _arguments.check_choice("reduction", reduction, REDUCTIONS)
    hidden, _ = _dtypes.to_compute_dtype(inputs)
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
    if len(labels.shape) != len(leading_shape) or any(
        a is not None and b is not None and a != b
        for a, b in zip(labels.shape, leading_shape, strict=False)
    ):
        raise ValueError(
            "`labels` must have the leading shape of `inputs`. Received: "
            f"labels.shape={tuple(labels.shape)}, inputs.shape={tuple(hidden.shape)}"
        )
    if _backend.is_concrete(labels):
        values = _backend.read(labels).reshape(-1)
        if ignore_class is not None:
            values = values[values != ignore_class]
        bad = values[(values < 0) | (values >= vocabulary)]
        if bad.size:
            raise ValueError(
                f"`labels` must be class ids in [0, {vocabulary}) or "
                f"`ignore_class`. Received: a label of {int(bad[0])}"
            )
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    valid = (
        ops.ones(ops.shape(labels), "bool")
        if ignore_class is None
        else ops.not_equal(labels, int(ignore_class))
    )
    in_range = ops.logical_and(labels >= 0, labels < vocabulary)
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
        temperature=_temperature.normalize_temperature(temperature, dtype).tensor(
            dtype
        ),
        soft_cap=_arguments.check_real(
            "logit_soft_cap", soft_cap, minimum=0, open_minimum=True, allow_none=True
        ),
        smoothing=_arguments.check_real(
            "label_smoothing", smoothing, minimum=0, maximum=1
        ),
        z_loss=_arguments.check_real("z_loss", z_loss, minimum=0),
        chunk=_chunk(chunk_size, vocabulary),
        reduction=reduction,
        # Traced with an unknown batch size, the shape is read at run time.
        leading_shape=ops.shape(hidden)[:-1],
    )


def _chunk(chunk_size, vocabulary):
    chunk_size = _arguments.check_positive_integer(
        "chunk_size", chunk_size, allow_none=True
    )
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // max(int(vocabulary), 1))
    return chunk_size


class _Spec(NamedTuple):
    """What a chunk's computation needs to know, fixed when traced."""

    soft_cap: float | None
    smoothing: float
    z_loss: float
    tempered: bool  # whether a temperature tensor is passed
    chunk: int


def _through_rule(args: _Arguments, rule, weights):
    """`rule`'s output on the chunked arguments, with its custom derivative."""
    per_position = rule is _per_position_rule
    n = args.hidden.shape[0]
    if n == 0:
        # No position: a loss of 0 (`[]` per position), with zero gradients.
        zero = ops.sum(args.kernel) * 0.0
        return ops.zeros((0,), zero.dtype) + zero if per_position else zero
    if n is None:  # a traced batch of unknown size
        n = ops.shape(args.hidden)[0]
        chunk = args.chunk
    else:
        chunk = min(args.chunk, max(n, 1))
    pad = (-n) % chunk
    hidden, labels = args.hidden, args.labels
    if not isinstance(pad, int) or pad:
        hidden = ops.pad(hidden, ((0, pad), (0, 0)))
        labels = ops.pad(labels, ((0, pad),))
        weights = ops.pad(weights, ((0, pad),))
    spec = _Spec(
        args.soft_cap,
        args.smoothing,
        args.z_loss,
        args.temperature is not None,
        chunk,
    )
    dtype = args.kernel.dtype
    bias = ops.zeros((args.kernel.shape[1],), dtype) if args.bias is None else args.bias
    t = ops.ones((), dtype) if args.temperature is None else args.temperature
    out = rule(spec)(hidden, args.kernel, bias, t, labels, weights)
    return out if len(out.shape) == 0 else out[:n]


def _per_position_rule(spec):
    """Per-position losses times `weights`; reverse mode recomputes chunks."""

    def forward(h, w, b, t, y, weights):
        return _scan_losses(spec, h, w, b, t, y, weights), ()

    def backward(inputs, saved, upstream):
        h, w, b, t, y, weights = inputs
        return _scan_gradients(spec, h, w, b, t, y, weights * upstream)

    return _backend.custom_vjp(forward, backward)


def _weighted_sum_rule(spec):
    """`sum(weights * losses)`, its gradients computed in the same pass.

    When a derivative may be taken, one pass over the chunks gives the loss
    and its gradients: three matrix products, as the logits would cost.
    The reverse pass then only scales them by the upstream gradient.
    """

    def forward(h, w, b, t, y, weights):
        losses = _scan_losses(spec, h, w, b, t, y, weights)
        return ops.sum(losses), ()

    def forward_for_derivative(h, w, b, t, y, weights):
        loss, gradients = _scan_loss_and_gradients(spec, h, w, b, t, y, weights)
        return loss, gradients

    def backward(inputs, saved, upstream):
        if saved:  # the gradients, from forward_for_derivative
            return tuple(g * upstream for g in saved) + (None, None)
        h, w, b, t, y, weights = inputs
        return _scan_gradients(spec, h, w, b, t, y, weights * upstream)

    return _backend.custom_vjp(
        forward, backward, forward_for_derivative=forward_for_derivative
    )


class _Chunk(NamedTuple):
    """One chunk's tempered, shifted logits and what the loss needs of them."""

    logits: object  # soft-capped, before the temperature; None without a cap
    shifted: object  # (logits - top) / t
    exp_shifted: object
    top: object  # [C, 1]
    total: object  # [C, 1]: sum of exp_shifted
    log_total: object  # [C, 1]


def _chunk_logits(spec, h, w, b, t):
    logits = _numerics.soft_cap(_backend.matmul(h, w) + b, spec.soft_cap)
    top = ops.max(logits, axis=-1, keepdims=True)
    shifted = logits - top
    if spec.tempered:
        shifted = shifted / t
    exp_shifted = ops.exp(shifted)
    total = ops.sum(exp_shifted, axis=-1, keepdims=True)
    # Only the cap's derivative needs them: eager backends free them now.
    logits = logits if spec.soft_cap is not None else None
    return _Chunk(logits, shifted, exp_shifted, top, total, ops.log(total))


def _chunk_losses(spec, c: _Chunk, t, y, weights):
    """`[C]` losses of one chunk, times `weights`."""
    picked = ops.take_along_axis(c.shifted, y[:, None], axis=-1)
    loss = (1 - spec.smoothing) * (c.log_total - picked)
    if spec.smoothing:
        # (Keras' mean on JAX, 3.15, sums float64 in float32.)
        mean = ops.sum(c.shifted, axis=-1, keepdims=True) / c.shifted.shape[-1]
        loss = loss + spec.smoothing * (c.log_total - mean)
    if spec.z_loss:
        loss = loss + spec.z_loss * ops.square(c.top / t + c.log_total)
    # `where`, not a product: an ignored position's loss may be inf.
    return ops.where(weights != 0, loss[:, 0] * weights, 0.0)


class _Gradients(NamedTuple):
    inputs: object  # [C, D]
    kernel: tuple  # (a, b): the [D, V] gradient is a @ b
    bias: object  # [V]
    temperature: object  # scalar


def _chunk_gradients(spec, c: _Chunk, h, w, t, y, weights) -> _Gradients:
    """The gradients of `sum(weights * losses)` over one chunk."""
    vocabulary = c.shifted.shape[-1]
    # d loss / d z, with the weights folded into the softmax's scale.
    scale = weights[:, None] / c.total
    if spec.z_loss:
        scale = scale * (1.0 + 2.0 * spec.z_loss * (c.top / t + c.log_total))
    dz = c.exp_shifted * scale
    is_label = ops.arange(vocabulary, dtype="int32")[None, :] == y[:, None]
    dz = ops.where(is_label, dz - (1.0 - spec.smoothing) * weights[:, None], dz)
    if spec.smoothing:
        dz = dz - (spec.smoothing / vocabulary) * weights[:, None]
    dt = ops.zeros((), dz.dtype)
    d_logits = dz
    if spec.tempered:
        # z = shifted + top / t, so d z / d t = -z / t.
        dt = (
            -(ops.sum(dz * c.shifted) + ops.sum(ops.sum(dz, axis=-1) * c.top[:, 0]) / t)
            / t
        )
        d_logits = dz / t
    if spec.soft_cap is not None:
        d_logits = d_logits * _numerics.soft_cap_derivative(c.logits, spec.soft_cap)
    return _Gradients(
        # (w @ dz^T)^T: TensorFlow would copy the whole kernel to transpose it.
        inputs=ops.transpose(_backend.matmul(w, ops.transpose(d_logits))),
        kernel=(ops.transpose(h), d_logits),  # a product, summed by the caller
        bias=ops.sum(d_logits, axis=0),
        temperature=dt,
    )


def _scan_losses(spec, h, w, b, t, y, weights):
    """`[chunks * chunk]` weighted losses."""

    def step(carry, xs):
        h_c, y_c, weights_c = xs
        c = _chunk_logits(spec, h_c, w, b, t)
        return carry, (_chunk_losses(spec, c, t, y_c, weights_c),)

    _, (losses,) = _backend.scan(step, (), _split(spec, h, y, weights))
    return ops.reshape(losses, (-1,))


def _scan_gradients(spec, h, w, b, t, y, weights):
    """The gradients of `sum(weights * losses)`: one per rule input."""
    _, gradients = _scan_loss_and_gradients(
        spec, h, w, b, t, y, weights, with_loss=False
    )
    return gradients + (None, None)


def _scan_loss_and_gradients(spec, h, w, b, t, y, weights, with_loss=True):
    """`sum(weights * losses)` and its gradients for `h`, `w`, `b` and `t`.

    Without `with_loss`, the loss is 0: the reverse pass wants only the
    gradients.
    """

    def step(carry, xs):
        loss, dw, db, dt = carry
        h_c, y_c, weights_c = xs
        c = _chunk_logits(spec, h_c, w, b, t)
        if with_loss:
            loss = loss + ops.sum(_chunk_losses(spec, c, t, y_c, weights_c))
        g = _chunk_gradients(spec, c, h_c, w, t, y_c, weights_c)
        dw = _backend.add_matmul(dw, *g.kernel)
        carry = (loss, dw, db + g.bias, dt + g.temperature)
        return carry, (g.inputs,)

    zero = ops.zeros((), w.dtype)
    init = (zero, ops.zeros_like(w), ops.zeros_like(b), zero)
    (loss, dw, db, dt), (dh,) = _backend.scan(step, init, _split(spec, h, y, weights))
    return loss, (ops.reshape(dh, ops.shape(h)), dw, db, dt)


def _split(spec, h, *per_position):
    """`h` and per-position tensors as chunks of `chunk` rows."""
    return (ops.reshape(h, (-1, spec.chunk, h.shape[-1])),) + tuple(
        ops.reshape(a, (-1, spec.chunk)) for a in per_position
    )
