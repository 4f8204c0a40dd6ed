"""Every derivative users take, on this backend, against central differences.

Each subject is a function of one float64 vector (logits, and a tensor
temperature where it has one; queries, keys and values for attention),
with masks, a fully masked slice and infinite logits. Every transform the
backend offers (tests/support/backends.py: reverse and forward mode, Jacobians,
Hessians, vmap, torch.func, compiled) must give its central differences,
and exactly 0 for a derivative in an infinite input.
"""

import functools

import keras
import numpy as np
import pytest
from support.backends import BACKEND
from support.backends import FIRST_ORDER
from support.backends import REVERSE_MODE
from support.backends import SECOND_ORDER
from support.backends import compiled
from support.backends import traced
from support.blocks import SMALL_BLOCKS
from support.references import numerical_jacobian
from support.references import to_numpy

from keras_softmax import StableMultiHeadAttention
from keras_softmax import StableSoftmax
from keras_softmax import dot_product_attention
from keras_softmax import linear_cross_entropy
from keras_softmax import stable_log_softmax
from keras_softmax import stable_softmax

ops = keras.ops

# Row 0 ordinary, row 1 with a kept -inf logit (and, under MASK, a masked
# +inf, which is ignored), row 2 fully masked under MASK.
LOGITS = np.array(
    [[0.3, -1.2, 2.0, 0.7], [1.5, -np.inf, 0.2, -0.4], [0.9, 0.1, -2.2, 1.3]]
)
WITH_MASKED_INF = np.where(np.arange(4) == 3, [[0.7], [np.inf], [1.3]], LOGITS)
MASK = np.array([[1, 1, 0, 1], [1, 1, 1, 0], [0, 0, 0, 0]], bool)
ROW_TEMPERATURES = np.array([[0.7], [1.3], [2.0]])


def _pieces(v, shapes):
    """Splits the vector `v` into tensors of `shapes`."""
    pieces, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        pieces.append(ops.reshape(v[start : start + size], shape))
        start += size
    return pieces


class Subject:
    """`fn` of the tensors of `shapes`, as a function of one flat vector."""

    def __init__(self, fn, *values):
        self.fn = fn
        self.shapes = [np.shape(value) for value in values]
        self.v0 = np.concatenate([np.ravel(value) for value in values])

    def __call__(self, v):
        return ops.reshape(self.fn(*_pieces(v, self.shapes)), (-1,))


def _softmax_subjects(fn, name):
    return {
        f"{name}": Subject(lambda x: fn(x), LOGITS),
        f"{name}, masked, T = 0.7": Subject(
            lambda x: fn(x, mask=MASK, temperature=0.7), WITH_MASKED_INF
        ),
        f"{name}, masked, tensor T per row": Subject(
            lambda x, t: fn(x, mask=MASK, temperature=t), LOGITS, ROW_TEMPERATURES
        ),
        f"{name}, joint axes, tensor T": Subject(
            lambda x, t: fn(x, axis=(0, 1), temperature=t), LOGITS, np.array(1.6)
        ),
    }


def _attention_inputs():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(1, 2, 1, 2))
    k = rng.normal(size=(1, 3, 1, 2))
    v = rng.normal(size=(1, 3, 1, 2))
    # The second query keeps no key.
    mask = np.array([[[[True, False, True], [False, False, False]]]])
    return q, k, v, mask


def _attention_subjects():
    q, k, v, mask = _attention_inputs()
    return {
        # T = 1 takes the backend's fused attention, T = 0.5 stable_softmax.
        f"dot_product_attention, T = {t}": Subject(
            lambda q, k, v, t=t: dot_product_attention(
                q, k, v, mask=mask, temperature=t
            ),
            q,
            k,
            v,
        )
        for t in (1.0, 0.5)
    } | {
        "dot_product_attention, tensor T": Subject(
            lambda q, k, v, t: dot_product_attention(q, k, v, mask=mask, temperature=t),
            q,
            k,
            v,
            np.array(0.8),
        )
    }


