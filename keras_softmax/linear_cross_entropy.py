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
import numpy as np
from keras import ops

from keras_softmax import _arguments
from keras_softmax import _backend
from keras_softmax import _dtypes
from keras_softmax import _numerics
from keras_softmax import _temperature

# Keras' reductions (`keras.losses.Loss`), with their meanings.
REDUCTIONS = (
    "sum_over_batch_size",
    "mean",
    "mean_with_sample_weight",
    "sum",
    "none",
    None,
)


def linear_cross_entropy(
    labels,
    inputs,
    kernel,
    bias=None,
    *,
    sample_weight=None,
    transpose_kernel: bool = False,
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

    Every reduction equals
    `keras.losses.SparseCategoricalCrossentropy(from_logits=True,
    ignore_class=ignore_class, reduction=reduction)(labels, logits,
    sample_weight=sample_weight)` on the materialised logits. The default
    is the sum of the weighted losses over the number of positions that
    are not ignored: with a padding mask as `sample_weight`, keras-hub's
    `CausalLM` loss. Half-precision inputs are computed in float32.

    Args:
        labels: Integer class ids, of the leading shape of `inputs`.
        inputs: Hidden states `[..., D]`.
        kernel: `[D, V]`, the layout of `Dense(V)`'s kernel; `[V, D]` with
            `transpose_kernel=True`.
        bias: Optional `[V]`.
        sample_weight: Optional weights of the positions, of `labels`'
            shape or broadcastable to it as Keras broadcasts them (a
            `[batch]` weight applies to each position of its sequence).
        transpose_kernel: Whether `kernel` is `[V, D]`, as an embedding
            table is: tied input and output embeddings. It is read in
            place, never transposed into a copy.
        temperature: A positive finite number or scalar tensor.
        logit_soft_cap: Optional positive number `c`.
        label_smoothing: In `[0, 1]`.
        z_loss: Non-negative weight of `lse(z) ** 2` (PaLM's z-loss).
        ignore_class: Optional class id whose positions are ignored.
        reduction: As Keras reduces: `"sum_over_batch_size"` (default) and
            `"mean"` divide the sum of the weighted losses by the number
            of positions not ignored, `"mean_with_sample_weight"` by the
            sum of their weights (0 if it is 0), `"sum"` sums them, and
            `None` / `"none"` returns the weighted per-position losses.
        chunk_size: Tokens per chunk. Defaults to as many as keep a chunk's
            logits at 2**24 elements (on a CPU, 2**23 for JAX and 2**25 for
            TensorFlow), and at least 2048 on a GPU, where fewer spend
            longer rewriting the kernel's float32 gradient than multiplying.

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
        labels,
        inputs,
        kernel,
        bias,
        sample_weight=sample_weight,
        transpose_kernel=transpose_kernel,
        temperature=temperature,
        logit_soft_cap=logit_soft_cap,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        ignore_class=ignore_class,
        reduction=reduction,
        chunk_size=chunk_size,
    )
    return _loss_and_ranks(args, ranked=False).loss


class LossAndRanks(NamedTuple):
    """`linear_cross_entropy`'s loss, and `linear_label_ranks`' ranks."""

    loss: object
    ranks: object


def linear_cross_entropy_and_ranks(
    labels, inputs, kernel, bias=None, **options
) -> LossAndRanks:
    """`linear_cross_entropy` and the labels' ranks, from one pass.

    The ranks (those of `linear_label_ranks`, without a derivative) are
    counted on each chunk's logits while the loss is computed: a head's
    accuracy then costs no matrix product of its own.

    Args:
        labels, inputs, kernel, bias: As in `linear_cross_entropy`.
        **options: `linear_cross_entropy`'s keyword arguments.

    Returns:
        `LossAndRanks(loss, ranks)`.

    Example:

    >>> import numpy as np
    >>> from keras_softmax.linear_cross_entropy import (
    ...     linear_cross_entropy_and_ranks)
    >>> inputs = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    >>> kernel = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]], "float32")
    >>> scored = linear_cross_entropy_and_ranks([0, 0], inputs, kernel)
    >>> np.asarray(scored.ranks).tolist()
    [0.0, 1.0]
    """
    args = _checked_arguments(labels, inputs, kernel, bias, **options)
    return _loss_and_ranks(args, ranked=True)


def _loss_and_ranks(args, ranked: bool) -> LossAndRanks:
    """The reduced (or per-position) loss, and the ranks if `ranked`."""
    weights = _reduction_weights(args.valid, args.sample_weight, args.reduction)
    if args.reduction in (None, "none"):
        losses, ranks = _through_rule(args, _per_position_rule, weights, ranked)
        loss = ops.reshape(losses + args.poison, args.leading_shape)
    else:
        loss, ranks = _through_rule(args, _weighted_sum_rule, weights, ranked)
        loss = loss + ops.sum(args.poison)
    if ranks is not None:
        ranks = ops.reshape(_ranks_of_bad_labels(ranks, args), args.leading_shape)
    return LossAndRanks(loss, ranks)


def _ranks_of_bad_labels(ranks, args):
    """`ranks` where the labels are in range. Elsewhere NaN, but `V` for an
    ignored label (a padding id such as -1): Keras' accuracies count it a
    miss, which its weight, 0 where the padding is masked, then removes."""
    vocabulary = args.kernel.shape[0 if args.transposed else 1]
    nan = ops.cast(math.nan, args.dtype)
    bad = ops.where(args.valid, nan, ops.cast(vocabulary, args.dtype))
    return ops.where(args.in_range, ranks, bad)


def _reduction_weights(valid, sample_weight, reduction):
    """Per-position weights whose weighted sum of the losses is Keras'
    reduction of them (`keras.losses.loss.reduce_weighted_values`)."""
    dtype = sample_weight.dtype
    # `where`, not a product: an ignored position's weight has no gradient.
    weights = ops.where(valid, sample_weight, 0.0)
    if reduction in ("sum_over_batch_size", "mean"):
        # Keras scales its mask so that the mean is over the kept positions.
        return weights / ops.maximum(ops.sum(ops.cast(valid, dtype)), 1.0)
    if reduction == "mean_with_sample_weight":
        total = ops.sum(weights)
        nonzero = ops.not_equal(total, 0.0)
        # Keras' `divide_no_nan`, with a gradient that stays finite at 0.
        return ops.where(nonzero, weights / ops.where(nonzero, total, 1.0), 0.0)
    return weights


class _Arguments(NamedTuple):
    dtype: str  # the compute dtype: float32 or float64
    labels: object  # [N] int32, labels out of range set to 0
    valid: object  # [N] bool: not ignored
    in_range: object  # [N] bool: the label is a class id
    sample_weight: object  # [N], in the compute dtype (ones if not given)
    poison: object  # [N]: NaN where a label is out of range, else 0
    hidden: object  # [N, D], in the compute dtype or half (as `kernel`)
    kernel: object  # [D, V], or [V, D] if `transposed`
    transposed: bool
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
    bias=None,
    *,
    sample_weight=None,
    transpose_kernel=False,
    temperature=1.0,
    logit_soft_cap=None,
    label_smoothing=0.0,
    z_loss=0.0,
    ignore_class=None,
    reduction="sum_over_batch_size",
    chunk_size=None,
) -> _Arguments:
    """The arguments checked, flattened to `[N, D]` and in the compute dtype
    (the keywords and defaults of `linear_cross_entropy`)."""
    _arguments.check_choice("reduction", reduction, REDUCTIONS)
    ignore_class = _arguments.check_integer(
        "ignore_class", ignore_class, allow_none=True
    )
    hidden, kernel, dtype = _operands(inputs, kernel)
    transposed = _arguments.check_flag("transpose_kernel", transpose_kernel)
    layout = "[V, D]" if transposed else "[D, V]"
    if len(hidden.shape) < 1 or len(kernel.shape) != 2:
        raise ValueError(
            f"`inputs` must be [..., D] and `kernel` {layout}. Received: "
            f"inputs.shape={tuple(hidden.shape)}, kernel.shape={tuple(kernel.shape)}"
        )
    vocabulary, depth = kernel.shape if transposed else reversed(kernel.shape)
    if hidden.shape[-1] != depth:
        raise ValueError(
            f"The last axis of `inputs` must match D of `kernel` {layout} "
            f"(transpose_kernel={transposed}). Received: "
            f"inputs.shape={tuple(hidden.shape)}, kernel.shape={tuple(kernel.shape)}"
        )
    if bias is not None:
        bias = ops.cast(_backend.to_tensor(bias), dtype)
        if tuple(bias.shape) != (vocabulary,):
            raise ValueError(
                f"`bias` must have shape ({vocabulary},). "
                f"Received: bias.shape={tuple(bias.shape)}"
            )
    leading_shape = tuple(hidden.shape[:-1])
    # NumPy and Python labels are read as given: JAX without 64-bit types
    # would make a label of 2**32 + 5 the class 5 (and Keras' PyTorch fails
    # to convert it).
    given = np.asarray(labels) if _plain_numbers(labels) else None
    if given is not None:
        _check_label_values(given.reshape(-1), vocabulary, ignore_class)
    labels = _backend.to_tensor(labels)
    if len(labels.shape) != len(leading_shape) or any(
        a is not None and b is not None and a != b
        for a, b in zip(labels.shape, leading_shape, strict=False)
    ):
        raise ValueError(
            "`labels` must have the leading shape of `inputs`. Received: "
            f"labels.shape={tuple(labels.shape)}, inputs.shape={tuple(hidden.shape)}"
        )
    if given is None and _backend.is_concrete(labels):
        _check_label_values(_backend.read(labels).reshape(-1), vocabulary, ignore_class)
    labels = ops.reshape(labels, (-1,))
    label_dtype = keras.backend.standardize_dtype(labels.dtype)
    if label_dtype == "bool":  # (TensorFlow compares no bools with 0)
        labels, label_dtype = ops.cast(labels, "int32"), "int32"
    valid = (
        ops.ones(ops.shape(labels), "bool")
        if ignore_class is None
        else ops.not_equal(labels, int(ignore_class))
    )
    # Judged in the labels' own dtype: as int32, a traced int64 label of
    # 2**32 + 5 is the class 5, and a float one of 6.5 the class 6.
    in_range = ops.logical_and(labels >= 0, labels < vocabulary)
    if not label_dtype.startswith(("int", "uint")):
        in_range = ops.logical_and(in_range, ops.equal(labels, ops.floor(labels)))
    labels = ops.cast(labels, "int32")
    # A label known bad only at run time makes its position's loss NaN.
    dtype_nan = ops.cast(math.nan, dtype)
    poison = ops.where(ops.logical_and(valid, ~in_range), dtype_nan, 0.0)
    return _Arguments(
        dtype=dtype,
        # An ignored label keeps its id (for its rank): its weight is 0.
        labels=ops.where(in_range, labels, 0),
        valid=valid,
        in_range=in_range,
        sample_weight=_sample_weight(sample_weight, labels, hidden, dtype),
        poison=ops.cast(poison, dtype),
        hidden=ops.reshape(hidden, (_known_size(leading_shape), depth)),
        kernel=kernel,
        transposed=transposed,
        bias=bias,
        temperature=_temperature.normalize_temperature(temperature, dtype).tensor(
            dtype
        ),
        soft_cap=_arguments.check_real(
            "logit_soft_cap",
            logit_soft_cap,
            minimum=0,
            open_minimum=True,
            allow_none=True,
        ),
        smoothing=_arguments.check_real(
            "label_smoothing", label_smoothing, minimum=0, maximum=1
        ),
        z_loss=_arguments.check_real("z_loss", z_loss, minimum=0),
        chunk=_chunk(chunk_size, vocabulary, hidden),
        reduction=reduction,
        # Traced with an unknown batch size, the shape is read at run time.
        leading_shape=ops.shape(hidden)[:-1],
    )


