"""Derivatives and compilation on whichever Keras backend the tests run on.

Keras has no backend-agnostic gradient API, so each backend's own is used:
`jacobian` and `gradient` for the everyday checks, and `FIRST_ORDER` and
`SECOND_ORDER`, every derivative transform the backend offers, for
tests/test_derivatives.py.
"""

import functools

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()


def _platform() -> str:
    """Where the backend puts new tensors: "cpu", "gpu" or "tpu"."""
    if BACKEND == "jax":
        import jax

        return jax.devices()[0].platform
    device = keras.ops.zeros(()).device
    if BACKEND == "torch":
        return {"cuda": "gpu"}.get(device.type, device.type)
    return "gpu" if "GPU" in str(device) else "cpu"


# For the few results that depend on the device (Keras' answer for a fully
# masked query, the path taken): CI runs on CPUs.
PLATFORM = _platform()
# SavedModel, tf2onnx and the LiteRT converter all start from a TensorFlow
# graph, so Keras exports from the TensorFlow backend; serving the exported
# files needs no Keras backend at all.
exports = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="Keras exports these from the TensorFlow backend"
)
# For what no backend changes (a command line, a file's text): TensorFlow's
# pass runs it, the others skip it, which keeps CI's time down.
once = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="backend-independent; run once"
)


def jacobian(fn, x):
    """d fn(x) / dx as a NumPy array of shape (fn(x).size, x.size)."""
    x = np.asarray(x, np.float64)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        variable = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(variable)
            out = fn(variable)
        result = tape.jacobian(out, variable)
    elif BACKEND == "jax":
        import jax

        result = jax.jacrev(fn)(x)
    else:
        import torch

        result = torch.autograd.functional.jacobian(fn, torch.tensor(x))
    return keras.ops.convert_to_numpy(result).reshape(-1, x.size)


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

    if BACKEND == "tensorflow":
        # A tape's gradient: its `jacobian` would vectorise the loops of a
        # custom derivative (attention's blocks), which takes TensorFlow long.
        import tensorflow as tf

        variable = tf.constant(np.asarray(x, np.float64))
        with tf.GradientTape() as tape:
            tape.watch(variable)
            value = loss(variable)
        gradient = tape.gradient(value, variable)
        return keras.ops.convert_to_numpy(gradient).reshape(np.shape(x))
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


# Every derivative transform of this backend, for a function `f` of one
# float64 vector. A first-order transform returns f's Jacobian at `v`,
# (outputs, inputs); a second-order one the Hessian of a scalar `f`,
# (inputs, inputs). Transforms that give one product at a time (a
# Jacobian-vector or vector-Jacobian product) are applied to each basis
# vector, so that every entry is checked.
def _basis(n):
    return np.eye(n)


def _outputs(f, x):
    """How many outputs `f` has at `x`."""
    return int(np.prod(tuple(f(x).shape)))


def _tensorflow_transforms():
    import tensorflow as tf

    def tape_rows(f, v):
        x = tf.constant(v)
        rows = []
        for u in _basis(_outputs(f, x)):
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = f(x)
            rows.append(tape.gradient(out, x, output_gradients=tf.constant(u)))
        return np.stack([r.numpy() for r in rows])

    def tape_jacobian(f, v):
        x = tf.constant(v)
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = f(x)
        return tape.jacobian(out, x).numpy()

    def forward_columns(f, v):
        x = tf.constant(v)
        columns = []
        for e in _basis(v.size):
            with tf.autodiff.ForwardAccumulator(x, tf.constant(e)) as acc:
                out = f(x)
            columns.append(acc.jvp(out).numpy())
        return np.stack(columns, axis=1)

    def graph(transform, **options):
        # `f` traced (and compiled, with XLA), its derivatives taken through
        # the traced function, as they are of a model's traced call.
        def run(f, v):
            return transform(tf.function(f, **options), v)

        return run

    def nested_tapes(f, v, pfor=True):
        x = tf.constant(v)
        # (Without pfor, TensorFlow loops, which needs a persistent tape.)
        with tf.GradientTape(persistent=not pfor) as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                out = f(x)
            g = inner.gradient(out, x)
        return outer.jacobian(g, x, experimental_use_pfor=pfor).numpy()

    def forward_over_reverse(f, v):
        x = tf.constant(v)
        columns = []
        for e in _basis(v.size):
            with tf.autodiff.ForwardAccumulator(x, tf.constant(e)) as acc:
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    out = f(x)
                g = tape.gradient(out, x)
            columns.append(acc.jvp(g).numpy())
        return np.stack(columns, axis=1)

    first = {
        "GradientTape.gradient": tape_rows,
        "GradientTape.jacobian": tape_jacobian,
        "ForwardAccumulator": forward_columns,
        "tf.function GradientTape.jacobian": graph(tape_jacobian),
        "tf.function ForwardAccumulator": graph(forward_columns),
        "XLA GradientTape.jacobian": graph(tape_jacobian, jit_compile=True),
        "XLA ForwardAccumulator": graph(forward_columns, jit_compile=True),
    }
    second = {
        "nested GradientTape": nested_tapes,
        "ForwardAccumulator over GradientTape": forward_over_reverse,
        # TensorFlow's pfor cannot vectorise the second derivative of the
        # tf.cond that the fused path takes in a graph (README: derivatives).
        "tf.function nested GradientTape, no pfor": graph(
            functools.partial(nested_tapes, pfor=False)
        ),
        "XLA nested GradientTape": graph(nested_tapes, jit_compile=True),
    }
    return first, second