def _layer_subjects():
    softmax_layer = StableSoftmax(
        temperature=1.5, trainable_temperature=True, dtype="float64"
    )
    attention_layer = StableMultiHeadAttention(
        num_heads=1,
        key_dim=2,
        temperature=0.5,
        dtype="float64",
        kernel_initializer=keras.initializers.GlorotNormal(seed=1),
        bias_initializer=keras.initializers.RandomNormal(seed=2),
    )
    query = np.random.default_rng(4).normal(size=(1, 2, 2))
    value = np.random.default_rng(5).normal(size=(1, 3, 2))
    attention_mask = np.array([[[1, 0, 1], [0, 0, 0]]], bool)
    attention_layer(query, value, attention_mask=attention_mask)  # builds it
    return {
        "StableSoftmax layer, learned T": Subject(
            lambda x: softmax_layer(x, mask=MASK), LOGITS
        ),
        "StableMultiHeadAttention layer": Subject(
            lambda q, v: attention_layer(q, v, attention_mask=attention_mask),
            query,
            value,
        ),
    }


def _subjects():
    return (
        _softmax_subjects(stable_softmax, "softmax")
        | _softmax_subjects(stable_log_softmax, "log_softmax")
        | _attention_subjects()
        | _layer_subjects()
    )


SUBJECTS = _subjects()


def _cross_entropy_subjects():
    rng = np.random.default_rng(6)
    hidden = rng.normal(size=(5, 3))
    kernel = rng.normal(size=(3, 7))
    bias = rng.normal(size=(7,))
    labels = np.array([1, 6, 0, 3, 3])
    options = dict(
        logit_soft_cap=4.0,
        label_smoothing=0.1,
        z_loss=1e-2,
        ignore_class=0,
        chunk_size=2,  # three chunks, the last padded
    )
    return {
        "linear_cross_entropy, per position": Subject(
            lambda h, w, b, t: linear_cross_entropy(
                labels, h, w, b, temperature=t, reduction=None, **options
            ),
            hidden,
            kernel,
            bias,
            np.array(0.8),
        ),
        # Its gradients computed in the forward pass where a derivative may
        # be taken, by the reverse pass otherwise.
        "linear_cross_entropy, mean": Subject(
            lambda h, w, b, t: ops.reshape(
                linear_cross_entropy(labels, h, w, b, temperature=t, **options),
                (1,),
            ),
            hidden,
            kernel,
            bias,
            np.array(1.3),
        ),
        # A tied `[V, D]` table, and the sample weights' own gradient
        # through Keras' weighted mean.
        "linear_cross_entropy, tied, mean_with_sample_weight": Subject(
            lambda h, table, b, weights: ops.reshape(
                linear_cross_entropy(
                    labels,
                    h,
                    table,
                    b,
                    sample_weight=weights,
                    transpose_kernel=True,
                    reduction="mean_with_sample_weight",
                    **options,
                ),
                (1,),
            ),  # fmt: skip
            hidden,
            kernel.T.copy(),
            bias,
            np.array([0.5, 1.0, 0.0, 2.0, 1.5]),
        ),
    }


def _blocks_subjects():
    """Attention over blocks of 2 (FlashAttention's custom derivative)."""
    q, k, v, mask = _attention_inputs()
    bias = np.array([[[[0.4, -0.3, 0.1], [0.2, 0.5, -0.6]]]])

    def attend(q, k, v, t):
        return dot_product_attention(
            q,
            k,
            v,
            bias=bias,
            mask=mask,
            is_causal=True,
            temperature=t,
            attn_logits_soft_cap=2.0,
            **SMALL_BLOCKS,
        )

    return {
        "dot_product_attention, blocks, tensor T, soft cap": Subject(
            attend, q, k, v, np.array(0.8)
        )
    }


# Kernels whose custom derivative is reverse mode only (forward mode is
# optional for them).
REVERSE_SUBJECTS = _cross_entropy_subjects() | _blocks_subjects()
SUBJECTS |= REVERSE_SUBJECTS