def _plain_numbers(x) -> bool:
    """Whether `x` is NumPy's or Python's numbers, or lists of them: not a
    tensor, a variable or a traced value, which NumPy may not read."""
    if isinstance(x, (list, tuple)):
        return all(_plain_numbers(item) for item in x)
    return isinstance(x, (np.ndarray, np.generic, int, float))


def _known_size(shape) -> int:
    """The number of elements of `shape`, or -1 where it is not known: a
    reshape cannot infer -1 beside an axis of 0 (inputs with D = 0)."""
    return -1 if None in shape else math.prod(shape)


def _check_label_values(values, vocabulary, ignore_class):
    """Raises unless every label is a whole number in `[0, vocabulary)` or
    `ignore_class`: a float label (Keras' loss truncates 6.9 to 6) must be
    whole, and NaN or an infinity is no class."""
    if values.dtype.kind == "f":
        unwhole = values[~np.isfinite(values) | (values != np.round(values))]
        if unwhole.size:
            raise ValueError(
                "`labels` must be whole numbers (class ids). Received: a "
                f"label of {unwhole[0].item()!r}"
            )
    if ignore_class is not None:
        values = values[values != ignore_class]
    bad = values[(values < 0) | (values >= vocabulary)]
    if bad.size:
        raise ValueError(
            f"`labels` must be class ids in [0, {vocabulary}) or "
            f"`ignore_class`. Received: a label of {bad[0].item()!r}"
        )


