"""The float64 NumPy references that every numerical claim is tested against:
the softmax and log-softmax, numerical Jacobians, and attention with the
float32 error it allows."""

import keras
import numpy as np

FLOAT32_EPS = 2.0**-23
# Below this the fused kernels may flush a probability to zero.
TINY_PROBABILITY = 1e-30


def to_numpy(x):
    """Any backend's tensor (one that needs a gradient too) as a NumPy array."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np.asarray(x)
    return keras.ops.convert_to_numpy(x)


def softmax(x, axis=-1, mask=None, temperature=1.0):
    """exp(z - max z) / sum(exp(z - max z)) with z = x / temperature, in float64."""
    shifted, dead, total = _shifted(x, axis, mask, temperature)
    return np.where(dead, 0.0, np.exp(shifted) / total)


def log_softmax(x, axis=-1, mask=None, temperature=1.0):
    """The float64 log-softmax, computed in log space."""
    shifted, dead, total = _shifted(x, axis, mask, temperature)
    return np.where(dead, -np.inf, shifted - np.log(total))


def _shifted(x, axis, mask, temperature):
    """`(z - max z, slices with nothing kept, sum of exp)`; masked z is -inf."""
    z = np.asarray(x, dtype=np.float64) / temperature
    keep = np.ones(z.shape, bool) if mask is None else np.broadcast_to(mask, z.shape)
    z = np.where(keep, z, -np.inf)
    top = np.max(z, axis=axis, keepdims=True)
    dead = top == -np.inf
    shifted = np.where(dead, -np.inf, z - np.where(dead, 0.0, top))
    total = np.sum(np.exp(shifted), axis=axis, keepdims=True)
    # A slice with nothing kept sums to 0; 1 keeps its division harmless.
    return shifted, dead, np.where(dead, 1.0, total)


def numerical_jacobian(fn, x, step=1e-6):
    """Central differences of `fn` at `x`: shape (fn(x).size, x.size)."""
    x = np.asarray(x, np.float64)
    columns = []
    for i in range(x.size):
        delta = np.zeros_like(x)
        delta.flat[i] = step
        columns.append(
            (to_numpy(fn(x + delta)) - to_numpy(fn(x - delta))).ravel() / (2 * step)
        )
    return np.stack(columns, axis=1)


def assert_close_to_reference(actual, expected, axis=-1, eps=FLOAT32_EPS, rtol=1e-6):
    """Each probability p within p * (rtol + eps * |ln(p / max p)|).

    The second term is the rounding of the exponent z - max z in the
    compute dtype, which any implementation must round before exp: it is
    what the float32 claim "1e-6 relative" means for very small p.
    Probabilities below TINY_PROBABILITY need only be within it.
    """
    actual = to_numpy(actual).astype(np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    top = np.max(expected, axis=axis, keepdims=True) if expected.size else 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.abs(np.log(expected / top))
    allowed = expected * (rtol + eps * log_ratio) + TINY_PROBABILITY
    allowed = np.where(expected > 0, allowed, TINY_PROBABILITY)
    error = np.abs(actual - expected)
    worst = (
        np.unravel_index(np.argmax(error - allowed), error.shape) if error.size else ()
    )
    assert np.all(error <= allowed), (
        f"error {error[worst]:.3g} > allowed {allowed[worst]:.3g} at {worst}: "
        f"actual {actual[worst]!r}, reference {expected[worst]!r}"
    )


# Attention.


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
