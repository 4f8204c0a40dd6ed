"""Exact attention a block of keys at a time, in memory linear in the sequence.

FlashAttention's algorithm (Dao et al., 2022; FlashAttention-2's loop
order), written with `keras.ops`. For each block of queries, the scores
against one block of keys at a time update a running maximum `m` of the
kept scores, a running sum `l` of `exp((s - m) / t)` and the running
weighted sum of the values; the `(B, N, T, S)` scores never exist. The
derivative is a custom one that recomputes each block's scores from the
saved `m` and `1 / l` (FlashAttention's backward pass), so reverse mode
keeps the inputs, the outputs and two numbers per query and head.

With a causal mask, the blocks of keys wholly after a block of queries are
skipped, forward and backward: about half of the work.

The full path's promises hold: a query with no key kept gets 0 and a zero
gradient (its `1 / l` is 0); the scores are shifted by the kept maximum
before the temperature divides them, so nothing overflows for finite
scores; a masked score never reaches an `exp`.
"""

import functools
import math
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_softmax import _arguments
from keras_softmax import _backend
from keras_softmax import _dtypes
from keras_softmax import _masks
from keras_softmax import _numerics

# Scores held at once for one pair of blocks, over the batch and the heads
# (8 MiB in float32): large enough that a CPU's cost per op is amortised.
_BLOCK_ELEMENTS = 1 << 21
_MIN_BLOCK, _MAX_BLOCK = 16, 1024
# From this many elements of scores (over the batch and the heads: 64 MiB in
# float32, of which the full path holds several copies), blocks are chosen.
# A policy of `attention.choose_path`, not a block size: `BlockSizes` leaves it.
LARGE_SCORES = 1 << 24


class BlockSizes(NamedTuple):
    """How many queries and keys one block of the blockwise attention holds.

    As Pallas' `flash_attention.BlockSizes`: a parameter of the blocks, for
    tuning them or, in tests, for several blocks over short sequences. A
    block longer than its sequence is cut to the sequence's length; the
    last block of a sequence that is not a multiple is padded.

    Attributes:
        query: Positive integer, the queries per block.
        key: Positive integer, the keys per block.

    Example:

    >>> from keras_softmax import BlockSizes
    >>> BlockSizes(query=128, key=256)
    BlockSizes(query=128, key=256)
    """

    query: int
    key: int


def check_block_sizes(block_sizes) -> BlockSizes | None:
    """`block_sizes` as `BlockSizes` (any pair of positive integers), or None.

    Raises:
        ValueError: naming `block_sizes` (or the field) and its value, for
            anything but None or a pair of positive integers.
    """
    if block_sizes is None:
        return None
    try:
        query, key = block_sizes
    except (TypeError, ValueError):
        raise ValueError(
            "`block_sizes` must be a `BlockSizes(query, key)` of positive "
            f"integers, or None. Received: block_sizes={block_sizes!r}"
        ) from None
    return BlockSizes(
        _arguments.check_positive_integer("block_sizes.query", query),
        _arguments.check_positive_integer("block_sizes.key", key),
    )