def _operands(inputs, kernel):
    """`inputs` and `kernel` as the chunks multiply them, and the compute
    dtype.

    Half-precision inputs and kernel of one dtype stay as they are where
    the backend multiplies them into a float32 product: no float32 copy of
    the kernel (the largest weight) or of the inputs. Otherwise both are
    cast to the compute dtype.
    """
    inputs, kernel = _backend.to_tensor(inputs), _backend.to_tensor(kernel)
    given = keras.backend.standardize_dtype(inputs.dtype)
    if (
        given in _dtypes.HALF_DTYPES
        and keras.backend.standardize_dtype(kernel.dtype) == given
        and _backend.half_matmul_in_float32_serves(inputs)
    ):
        return inputs, kernel, "float32"
    hidden, _ = _dtypes.to_compute_dtype(inputs)
    dtype = keras.backend.standardize_dtype(hidden.dtype)
    return hidden, ops.cast(kernel, dtype), dtype


def _sample_weight(sample_weight, labels, hidden, dtype):
    """`[N]` weights of the `[N]` `labels`, broadcast from the positions'
    shape (`hidden`'s leading axes) as Keras broadcasts them."""
    if sample_weight is None:
        return ops.ones_like(labels, dtype)
    leading_shape = tuple(hidden.shape[:-1])
    weights = ops.cast(_backend.to_tensor(sample_weight), dtype)
    given_shape = tuple(weights.shape)
    rank = len(leading_shape)
    # Keras' `squeeze_or_expand_to_same_rank`: a weight per sequence
    # applies to each of its positions.
    if len(weights.shape) == rank - 1:
        weights = ops.expand_dims(weights, -1)
    elif len(weights.shape) == rank + 1 and weights.shape[-1] == 1:
        weights = ops.squeeze(weights, -1)
    fits = len(weights.shape) <= rank and all(
        a in (1, None) or b is None or a == b
        for a, b in zip(weights.shape[::-1], leading_shape[::-1], strict=False)
    )
    if not fits:
        raise ValueError(
            "`sample_weight` must have the shape of `labels`, or broadcast "
            f"to it. Received: sample_weight.shape={given_shape}, "
            f"labels.shape={leading_shape}"
        )
    return ops.reshape(ops.broadcast_to(weights, ops.shape(hidden)[:-1]), (-1,))


