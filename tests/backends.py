"""Gradients and compilation on whichever Keras backend the tests run on.

Keras has no backend-agnostic gradient API, so each backend's own is used:
`tf.GradientTape`, `jax.jacrev` and `torch.autograd.functional.jacobian`.
"""

import keras
import numpy as np

BACKEND = keras.backend.backend()


def jacobian(fn, x):
    """d fn(x) / dx as a NumPy array of shape (fn(x).size, x.size)."""
    x = np.asarray(x, np.float64)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        variable = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(variable)
            out = fn(variable)
        result = tape.jacobian(out, variable).numpy()
    elif BACKEND == "jax":
        import jax

        result = np.asarray(jax.jacrev(fn)(x))
    else:
        import torch

        result = torch.autograd.functional.jacobian(fn, torch.tensor(x)).numpy()
    return result.reshape(-1, x.size)


def gradient(fn, x):
    """d sum(fn(x) * w) / dx for fixed weights w = 1, 2, ..., over finite outputs."""

    def loss(v):
        out = fn(v)
        weights = keras.ops.reshape(
            keras.ops.arange(1, int(np.prod(out.shape)) + 1, dtype=out.dtype),
            out.shape,
        )
        finite = keras.ops.isfinite(out)
        return keras.ops.sum(keras.ops.where(finite, out * weights, 0.0))

    return jacobian(lambda v: keras.ops.reshape(loss(v), (1,)), x).reshape(np.shape(x))


def compiled(fn):
    """`fn` compiled the way its backend compiles: XLA, jax.jit, torch.compile."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    import torch

    # The Jacobians of these tests run backward several times over one
    # graph, which compiled backwards that donate their buffers refuse.
    torch._functorch.config.donated_buffer = False
    return torch.compile(fn)


def traced(fn):
    """`fn` traced into a graph without compiling (TensorFlow only; else as is)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    return fn