def default_block_sizes(batch, heads, queries, keys) -> BlockSizes:
    """The blocks chosen for a shape: the one place their rule lives.

    Square blocks of a power of two holding about `_BLOCK_ELEMENTS` scores
    per pair over the batch (unknown: 1) and the heads, between `_MIN_BLOCK`
    and `_MAX_BLOCK`, cut to the power of two that covers each length.
    """
    side = math.isqrt(_BLOCK_ELEMENTS // ((batch or 1) * heads))
    side = max(_MIN_BLOCK, min(_MAX_BLOCK, 1 << (max(side, 1).bit_length() - 1)))

    def fitted(length):
        return min(side, 1 << max(length - 1, 0).bit_length())

    return BlockSizes(fitted(queries), fitted(keys))


def scores_are_large(query, key) -> bool:
    """Whether the full `(B, N, T, S)` scores would be large (B unknown: 1)."""
    batch, queries, heads, _ = _backend.static_shape(query)
    keys = _backend.static_shape(key)[1]
    if None in (queries, heads, keys):
        return False
    return (batch or 1) * heads * queries * keys >= LARGE_SCORES


def can_run(query, key, bias, keep) -> bool:
    """Whether the blocks can run: every length and size known when traced."""
    shapes = [
        _backend.static_shape(t) for t in (query, key, bias, keep) if t is not None
    ]
    return all(n is not None for shape in shapes for n in shape[1:])


class _Spec(NamedTuple):
    """What the blocks' computation needs to know, fixed when traced."""

    scale: float
    is_causal: bool
    soft_cap: float | None
    tempered: bool  # a temperature tensor is passed (else it is 1)
    biased: bool
    masked: bool  # a keep mask is passed
    keys: int  # S before padding
    block_queries: int
    block_keys: int


def blockwise_attention(
    query,
    key,
    value,
    bias,
    keep,
    scale,
    temperature,
    is_causal,
    soft_cap,
    block_sizes: BlockSizes | None = None,
):
    """Attention of checked, rank-4 inputs, computed over blocks.

    Args:
        query: `(B, T, N, H)`, in a float32 or float64 compute dtype.
        key: `(B, S, N, H)`, its heads repeated to the query's.
        value: `(B, S, N, Hv)`.
        bias: None, or a rank-4 tensor broadcastable to `(B, N, T, S)`.
        keep: None, or a rank-4 bool tensor broadcastable to `(B, N, T, S)`.
        scale: A Python float.
        temperature: None (1), or a scalar tensor of the inputs' dtype.
        is_causal: Whether query `t` attends to keys `s <= t` only.
        soft_cap: None, or a positive float `c`: scores `s` become
            `c * tanh(s / c)` before the temperature and the masks.
        block_sizes: A checked `BlockSizes`, or None for
            `default_block_sizes`.

    Returns:
        The outputs, `(B, T, N, Hv)`.
    """
    batch, queries, heads, _ = _backend.static_shape(query)
    keys = key.shape[1]
    if block_sizes is None:
        block_queries, block_keys = default_block_sizes(batch, heads, queries, keys)
    else:
        # A block past the sequence's end would only compute padding.
        block_queries = min(block_sizes.query, queries)
        block_keys = min(block_sizes.key, keys)
    spec = _Spec(
        scale=scale,
        is_causal=is_causal,
        soft_cap=soft_cap,
        tempered=temperature is not None,
        biased=bias is not None,
        masked=keep is not None,
        keys=keys,
        block_queries=block_queries,
        block_keys=block_keys,
    )
    dtype = keras.backend.standardize_dtype(query.dtype)
    inputs = [
        _pad_axis(query, 1, block_queries),
        _pad_axis(key, 1, block_keys),
        _pad_axis(value, 1, block_keys),
    ]
    if bias is not None:
        inputs.append(_pad_scores_like(ops.cast(bias, dtype), spec, queries, 0.0))
    if keep is not None:
        inputs.append(_pad_scores_like(keep, spec, queries, False))
    if spec.tempered:
        inputs.append(temperature)
    outputs = _rule(spec)(*inputs)
    return outputs[:, :queries]


def _pad_axis(x, axis, block, value=0):
    """`x` padded along `axis` to a multiple of `block`."""
    pad = -x.shape[axis] % block
    if not pad:
        return x
    widths = [(0, 0)] * len(x.shape)
    widths[axis] = (0, pad)
    return ops.pad(x, widths, constant_values=value)


def _pad_scores_like(x, spec, queries, value):
    """A bias or mask padded along its query and key axes, where not broadcast."""
    if x.shape[2] == queries != 1:
        x = _pad_axis(x, 2, spec.block_queries, value)
    if x.shape[3] == spec.keys != 1:
        x = _pad_axis(x, 3, spec.block_keys, value)
    return x


class _Inputs(NamedTuple):
    query: object
    key: object
    value: object
    bias: object  # or None
    keep: object  # or None
    temperature: object  # or None


def _unpacked(spec, inputs) -> _Inputs:
    query, key, value, *rest = inputs
    rest = iter(rest)
    bias = next(rest) if spec.biased else None
    keep = next(rest) if spec.masked else None
    temperature = next(rest) if spec.tempered else None
    return _Inputs(query, key, value, bias, keep, temperature)


def _rule(spec):
    """The blocks' forward pass, with FlashAttention's backward as derivative."""

    def forward(*inputs):
        outputs, shift, inverse_total = _forward(spec, _unpacked(spec, inputs))
        return outputs, (shift, inverse_total)

    def backward(inputs, saved, upstream):
        gradients = _backward(spec, _unpacked(spec, inputs), saved, upstream)
        return tuple(g for g in gradients if g is not _ABSENT)

    return _backend.custom_vjp(forward, backward, saves_outputs=True)


class _Block(NamedTuple):
    """The scores of one block of queries against one block of keys."""

    scores: object  # (B, N, bq, bk): scaled, biased and capped; the lowest
    # finite number where masked
    kept: object  # a bool tensor broadcastable to the scores, or None


def _block_scores(spec, x: _Inputs, i, j, query_block, key_block) -> _Block:
    scores = ops.einsum("BTNH,BSNH->BNTS", query_block, key_block)
    scores = scores * ops.cast(spec.scale, scores.dtype)
    if x.bias is not None:
        scores = scores + _block_of(spec, x.bias, i, j)
    scores = _numerics.soft_cap(scores, spec.soft_cap)
    kept = []
    if x.keep is not None:
        kept.append(_block_of(spec, x.keep, i, j))
    key_start = j * spec.block_keys
    if spec.is_causal:
        kept.append(
            _masks.causal_mask(
                spec.block_queries, spec.block_keys, i * spec.block_queries, key_start
            )
        )
    if x.key.shape[1] != spec.keys:  # padded keys
        kept.append(ops.less(key_start + ops.arange(spec.block_keys), spec.keys))
    if not kept:
        return _Block(scores, None)
    kept = functools.reduce(ops.logical_and, kept)
    # A tensor: Keras' PyTorch `where` (3.15) makes a Python float float32.
    return _Block(ops.where(kept, scores, _dtypes.lowest(scores.dtype)), kept)


def _block_of(spec, x, i, j):
    """Block `(i, j)` of a rank-4 bias or mask, along its unbroadcast axes."""
    starts, sizes = [0, 0, 0, 0], list(ops.shape(x))
    if sizes[2] != 1:
        starts[2], sizes[2] = i * spec.block_queries, spec.block_queries
    if sizes[3] != 1:
        starts[3], sizes[3] = j * spec.block_keys, spec.block_keys
    return ops.slice(x, _indices(starts), sizes)


def _over_temperature(spec, x, temperature):
    return x / temperature if spec.tempered else x


def _shifted(spec, scores, shift):
    """`scores - shift`, the exponent before the temperature divides it.

    Under a temperature, a score within two ulps of the shift counts as the
    shift itself: a compiler may round the scores differently where it
    takes their maximum and where it shifts them (XLA on a CPU does), and
    divided by a tiny temperature one ulp is the whole distribution. The
    scores' own rounding is larger than that.
    """
    shifted = scores - shift
    if not spec.tempered:
        return shifted
    epsilon = float(np.finfo(keras.backend.standardize_dtype(scores.dtype)).eps)
    tolerance = (2 * epsilon) * ops.abs(shift)
    return ops.where(shifted > -tolerance, 0.0, shifted)


def _blocks(x, block):
    """`(B, L, ...)` as `(L / block, B, block, ...)`."""
    shape = tuple(ops.shape(x))
    x = ops.reshape(x, (shape[0], shape[1] // block, block) + shape[2:])
    # (Not `moveaxis`: `torch.func` has no batching rule for it.)
    return ops.transpose(x, (1, 0) + tuple(range(2, len(x.shape))))


def _unblocks(x):
    """The inverse of `_blocks`."""
    x = ops.transpose(x, (1, 0) + tuple(range(2, len(x.shape))))
    shape = tuple(ops.shape(x))
    return ops.reshape(x, (shape[0], shape[1] * shape[2]) + shape[3:])


def _key_block_count(spec, i, key_blocks):
    """How many key blocks query block `i` attends to (causal: up to its end)."""
    if not spec.is_causal:
        return key_blocks
    blocks = ((i + 1) * spec.block_queries - 1) // spec.block_keys + 1
    if isinstance(blocks, int):
        return min(blocks, key_blocks)
    return ops.minimum(blocks, key_blocks)


def _first_query_block(spec, j):
    """The first query block that attends to key block `j`."""
    return (j * spec.block_keys) // spec.block_queries if spec.is_causal else 0


def _forward(spec, x: _Inputs):
    """Outputs `(B, Tp, N, Hv)`; per query block, the shift and `1 / l`."""
    key_blocks = _blocks(x.key, spec.block_keys)
    value_blocks = _blocks(x.value, spec.block_keys)
    count = key_blocks.shape[0]
    dtype = x.query.dtype
    lowest = _dtypes.LOWEST[keras.backend.standardize_dtype(dtype)]

    def query_block(carry, xs):
        i, query_i = _backend.loop_index(xs[0]), xs[1]
        batch, rows, heads, _ = ops.shape(query_i)
        stats = (batch, heads, rows, 1)
        initial = (
            ops.full(stats, lowest, dtype),
            ops.zeros(stats, dtype),
            ops.zeros((batch, heads, rows, x.value.shape[-1]), dtype),
        )

        def key_block(j, state):
            shift, total, weighted = state
            j = _backend.loop_index(j)
            block = _block_scores(spec, x, i, j, query_i, key_blocks[j])
            new_shift = _backend.maximum(
                shift, ops.max(block.scores, -1, keepdims=True)
            )
            exps = ops.exp(
                _over_temperature(
                    spec, _shifted(spec, block.scores, new_shift), x.temperature
                )
            )
            if block.kept is not None:
                exps = ops.where(block.kept, exps, 0.0)
            rescale = ops.exp(_over_temperature(spec, shift - new_shift, x.temperature))
            total = total * rescale + ops.sum(exps, -1, keepdims=True)
            weighted = weighted * rescale + ops.einsum(
                "BNTS,BSNH->BNTH", exps, value_blocks[j]
            )
            return new_shift, total, weighted

        blocks = _key_block_count(spec, i, count)
        shift, total, weighted = _backend.fori_loop(0, blocks, key_block, initial)
        # A query with nothing kept has a total of 0, and outputs 0.
        # (A kept maximum contributes exp(0) = 1: a positive total is >= 1.)
        inverse_total = 1.0 / ops.where(total > 0, total, math.inf)
        outputs = ops.transpose(weighted * inverse_total, (0, 2, 1, 3))
        return carry, (outputs, shift, inverse_total)

    indices = ops.arange(x.query.shape[1] // spec.block_queries)
    query_blocks = _blocks(x.query, spec.block_queries)
    _, (outputs, shift, inverse_total) = _backend.scan(
        query_block, (), (indices, query_blocks)
    )
    return _unblocks(outputs), shift, inverse_total


_ABSENT = object()


def _backward(spec, x: _Inputs, saved, upstream):
    """The gradients of the rule's inputs, block by block.

    Per pair of blocks: `p` recomputed from the saved shift and `1 / l`;
    `dp = upstream . v`; `dz = p * (dp - rowsum(upstream * outputs))`, the
    gradient of the tempered scores.
    """
    outputs, shift, inverse_total = saved
    dtype = x.query.dtype
    query_blocks = _blocks(x.query, spec.block_queries)
    upstream_blocks = _blocks(upstream, spec.block_queries)
    # rowsum(upstream * outputs), as the stats: (nq, B, N, bq, 1).
    delta_blocks = _blocks(ops.sum(upstream * outputs, -1), spec.block_queries)
    delta_blocks = ops.transpose(delta_blocks, (0, 1, 3, 2))[..., None]
    count = query_blocks.shape[0]

    def key_block(carry, xs):
        j, key_j, value_j = _backend.loop_index(xs[0]), xs[1], xs[2]

        def query_block(i, state):
            d_key, d_value, d_query, d_bias, d_temperature = state
            i = _backend.loop_index(i)
            query_i, upstream_i = query_blocks[i], upstream_blocks[i]
            shift_i, inverse_i = shift[i], inverse_total[i]
            block = _block_scores(spec, x, i, j, query_i, key_j)
            shifted = _shifted(spec, block.scores, shift_i)
            weights = ops.exp(_over_temperature(spec, shifted, x.temperature))
            weights = weights * inverse_i
            if block.kept is not None:
                weights = ops.where(block.kept, weights, 0.0)
            d_value = d_value + ops.einsum("BNTS,BTNH->BSNH", weights, upstream_i)
            d_weights = ops.einsum("BTNH,BSNH->BNTS", upstream_i, value_j)
            d_scores = weights * (d_weights - delta_blocks[i])
            if spec.tempered:
                # z = (s - m) / t: dz/dt = -(s - m) / t^2, and s - m is finite
                # wherever the weight is positive. Divided by t here and once
                # more after the loop: t^2 underflows for a temperature below
                # 1e-19 in float32, and XLA rewrites a / t / t as a / (t * t).
                moment = ops.where(weights > 0, d_scores * shifted, 0.0)
                d_temperature = d_temperature - ops.sum(moment) / x.temperature
                d_scores = d_scores / x.temperature
            if spec.soft_cap is not None:
                d_scores = d_scores * _numerics.soft_cap_derivative(
                    block.scores, spec.soft_cap
                )
            if spec.biased:
                d_bias = _add_block(spec, d_bias, d_scores, i, j)
            d_scores = d_scores * ops.cast(spec.scale, dtype)
            d_query_i = ops.einsum("BNTS,BSNH->BTNH", d_scores, key_j)
            d_query = _backend.slice_add(
                d_query, _indices([i, 0, 0, 0, 0]), d_query_i[None]
            )
            d_key = d_key + ops.einsum("BNTS,BTNH->BSNH", d_scores, query_i)
            return d_key, d_value, d_query, d_bias, d_temperature

        d_query, d_bias, d_temperature = carry
        state = (ops.zeros_like(key_j), ops.zeros_like(value_j)) + carry
        d_key, d_value, *carry = _backend.fori_loop(
            _first_query_block(spec, j), count, query_block, state
        )
        return tuple(carry), (d_key, d_value)

    initial = (
        ops.zeros_like(query_blocks),
        ops.zeros_like(x.bias) if spec.biased else ops.zeros((), dtype),
        ops.zeros((), dtype),
    )
    key_count = x.key.shape[1] // spec.block_keys
    (d_query, d_bias, d_temperature), (d_key, d_value) = _backend.scan(
        key_block,
        initial,
        (
            ops.arange(key_count),
            _blocks(x.key, spec.block_keys),
            _blocks(x.value, spec.block_keys),
        ),
    )
    return (
        _unblocks(d_query),
        _unblocks(d_key),
        _unblocks(d_value),
        d_bias if spec.biased else _ABSENT,
        None if spec.masked else _ABSENT,
        d_temperature / x.temperature if spec.tempered else _ABSENT,
    )


def _add_block(spec, total, d_scores, i, j):
    """`total`'s block `(i, j)` plus `d_scores`, summed over its broadcast axes."""
    d_scores = _numerics.sum_to_shape(d_scores, total.shape)
    starts = [0, 0, 0, 0]
    if total.shape[2] != 1:
        starts[2] = i * spec.block_queries
    if total.shape[3] != 1:
        starts[3] = j * spec.block_keys
    return _backend.slice_add(total, _indices(starts), d_scores)


def _indices(starts):
    """Start indices of one integer type (JAX's dynamic slices need it)."""
    if all(isinstance(s, int) for s in starts):
        return starts  # PyTorch's loops: Keras' fast path for ints
    return [ops.cast(s, "int32") for s in starts]