def _chunk(chunk_size, vocabulary, hidden):
    """Tokens per chunk: `chunk_size`, or the backend's choice for the
    device."""
    chunk_size = _arguments.check_positive_integer(
        "chunk_size", chunk_size, allow_none=True
    )
    if chunk_size is not None:
        return chunk_size
    return _backend.chunk_rows(hidden, vocabulary)


class _Spec(NamedTuple):
    """What a chunk's computation needs to know, fixed when traced."""

    soft_cap: float | None
    smoothing: float
    z_loss: float
    tempered: bool  # whether a temperature tensor is passed
    transposed: bool  # whether the kernel is [V, D]
    half: bool  # whether kernel and inputs are half, multiplied into float32
    chunk: int
    ranked: bool = False  # whether the labels' ranks are counted too


def _through_rule(args: _Arguments, rule, weights, ranked=False):
    """`rule`'s output on the chunked arguments, with its custom derivative,
    and the `[N]` ranks of the labels if `ranked` (else None)."""
    per_position = rule is _per_position_rule
    if args.hidden.shape[0] == 0:
        # No position: a loss of 0 (`[]` per position), with zero gradients.
        zero = ops.cast(ops.sum(args.kernel), args.dtype) * 0.0
        zero = zero + ops.sum(weights) * 0.0
        empty = ops.zeros((0,), zero.dtype)
        return (empty + zero if per_position else zero), (empty if ranked else None)
    n, chunk, (hidden, labels, weights) = _padded_to_chunks(
        args.chunk, args.hidden, args.labels, weights
    )
    spec = _Spec(
        args.soft_cap,
        args.smoothing,
        args.z_loss,
        args.temperature is not None,
        args.transposed,
        _is_half(args),
        chunk,
        ranked,
    )
    dtype = args.dtype
    vocabulary = args.kernel.shape[0 if args.transposed else 1]
    bias = ops.zeros((vocabulary,), dtype) if args.bias is None else args.bias
    t = ops.ones((), dtype) if args.temperature is None else args.temperature
    out = rule(spec)(hidden, args.kernel, bias, t, labels, weights)
    out, ranks = out if ranked else (out, None)
    out = out if len(out.shape) == 0 else out[:n]
    return out, (None if ranks is None else ranks[:n])


def _is_half(args: _Arguments) -> bool:
    return keras.backend.standardize_dtype(args.kernel.dtype) in _dtypes.HALF_DTYPES


def _padded_to_chunks(chunk, hidden, *per_position):
    """The positions `n`, the chunk, and `hidden` `[n, D]` and the `[n]`
    tensors padded to a whole number of chunks."""
    n = hidden.shape[0]
    if n is None:
        # A traced batch of unknown size (Keras' `fit` on TensorFlow): the
        # chunk fits it at run time, where a GPU's 2048 rows would pad a
        # batch of 100 twentyfold.
        n = ops.shape(hidden)[0]
        chunk = ops.minimum(chunk, ops.maximum(n, 1))
    else:
        chunk = min(chunk, max(n, 1))
    pad = (-n) % chunk
    tensors = (hidden, *per_position)
    if not isinstance(pad, int) or pad:
        tensors = tuple(
            ops.pad(t, ((0, pad),) + ((0, 0),) * (len(t.shape) - 1)) for t in tensors
        )
    return n, chunk, tensors