@functools.cache
def _reference_jacobian(name):
    """Central differences of SUBJECTS[name], and which outputs are finite.

    The columns of infinite inputs are 0: they are held as they are.
    """
    subject = SUBJECTS[name]
    x = np.where(np.isfinite(subject.v0), subject.v0, 0.0)
    jacobian = numerical_jacobian(lambda v: _evaluate(subject, v), x)
    return jacobian, np.isfinite(_evaluate(subject, subject.v0))


def _evaluate(subject, v):
    """`subject` at `v` as NumPy, its infinite inputs held as they are."""
    v = np.where(np.isfinite(subject.v0), v, subject.v0)
    return to_numpy(_fast(subject)(ops.convert_to_tensor(v)))


@functools.cache
def _fast(subject):
    """`subject` traced (TensorFlow) or jitted (JAX) for the many evaluations
    that central differences take; PyTorch runs it eagerly, fast already."""
    return compiled(subject) if BACKEND == "jax" else traced(subject)


def _loss(name):
    """sum(w * outputs) over the finite outputs, w = 1, 2, ...: a scalar."""
    subject = SUBJECTS[name]
    _, finite_out = _reference_jacobian(name)
    weights = np.where(finite_out, np.arange(1.0, finite_out.size + 1), 0.0)

    def loss(v):
        out = subject(v)
        return ops.sum(ops.where(finite_out, out, 0.0) * ops.convert_to_tensor(weights))

    return loss, weights


@functools.cache
def _reference_hessian(name, step=1e-4):
    """Second central differences of `_loss(name)`; 0 in infinite inputs."""
    subject = SUBJECTS[name]
    _, weights = _loss(name)
    _, finite_out = _reference_jacobian(name)
    finite_in = np.isfinite(subject.v0)

    def loss(v):
        out = _evaluate(subject, v)
        return float(np.sum(np.where(finite_out, out, 0.0) * weights))

    x = np.where(finite_in, subject.v0, 0.0)
    n = x.size
    h = np.zeros((n, n))
    for i in np.flatnonzero(finite_in):
        for j in np.flatnonzero(finite_in):
            if j < i:
                continue
            ei, ej = np.eye(n)[i] * step, np.eye(n)[j] * step
            h[i, j] = h[j, i] = (
                loss(x + ei + ej)
                - loss(x + ei - ej)
                - loss(x - ei + ej)
                + loss(x - ei - ej)
            ) / (4 * step**2)
    return h


@pytest.mark.parametrize(
    ("name", "transform"),
    [
        (name, transform)
        for name in SUBJECTS
        for transform in FIRST_ORDER
        if name not in REVERSE_SUBJECTS or transform in REVERSE_MODE
    ],
    ids=lambda value: value,
)
def test_first_derivatives_equal_central_differences(name, transform):
    subject = SUBJECTS[name]
    expected, finite_out = _reference_jacobian(name)
    actual = to_numpy(FIRST_ORDER[transform](subject, subject.v0))
    actual = actual.reshape(expected.shape)[finite_out]
    assert np.all(np.isfinite(actual)), actual
    np.testing.assert_allclose(actual, expected[finite_out], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("transform", SECOND_ORDER, ids=str)
@pytest.mark.parametrize(
    "name", [n for n in SUBJECTS if n not in REVERSE_SUBJECTS], ids=str
)
def test_second_derivatives_equal_central_differences(name, transform):
    loss, _ = _loss(name)
    actual = to_numpy(SECOND_ORDER[transform](loss, SUBJECTS[name].v0))
    assert np.all(np.isfinite(actual)), actual
    np.testing.assert_allclose(actual, _reference_hessian(name), atol=1e-5, rtol=1e-5)


# JAX's own softmax tests (tests/nn_test.py, which the wheel does not ship),
# ported to our names: `where=` is our `mask=`. `check_grads` checks forward
# and reverse mode, to the order given, against finite differences.
needs_jax = pytest.mark.skipif(BACKEND != "jax", reason="JAX's tests use JAX's API")


@needs_jax
@pytest.mark.parametrize("fn", [stable_softmax, stable_log_softmax])
def test_jax_softmax_grad_case_passes_in_both_modes(fn):
    import jax.numpy as jnp
    from jax.test_util import check_grads

    x = jnp.array([5.5, 1.3, -4.2, 0.9])
    check_grads(fn, (x,), order=2, atol=3e-3)


@needs_jax
@pytest.mark.parametrize("fn", [stable_softmax, stable_log_softmax])
def test_jax_softmax_where_mask_case_passes_in_both_modes(fn):
    import jax.numpy as jnp
    from jax.test_util import check_grads

    x = jnp.array([5.5, 1.3, -4.2, 0.9])
    m = jnp.array([True, False, True, True])
    out = fn(x, mask=m)
    np.testing.assert_allclose(out[m], fn(x[m]), rtol=1e-6)
    probs = out if fn is stable_softmax else jnp.exp(out)
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-6)
    # JAX runs this part for its softmax only, since its log-softmax has no
    # derivative rule that passes; ours passes it too.
    kept = jnp.array([0, 2, 3])
    check_grads(lambda x: jnp.take(fn(x, mask=m), kept), (x,), order=2)