def _jax_transforms():
    import jax
    import jax.numpy as jnp

    def rows_by_vmap_grad(f, v):
        def row(u):
            return jax.grad(lambda x: jnp.vdot(u, f(x)))(v)

        return jax.vmap(row)(jnp.asarray(_basis(_outputs(f, v))))

    def columns_by_vmap_jvp(f, v):
        def column(e):
            return jax.jvp(f, (v,), (e,))[1]

        return jax.vmap(column, out_axes=1)(jnp.asarray(_basis(v.size)))

    def rows_by_vjp(f, v):
        out, pullback = jax.vjp(f, v)
        return jnp.stack([pullback(u)[0] for u in _basis(out.size)])

    first = {
        "jax.jacrev": lambda f, v: jax.jacrev(f)(v),
        "jax.jacfwd": lambda f, v: jax.jacfwd(f)(v),
        "jax.vmap(jax.grad)": rows_by_vmap_grad,
        "jax.vmap(jax.jvp)": columns_by_vmap_jvp,
        "jax.vjp": rows_by_vjp,
        "jax.jit(jax.jacfwd)": lambda f, v: jax.jit(jax.jacfwd(f))(v),
    }
    second = {
        "jax.hessian": lambda f, v: jax.hessian(f)(v),
        "jax.jacrev(jax.grad)": lambda f, v: jax.jacrev(jax.grad(f))(v),
        "jax.jacfwd(jax.grad)": lambda f, v: jax.jacfwd(jax.grad(f))(v),
        "jax.jit(jax.hessian)": lambda f, v: jax.jit(jax.hessian(f))(v),
    }
    return first, second


def _torch_transforms():
    import torch
    import torch.autograd.forward_ad as fwAD
    from torch import func

    def backward_rows(f, v, compile=False):
        if compile:
            compiled_fn = compiled(f)
        rows = []
        for u in _basis(_outputs(f, torch.tensor(v))):
            x = torch.tensor(v, requires_grad=True)
            out = (compiled_fn if compile else f)(x)
            (out * torch.tensor(u)).sum().backward()
            rows.append(x.grad.numpy())
        return np.stack(rows)

    def forward_ad_columns(f, v):
        columns = []
        for e in _basis(v.size):
            with fwAD.dual_level():
                x = fwAD.make_dual(torch.tensor(v), torch.tensor(e))
                columns.append(fwAD.unpack_dual(f(x)).tangent.detach().numpy())
        return np.stack(columns, axis=1)

    def functional(name, **options):
        def run(f, v):
            return getattr(torch.autograd.functional, name)(
                f, torch.tensor(v), **options
            )

        return run

    def vmap_grad_rows(f, v):
        def row(u):
            return func.grad(lambda x: (u * f(x)).sum())(torch.tensor(v))

        basis = torch.tensor(_basis(_outputs(f, torch.tensor(v))))
        return func.vmap(row)(basis)

    def double_backward(f, v):
        x = torch.tensor(v, requires_grad=True)
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)
        return np.stack(
            [torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(v.size)]
        )

    def on_tensor(transform):
        return lambda f, v: transform(f)(torch.tensor(v))

    first = {
        "backward": backward_rows,
        "autograd.functional.jacobian": functional("jacobian"),
        "autograd.functional.jacobian, forward mode": functional(
            "jacobian", vectorize=True, strategy="forward-mode"
        ),
        "forward_ad": forward_ad_columns,
        "torch.func.jacrev": on_tensor(func.jacrev),
        "torch.func.jacfwd": on_tensor(func.jacfwd),
        "torch.func.vmap(torch.func.grad)": vmap_grad_rows,
        "torch.compile backward": lambda f, v: backward_rows(f, v, compile=True),
    }
    second = {
        "double backward": double_backward,
        "autograd.functional.hessian": functional("hessian"),
        "torch.func.hessian": on_tensor(func.hessian),
        "torch.func.jacrev(torch.func.jacrev)": on_tensor(
            lambda f: func.jacrev(func.jacrev(f))
        ),
    }
    return first, second


# The first-order transforms that run in reverse mode only: all that a
# custom reverse rule (tf.custom_gradient, jax.custom_vjp, an
# autograd.Function) supports.
REVERSE_MODE = {
    "GradientTape.gradient",
    "GradientTape.jacobian",
    "tf.function GradientTape.jacobian",
    "XLA GradientTape.jacobian",
    "jax.jacrev",
    "jax.vmap(jax.grad)",
    "jax.vjp",
    "backward",
    "autograd.functional.jacobian",
    "torch.func.jacrev",
    "torch.func.vmap(torch.func.grad)",
    "torch.compile backward",
}

FIRST_ORDER, SECOND_ORDER = {
    "tensorflow": _tensorflow_transforms,
    "jax": _jax_transforms,
    "torch": _torch_transforms,
}[BACKEND]()