def _weighted(losses, weights):
    """`losses * weights`, 0 where a weight is 0 (whose loss may be inf)."""
    return ops.where(weights != 0, losses * weights, 0.0)


def _per_position_rule(spec):
    """Per-position losses times `weights`; reverse mode recomputes chunks.

    The forward pass keeps the `[N]` unweighted losses: the weights'
    gradient.
    """

    def forward(h, w, b, t, y, weights):
        losses, ranks = _scan_losses(spec, h, w, b, t, y)
        return _with_ranks(_weighted(losses, weights), ranks), (losses,)

    def backward(inputs, saved, upstream):
        h, w, b, t, y, weights = inputs
        (losses,) = saved
        _, _, gradients = _scan_losses_and_gradients(
            _unranked(spec), h, w, b, t, y, weights * upstream
        )
        return _in_dtypes_of(inputs, gradients) + (None, _weighted(losses, upstream))

    return _backend.custom_vjp(forward, backward, extra_outputs=int(spec.ranked))


def _with_ranks(output, ranks):
    """A rule's outputs: `output`, or `(output, ranks)` where ranked."""
    return output if ranks is None else (output, ranks)


def _unranked(spec):
    """`spec` for a pass that only differentiates: no ranks to count."""
    return spec._replace(ranked=False)


def _in_dtypes_of(inputs, gradients):
    """Each gradient in its input's dtype: a half kernel's gradient is
    accumulated in float32, and returned half."""
    return tuple(
        ops.cast(g, x.dtype) for g, x in zip(gradients, inputs[:4], strict=True)
    )


def _weighted_sum_rule(spec):
    """`sum(weights * losses)`, its gradients computed in the same pass.

    When a derivative may be taken, one pass over the chunks gives the loss
    and its gradients: three matrix products, as the logits would cost.
    The reverse pass then only scales them by the upstream gradient.
    """

    def forward(h, w, b, t, y, weights):
        losses, ranks = _scan_losses(spec, h, w, b, t, y)
        return _with_ranks(ops.sum(_weighted(losses, weights)), ranks), ()

    def forward_for_derivative(h, w, b, t, y, weights):
        losses, ranks, gradients = _scan_losses_and_gradients(
            spec, h, w, b, t, y, weights
        )
        loss = ops.sum(_weighted(losses, weights))
        return _with_ranks(loss, ranks), _kept(gradients, w) + (losses,)

    def backward(inputs, saved, upstream):
        if saved:  # from forward_for_derivative
            *gradients, losses = saved
            # (Scaled in each gradient's dtype: no float32 copy of a half one.)
            gradients = [g * ops.cast(upstream, g.dtype) for g in gradients]
        else:
            h, w, b, t, y, weights = inputs
            losses, _, gradients = _scan_losses_and_gradients(
                _unranked(spec), h, w, b, t, y, weights * upstream
            )
        return _in_dtypes_of(inputs, gradients) + (None, _weighted(losses, upstream))

    return _backend.custom_vjp(
        forward,
        backward,
        forward_for_derivative=forward_for_derivative,
        extra_outputs=int(spec.ranked),
    )


def _kept(gradients, w):
    """The gradients a derivative keeps until the reverse pass scales them.

    A bfloat16 kernel's gradient is kept in bfloat16, not in its float32
    accumulator: half the memory, through the reverse pass too, and the
    same range. (A float16 one stays float32: scaled down later, say by a
    mean taken outside, it may need float32's range.) The scaling rounds it
    once more, unless the upstream gradient is a power of two.
    """
    dh, dw, *rest = gradients
    if keras.backend.standardize_dtype(w.dtype) == "bfloat16":
        dw = ops.cast(dw, "bfloat16")
    return (dh, dw, *rest)


# Each `[C, V]` tensor of a chunk loses its last name (`del`, or rebinding)
# as soon as the next is made: eager backends (PyTorch, TensorFlow's) free
# it then, so that a chunk holds two such tensors at its peak, not five.


