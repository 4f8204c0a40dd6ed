"""The float64 NumPy reference for attention, the float32 error it allows,
and blocks small enough that short test sequences span several."""

import contextlib
from unittest import mock

import numpy as np
from reference import FLOAT32_EPS
from reference import softmax

_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    scale=None,
    is_causal=False,
    temperature=1.0,
    attn_logits_soft_cap=None,
):
    """`(outputs, weights)` in float64; a query with no key kept gets 0."""
    q, k, v = (np.asarray(t, np.float64) for t in (query, key, value))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    scores = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        scores = scores + np.asarray(bias, np.float64)
    if attn_logits_soft_cap is not None:
        scores = attn_logits_soft_cap * np.tanh(scores / attn_logits_soft_cap)
    keep = np.ones(scores.shape, bool)
    if mask is not None:
        keep = keep & np.asarray(mask, bool)
    if is_causal:
        t, s = scores.shape[-2:]
        keep = keep & np.tril(np.ones((t, s), bool))
    weights = softmax(scores, axis=-1, mask=keep, temperature=temperature)
    return np.einsum("bnts,bsnh->btnh", weights, v), weights


def live_queries(mask, is_causal, shape):
    """`(B, T, N)`: whether each query keeps at least one key."""
    b, t, n, s = shape
    keep = np.ones((b, n, t, s), bool)
    if mask is not None:
        keep = keep & np.asarray(mask, bool)
    if is_causal:
        keep = keep & np.tril(np.ones((t, s), bool))
    return keep.any(-1).transpose(0, 2, 1)


def output_tolerance(query, key, value, bias=None, scale=None, temperature=1.0):
    """The float32 error allowed in each output, of shape `(B, T, N, 1)`.

    A score rounds in its dot product (H terms), its scaling, its bias and
    its temperature: at most (H + 4) eps times the sum of the magnitudes it
    adds up. A score error of e moves each weight p by at most
    p * (e + max e), so the output by 2 e max |v|; the softmax and the
    weighted sum of S values round a further (2 S + 8) eps max |v|, and
    CPU kernels may flush each of its S products to 0 below float32's
    smallest normal number.
    """
    q, k, v = (np.abs(np.asarray(t, np.float64)) for t in (query, key, value))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    head_size, length = q.shape[-1], k.shape[1]
    if scale is None:
        scale = 1.0 / np.sqrt(head_size)
    magnitude = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        magnitude = magnitude + np.abs(np.asarray(bias, np.float64))
    score_error = (head_size + 4) * FLOAT32_EPS * magnitude.max(-1) / temperature
    largest_value = v.max(axis=(1, 3))[:, None, :]  # (B, 1, N)
    error = largest_value * (
        2 * score_error.transpose(0, 2, 1) + (2 * length + 8) * FLOAT32_EPS
    )
    return error[..., None] + length * _FLOAT32_TINY


@contextlib.contextmanager
def small_blocks(side=2, large_scores=None):
    """Blocks of `side` queries and keys; chosen from `large_scores` scores
    if given (else at the library's size, which no test reaches)."""
    from keras_softmax import _blockwise_attention

    sizes = dict(_BLOCK_ELEMENTS=side * side, _MIN_BLOCK=side, _MAX_BLOCK=side)
    if large_scores is not None:
        sizes["LARGE_SCORES"] = large_scores
    with mock.patch.multiple(_blockwise_attention, **sizes):
        yield