@needs_jax
@pytest.mark.parametrize("fn", [stable_softmax, stable_log_softmax])
def test_jax_softmax_where_grad_case_gives_zero_beside_a_huge_masked_logit(fn):
    import jax
    import jax.numpy as jnp

    x = jnp.array([36.0, 10000.0])
    mask = x < 1000
    gradient = jax.grad(lambda x: fn(x, mask=mask)[0])(x)
    np.testing.assert_array_equal(gradient, jnp.zeros_like(x))


def _arrivals():
    """Ways a value reaches us here: name -> reverse gradient of `loss(*values)`."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def through(make, read):
            def gradient(loss, values):
                arrived = [make(v) for v in values]
                with tf.GradientTape() as tape:
                    result = loss(*arrived)
                return [
                    g.numpy() for g in tape.gradient(result, [read(a) for a in arrived])
                ]

            return gradient

        return {
            "tf.Variable": through(tf.Variable, lambda a: a),
            "keras.Variable": through(keras.Variable, lambda a: a.value),
        }
    if BACKEND == "jax":
        import jax

        def array(loss, values):
            return jax.grad(loss, argnums=(0, 1))(*map(jax.numpy.asarray, values))

        def variable(loss, values):
            # How Keras' JAX trainer differentiates its variables.
            variables = [keras.Variable(v) for v in values]

            def stateless(*traced):
                with keras.StatelessScope(
                    state_mapping=list(zip(variables, traced, strict=True))
                ):
                    return loss(*variables)

            return jax.grad(stateless, argnums=(0, 1))(*[v.value for v in variables])

        return {"JAX array": array, "keras.Variable": variable}
    import torch

    def through(make, read):
        def gradient(loss, values):
            arrived = [make(v) for v in values]
            loss(*arrived).backward()
            return [read(a).grad.numpy() for a in arrived]

        return gradient

    return {
        "torch.nn.Parameter": through(
            lambda v: torch.nn.Parameter(torch.tensor(v)), lambda a: a
        ),
        "keras.Variable": through(keras.Variable, lambda a: a.value),
    }


ARRIVALS = _arrivals()


@pytest.mark.parametrize("arrival", ARRIVALS, ids=str)
def test_derivatives_reach_logits_and_temperature_however_they_arrive(arrival):
    # The case: a variable fed directly, with a mask, under a tape.
    name = "softmax, masked, tensor T per row"
    jacobian, finite_out = _reference_jacobian(name)
    weights = np.arange(1.0, finite_out.size + 1)
    expected = weights @ jacobian

    def loss(x, t):
        out = stable_softmax(x, mask=MASK, temperature=t)
        return ops.sum(ops.reshape(out, (-1,)) * ops.convert_to_tensor(weights))

    x_grad, t_grad = ARRIVALS[arrival](loss, [LOGITS, ROW_TEMPERATURES])
    actual = np.concatenate([np.ravel(x_grad), np.ravel(t_grad)])
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual, expected, atol=1e-7, rtol=1e-6)