class _Chunk(NamedTuple):
    """What the loss and its gradients need of one chunk's logits, bar the
    `[C, V]` numerator of its softmax, `exp(z - max z)` (`z = logits / t`)."""

    capped: object  # the soft-capped logits; None without a cap
    top: object  # [C, 1]: the largest logit
    total: object  # [C, 1]: the sum of the numerator
    log_total: object  # [C, 1]
    picked: object  # [C, 1]: the label's shifted logit, (logit - top) / t
    mean: object  # [C, 1]: the mean shifted logit; None without smoothing
    expected: object  # [C, 1]: sum(numerator * shifted), for `t`'s gradient
    ranks: object  # [C]: the labels' ranks; None unless `spec.ranked`


def _chunk_logits(spec, h, w, b):
    """One chunk's `[C, V]` logits, soft-capped where asked."""
    logits = _backend.matmul(h, w, transpose_b=spec.transposed, float32=spec.half)
    return _numerics.soft_cap(_backend.apply_in_place("add", logits, b), spec.soft_cap)


def _chunk_softmax(spec, h, w, b, t, y, differentiated=False):
    """One chunk's softmax numerator `[C, V]`, and its `_Chunk`."""
    logits = _chunk_logits(spec, h, w, b)
    # Ranked on the logits themselves: the shift and the temperature round.
    ranks = _ranks_in_chunk(logits, y) if spec.ranked else None
    top = ops.max(logits, axis=-1, keepdims=True)
    # Only the cap's derivative needs the logits; else the shift may write
    # over them, and each pass after over its input (`apply_in_place`).
    capped = logits if spec.soft_cap is not None and differentiated else None
    if capped is None:
        shifted = _backend.apply_in_place("subtract", logits, top)
    else:
        shifted = logits - top
    del logits
    if spec.tempered:
        shifted = _backend.apply_in_place("divide", shifted, t)
    picked = ops.take_along_axis(shifted, y[:, None], axis=-1)
    mean = None
    if spec.smoothing:
        # (Keras' mean on JAX, 3.15, sums float64 in float32.)
        mean = ops.sum(shifted, axis=-1, keepdims=True) / shifted.shape[-1]
    expected = None
    if spec.tempered and differentiated:
        # The temperature's gradient reads the shifted logits beside it.
        numerator = ops.exp(shifted)
        expected = ops.sum(numerator * shifted, axis=-1, keepdims=True)
    else:
        numerator = _backend.apply_in_place("exp", shifted)
    del shifted
    total = ops.sum(numerator, axis=-1, keepdims=True)
    chunk = _Chunk(
        capped=capped,
        top=top,
        total=total,
        log_total=ops.log(total),
        picked=picked,
        mean=mean,
        expected=expected,
        ranks=ranks,
    )
    return numerator, chunk


def _ranks_in_chunk(logits, y):
    """`[C]` counts of the classes above each label `y`: a larger logit, or
    an equal one at a lower class id (as `argmax` breaks ties)."""
    picked = ops.take_along_axis(logits, y[:, None], axis=-1)
    classes = ops.arange(logits.shape[-1], dtype="int32")[None, :]
    above = ops.logical_or(
        logits > picked, ops.logical_and(logits == picked, classes < y[:, None])
    )
    return ops.sum(ops.cast(above, logits.dtype), axis=-1)


def _chunk_losses(spec, c: _Chunk, t):
    """`[C]` unweighted losses of one chunk."""
    loss = (1 - spec.smoothing) * (c.log_total - c.picked)
    if spec.smoothing:
        loss = loss + spec.smoothing * (c.log_total - c.mean)
    if spec.z_loss:
        loss = loss + spec.z_loss * ops.square(c.top / t + c.log_total)
    return loss[:, 0]


class _Gradients(NamedTuple):
    inputs: object  # [C, D]
    kernel: tuple  # (a, b): the kernel's gradient is a^T @ b
    bias: object  # [V]
    temperature: object  # scalar


def _chunk_losses_and_gradients(spec, h, w, b, t, y, weights):
    """`[C]` unweighted losses, `[C]` ranks (or None), and the `_Gradients`
    of `sum(weights * losses)` over one chunk."""
    # `grad` is the chunk's one running `[C, V]` tensor: the softmax's
    # numerator, then d loss / d logits per unit of the row's weight. The
    # weights (and 1 / t) scale the products' `[C, D]` and `[C]` operands
    # instead: each pass over a `[C, V]` tensor costs a CPU as much as a
    # tenth of a matrix product.
    grad, c = _chunk_softmax(spec, h, w, b, t, y, differentiated=True)
    losses = _chunk_losses(spec, c, t)
    weights = weights[:, None]
    scale = 1.0 / c.total
    if spec.z_loss:
        scale = scale * (1.0 + 2.0 * spec.z_loss * (c.top / t + c.log_total))
    grad = _backend.apply_in_place("multiply", grad, scale)
    grad = _backend.add_at_columns(
        grad, y, ops.full(ops.shape(y), -(1.0 - spec.smoothing), grad.dtype)
    )
    if spec.smoothing:
        grad = _backend.apply_in_place(
            "subtract", grad, spec.smoothing / grad.shape[-1]
        )
    dt = ops.zeros((), grad.dtype)
    rows = weights  # [C, 1]: d loss / d logits is `rows * grad`
    if spec.tempered:
        # z = shifted + top / t, so d z / d t = -z / t; each row's sums
        # over the classes, from the chunk's own.
        dot = scale * c.expected - (1.0 - spec.smoothing) * c.picked
        if spec.smoothing:
            dot = dot - spec.smoothing * c.mean
        row_sum = scale * c.total - 1.0
        dt = -ops.sum(weights * (dot + row_sum * c.top / t)) / t
        rows = weights / t
    if spec.soft_cap is not None:
        derivative = _numerics.soft_cap_derivative(c.capped, spec.soft_cap)
        grad = _backend.apply_in_place("multiply", grad, derivative)
    # Half operands multiply the logits' gradients rounded to half,
    # accumulating in float32, as a half matmul's own gradient does.
    d_operand = ops.cast(grad, h.dtype) if spec.half else grad
    if spec.transposed:
        d_inputs = _backend.matmul(d_operand, w, float32=spec.half)
    else:
        # (w @ dz^T)^T: TensorFlow's CPU kernel multiplies [C, V] by a
        # [D, V] read transposed 1.4x slower than this (C = 128, V = 131072).
        d_inputs = ops.transpose(
            _backend.matmul(w, d_operand, transpose_b=True, float32=spec.half)
        )
    weighted_inputs = ops.cast(ops.cast(h, rows.dtype) * rows, h.dtype)
    gradients = _Gradients(
        # The kernel is read in place in either layout, never transposed.
        inputs=ops.cast(d_inputs * rows, h.dtype),
        kernel=(
            (d_operand, weighted_inputs)
            if spec.transposed
            else (weighted_inputs, d_operand)
        ),
        # A matrix-vector product: a column sum is a slow pass on a CPU.
        bias=_backend.matmul(rows, grad, transpose_a=True)[0],
        temperature=dt,
    )
    return losses, c.ranks, gradients


def _scan_losses(spec, h, w, b, t, y):
    """`[chunks * chunk]` unweighted losses, and ranks (None unless
    `spec.ranked`)."""

    def step(carry, xs):
        h_c, y_c = xs
        _, c = _chunk_softmax(spec, h_c, w, b, t, y_c)
        return carry, (_chunk_losses(spec, c, t), *_ranks_of(c.ranks))

    _, (losses, *ranks) = _backend.scan(step, (), _split(spec, h, y))
    return _flat(losses), _flat(*ranks)


def _ranks_of(ranks) -> tuple:
    """A scan step's ranks output: none where not ranked."""
    return () if ranks is None else (ranks,)


def _flat(*chunked):
    """The one `[chunks, chunk]` tensor given, as `[chunks * chunk]`; or None."""
    return ops.reshape(chunked[0], (-1,)) if chunked else None


def _scan_losses_and_gradients(spec, h, w, b, t, y, weights):
    """The unweighted `[N]` losses, the ranks (None unless `spec.ranked`),
    and the gradients of `sum(weights * losses)` for `h`, `w`, `b` and `t`
    (`w`'s in the compute dtype)."""

    def step(carry, xs):
        dw, db, dt = carry
        h_c, y_c, weights_c = xs
        losses, ranks, g = _chunk_losses_and_gradients(
            spec, h_c, w, b, t, y_c, weights_c
        )
        dw = _backend.add_matmul(dw, *g.kernel, transpose_a=True)
        outputs = (losses, g.inputs, *_ranks_of(ranks))
        return (dw, db + g.bias, dt + g.temperature), outputs

    # One float32 accumulator for a half kernel's gradient (`b` is in the
    # compute dtype).
    vocabulary_axis = 0 if spec.transposed else 1
    init = (
        _backend.running_total(w, b.dtype, vocabulary_axis),
        ops.zeros_like(b),
        ops.zeros((), b.dtype),
    )
    (dw, db, dt), (losses, dh, *ranks) = _backend.scan(
        step, init, _split(spec, h, y, weights)
    )
    dw = _backend.total_of(dw, vocabulary_axis)
    gradients = (ops.reshape(dh, ops.shape(h)), dw, db, dt)
    return _flat(losses), _flat(*ranks), gradients


def _split(spec, h, *per_position):
    """`h` and per-position tensors as chunks of `chunk` rows."""
    n = h.shape[0]
    chunks = -1 if n is None else n // spec.chunk
    return (ops.reshape(h, (chunks, spec.chunk, h.shape[-1])),) + tuple(
        ops.reshape(a, (chunks, spec.chunk)) for a in per_position
    )


def linear_top_k_hits(
    labels,
    inputs,
    kernel,
    bias=None,
    *,
    k: int = 1,
    transpose_kernel: bool = False,
    logit_soft_cap: float | None = None,
    chunk_size: int | None = None,
):
    """Whether each label is among the `k` largest logits, without the logits.

    With `logits = inputs @ kernel + bias` (soft-capped if asked), a
    position hits where fewer than `k` classes rank above its label: a
    larger logit, or an equal one at a lower class id. At `k = 1` that is
    `argmax(logits) == label`, Keras' sparse categorical accuracy. A
    temperature changes no rank, so takes no part.

    Args:
        labels: Integer class ids, of the leading shape of `inputs`.
        inputs: Hidden states `[..., D]`.
        kernel: `[D, V]`; `[V, D]` with `transpose_kernel=True`.
        bias: Optional `[V]`.
        k: How many of the largest logits count.
        transpose_kernel: As in `linear_cross_entropy`.
        logit_soft_cap: As in `linear_cross_entropy`.
        chunk_size: As in `linear_cross_entropy`.

    Returns:
        1.0 where the label is in the top `k`, else 0.0, of `labels`' shape.

    Example:

    >>> import numpy as np
    >>> from keras_softmax.linear_cross_entropy import linear_top_k_hits
    >>> inputs = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    >>> kernel = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]], "float32")
    >>> np.asarray(linear_top_k_hits([0, 0], inputs, kernel)).tolist()
    [1.0, 0.0]
    """
    k = _arguments.check_positive_integer("k", k)
    ranks = linear_label_ranks(
        labels,
        inputs,
        kernel,
        bias,
        transpose_kernel=transpose_kernel,
        logit_soft_cap=logit_soft_cap,
        chunk_size=chunk_size,
    )
    return top_k_hits(ranks, k)


def top_k_hits(ranks, k: int):
    """1.0 where a label's rank (from `linear_label_ranks`) is below `k`,
    else 0.0; NaN stays NaN."""
    return ops.where(ops.isnan(ranks), ranks, ops.cast(ranks < k, ranks.dtype))


def linear_label_ranks(
    labels,
    inputs,
    kernel,
    bias=None,
    *,
    transpose_kernel: bool = False,
    logit_soft_cap: float | None = None,
    chunk_size: int | None = None,
):
    """How many classes rank above each label, without the logits.

    With `logits = inputs @ kernel + bias` (soft-capped if asked), a class
    ranks above the label with a larger logit, or an equal one at a lower
    class id. One pass gives every top-`k` accuracy (`top_k_hits`).

    Args:
        labels: Integer class ids, of the leading shape of `inputs`.
        inputs: Hidden states `[..., D]`.
        kernel: `[D, V]`; `[V, D]` with `transpose_kernel=True`.
        bias: Optional `[V]`.
        transpose_kernel: As in `linear_cross_entropy`.
        logit_soft_cap: As in `linear_cross_entropy`.
        chunk_size: As in `linear_cross_entropy`.

    Returns:
        The ranks (0 for the largest logit), in the compute dtype, of
        `labels`' shape; NaN for a label known bad only at run time.

    Example:

    >>> import numpy as np
    >>> from keras_softmax.linear_cross_entropy import linear_label_ranks
    >>> inputs = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    >>> kernel = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]], "float32")
    >>> np.asarray(linear_label_ranks([0, 0], inputs, kernel)).tolist()
    [0.0, 1.0]
    """
    args = _checked_arguments(
        labels,
        inputs,
        kernel,
        bias,
        transpose_kernel=transpose_kernel,
        logit_soft_cap=logit_soft_cap,
        chunk_size=chunk_size,
    )
    if args.hidden.shape[0] == 0:
        return ops.zeros(args.leading_shape, args.dtype)
    n, chunk, (hidden, labels) = _padded_to_chunks(args.chunk, args.hidden, args.labels)
    spec = _Spec(args.soft_cap, 0.0, 0.0, False, args.transposed, _is_half(args), chunk)
    bias = 0.0 if args.bias is None else args.bias

    def step(carry, xs):
        h_c, y_c = xs
        return carry, (
            _ranks_in_chunk(_chunk_logits(spec, h_c, args.kernel, bias), y_c),
        )

    _, (ranks,) = _backend.scan(step, (), _split(spec, hidden, labels))
    ranks = _ranks_of_bad_labels(_flat(ranks)[:n], args)
    return ops.reshape(ranks, args.leading_shape)
