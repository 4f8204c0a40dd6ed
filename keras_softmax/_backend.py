"""The thin backend edges of the math: what `keras.ops` cannot tell.

Everything in `softmax.py` and `_checks.py` that depends on the backend
asks here. (The demo, serving and the tests name backends for their own
reasons: exports start from TensorFlow, for one.)
"""

import functools

import keras
import numpy as np

from keras_softmax import _keras_internals


def takes_fused_path(x) -> bool:
    """Whether the backend's own fused softmax kernel is worth a branch here.

    True where ops run as separate kernels: TensorFlow eagerly or in a
    `tf.function` without XLA (which is how Keras' `fit` and `predict` run
    on a CPU, and how `model.export` traces), and PyTorch eagerly. There
    the fused kernel does in one pass what the exact formula does in
    several, and a cheap check picks the exact path for the rare slice that
    needs it.

    False where a compiler fuses the exact formula into as few passes as a
    softmax anyway, and a branch would only cost: XLA (`jit_compile=True`),
    JAX (every JAX call is compiled) and `torch.compile`; and under
    `torch.func`'s transforms, whose tensors cannot be read to branch on.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return not _keras_internals.in_xla_context()
    if backend == "torch":
        return is_concrete(x)
    return False


def fused_attention_serves(dtype: str, key_size, value_size) -> bool:
    """Whether `keras.ops.dot_product_attention` serves these inputs here.

    On JAX and PyTorch it returns float32 for float64 inputs (Keras 3.15;
    JAX 0.10's own attention also takes the softmax in float32), so float64
    outputs and derivatives would be only float32-accurate; and on JAX it
    fails on values whose head size differs from the keys'.
    """
    backend = keras.backend.backend()
    if backend in ("jax", "torch") and dtype == "float64":
        return False
    return not (backend == "jax" and key_size != value_size)


def may_have_flash_kernel(tensor) -> bool:
    """Whether Keras may have a fused flash-attention kernel for `tensor`.

    Keras 3.15 has none on TensorFlow, nor on a CPU: asking for one there
    only fails, after the masks it would take are built.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.devices()[0].platform != "cpu"
    if backend == "torch":
        return tensor.device.type != "cpu"
    return False


def masked_attention(query, key, value, keep, scale: float, is_causal: bool):
    """The backend's own attention with a bool mask, where it gives 0 for a
    query with no key kept; None elsewhere.

    PyTorch's `scaled_dot_product_attention` on a CPU does (2.13), and its
    flash kernel's memory grows linearly in the sequence. Not in float64
    (where derivatives are checked: that kernel has no second derivative),
    not under `torch.func` or forward mode (it has no rules for them), and
    only for eager calls: a traced one would freeze the choice.
    """
    if keras.backend.backend() != "torch":
        return None
    import torch

    if query.dtype == torch.float64:
        return None
    tensors = (query, key, value) + (() if keep is None else (keep,))
    if any(t.device.type != "cpu" or not is_concrete(t) for t in tensors):
        return None
    if _keras_internals.torch_forward_mode_active():
        return None
    if keep is not None and is_causal:
        rows = torch.arange(query.shape[1])[:, None]
        keep = keep & (rows >= torch.arange(key.shape[1])[None, :])
    outputs = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (query, key, value)),
        attn_mask=keep,
        is_causal=is_causal and keep is None,
        scale=scale,
    )
    return outputs.transpose(1, 2)


def tanh(x):
    """`tanh(x)`, exact to a few ulps in `x`'s dtype.

    Through `expm1`: Keras' `tanh` on JAX (3.15) computes float64 in float32.
    """
    e = keras.ops.expm1(-2.0 * keras.ops.abs(x))
    return keras.ops.sign(x) * (-e / (2.0 + e))


def losses_read_logits() -> bool:
    """Whether Keras' cross-entropy losses read `_keras_logits` here.

    Only the TensorFlow backend does; elsewhere attaching them would only
    cost work (and `torch.compile` a graph break).
    """
    return keras.backend.backend() == "tensorflow"


def is_concrete(tensor) -> bool:
    """Whether `tensor`'s values can be read now, without tracing them."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly() or not tf.is_tensor(tensor)
    if backend == "jax":
        import jax

        return not isinstance(tensor, jax.core.Tracer)
    if backend == "torch":
        import torch

        # A traced value (torch.jit.trace, the ONNX exporter) read now would
        # be frozen into the trace.
        return not (
            torch.compiler.is_compiling()
            or torch.jit.is_tracing()
            or torch._C._functorch.is_functorch_wrapped_tensor(tensor)
        )
    return True


def static_shape(x) -> tuple:
    """`x`'s shape as Python ints, with None for sizes not known now.

    PyTorch's tracer (`torch.jit.trace`, the ONNX exporter) traces sizes as
    tensors, so while it runs every size is None: branching on one would
    freeze the example's size into the trace.
    """
    if keras.backend.backend() == "torch":
        import torch

        if torch.jit.is_tracing():
            return (None,) * len(x.shape)
    return tuple(x.shape)


def reduce_max(x, axis=None, keepdims=False):
    """`keras.ops.amax`, without what it costs on two backends (Keras 3.15).

    On TensorFlow, eager calls of Keras' maximum run an extra op to refuse
    empty tensors (more than the softmax of a small tensor costs; the
    softmax returns early for those); on PyTorch it breaks `torch.compile`'s
    graph.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.reduce_max(x, axis=axis, keepdims=keepdims)
    if backend == "torch":
        import torch

        if axis is None:
            return torch.amax(x)
        return torch.amax(x, dim=axis, keepdim=keepdims)
    return keras.ops.amax(x, axis=axis, keepdims=keepdims)


def matmul(a, b):
    """`keras.ops.matmul`, in float64 where the inputs are.

    Keras' PyTorch backend (3.15) computes the product of two float64
    tensors in float32 (its `result_type` of two torch float64 dtypes is
    float32).
    """
    if keras.backend.backend() == "torch":
        import torch

        return torch.matmul(a, b)
    return keras.ops.matmul(a, b)


def slice_add(x, starts, update):
    """`x` with `update` added to its block that starts at `starts`.

    On PyTorch, out of place through `slice_scatter`: Keras' `slice_update`
    (3.15) assigns into a copy, which `torch.func.vmap` refuses when only
    the update is batched.
    """
    if keras.backend.backend() != "torch":
        block = keras.ops.slice(x, starts, keras.ops.shape(update))
        return keras.ops.slice_update(x, starts, block + update)
    import torch

    def added(x, axis):
        if axis == x.dim():
            return x + update
        start, size = starts[axis], update.shape[axis]
        if size == x.shape[axis]:
            return added(x, axis + 1)
        inner = added(x.narrow(axis, start, size), axis + 1)
        return torch.slice_scatter(x, inner, axis, start, start + size)

    return added(x, 0)


def maximum(a, b):
    """`keras.ops.maximum`, in float64 where the inputs are (see `matmul`)."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.maximum(a, b)
    return keras.ops.maximum(a, b)


def add_matmul(total, a, b):
    """`total + a @ b`, in place on eager PyTorch tensors.

    Eager PyTorch would otherwise hold the product and the new sum beside
    the old one: three copies of a large vocabulary's kernel gradient.
    """
    # Not under torch.func: a vmapped operand cannot be added into `total`.
    if keras.backend.backend() == "torch" and all(map(is_concrete, (total, a, b))):
        if not total.requires_grad:
            return total.addmm_(a, b)
    return total + matmul(a, b)


def read(tensor) -> np.ndarray:
    """A concrete tensor's values as a NumPy array.

    Not `keras.ops.convert_to_numpy` on PyTorch: as of Keras 3.15 it calls
    `np.array` on the tensor, which NumPy 2 makes warn on every call.
    """
    if keras.backend.backend() == "torch":
        import torch

        if isinstance(tensor, torch.Tensor):
            return tensor.detach().cpu().numpy()
    return keras.ops.convert_to_numpy(tensor)


def cond_no_nan(value, true_fn, false_fn):
    """`true_fn()` unless the small tensor `value` holds a NaN, else `false_fn()`.

    Where `value` can be read now, a plain `if`: eager calls then skip
    Keras' `Cond` operation, whose set-up costs more than the softmax of a
    small tensor.
    """
    if is_concrete(value):
        has_nan = np.isnan(read(value)).any()
        return false_fn() if has_nan else true_fn()
    return keras.ops.cond(reduce_any(keras.ops.isnan(value)), false_fn, true_fn)


def reduce_any(x):
    """Whether any element of the bool tensor `x` is True, over every axis.

    Every axis is named: Keras' `any` without axes passes PyTorch `dim=None`,
    on which PyTorch's ONNX exporter fails (Keras 3.15, PyTorch 2.13).
    """
    return keras.ops.any(x, axis=tuple(range(len(x.shape))))


def reduce_all(x):
    """Whether every element of the bool tensor `x` is True (see `reduce_any`)."""
    return keras.ops.all(x, axis=tuple(range(len(x.shape))))


def graph_when_large(fn):
    """On TensorFlow, runs eager calls of `fn` on large inputs as a graph.

    A graph updates intermediates in place and runs independent reductions
    side by side, where eager ops allocate a fresh output each; for a small
    input the call of a graph costs more than that saves. One graph per
    static configuration (the Python arguments, and the rank, dtype and
    size-1 axes of each tensor), traced once for every size, so a loop over
    varying shapes never retraces.
    """
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    graphs = {}

    def spec(t):
        # Axes of size 1 stay known: broadcasting and gradients rely on them.
        return tf.TensorSpec([1 if n == 1 else None for n in t.shape], t.dtype)

    @functools.wraps(fn)
    def run(x, *args):
        if not tf.executing_eagerly() or _size(x) < _LARGE:
            return fn(x, *args)
        tensors = [x] + [a for a in args if tf.is_tensor(a)]
        specs = tuple(spec(t) for t in tensors)
        # The Python arguments, with a placeholder where a tensor goes.
        layout = tuple(_TENSOR if tf.is_tensor(a) else a for a in args)
        if specs + layout not in graphs:

            def call(x, *tensor_args, layout=layout):
                supplied = iter(tensor_args)
                return fn(x, *(next(supplied) if a is _TENSOR else a for a in layout))

            graph = tf.function(call, input_signature=specs, autograph=False)
            graphs[specs + layout] = graph
        return graphs[specs + layout](*tensors)

    run.graphs = graphs  # for a look at what was traced
    return run


_TENSOR = object()
# Elements from which an eager call runs as a graph (see graph_when_large).
_LARGE = 1 << 16


def _size(x):
    size = 1
    for n in x.shape:
        size *= n
    return size


def to_tensor(value):
    """`value` as a tensor; a variable is read (recorded where a tape watches).

    Keras' `convert_to_tensor` returns TensorFlow variables as they are, and
    a `tf.custom_gradient` may not read a variable it was not handed.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.convert_to_tensor(value)
    return keras.ops.convert_to_tensor(value)


def has_reverse_rules() -> bool:
    """Whether `with_reverse_rule` installs its rule on this backend."""
    return keras.backend.backend() == "tensorflow"


def with_reverse_rule(forward, backward, *inputs):
    """`forward(*inputs)`, differentiated in reverse mode by `backward`.

    `backward(*inputs, outputs)` returns the function that maps an upstream
    gradient to one gradient per input. TensorFlow only, where the fused
    path's branch is a `tf.cond` in a graph, whose own derivative would cost
    a gradient about 10% more. TensorFlow derives forward mode by
    differentiating the rule in its (linear) upstream, and higher orders by
    differentiating the rule itself, so `backward` must be written with
    differentiable ops that stay finite. Elsewhere the backend's autodiff
    runs on `forward` itself: JAX's `custom_vjp` would lose forward mode,
    and PyTorch's `autograd.Function` would need its own rules for
    `torch.func` and forward mode.
    """
    if not has_reverse_rules() or not any(may_differentiate(t) for t in inputs):
        return forward(*inputs)
    import tensorflow as tf

    @tf.custom_gradient
    def rule(*inputs):
        outputs = forward(*inputs)
        vjp = backward(*inputs, outputs)

        def grad(upstream):
            grads = vjp(upstream)
            return grads if len(inputs) > 1 else grads[0]

        return outputs, grad

    return rule(*inputs)


def scan(step, carry, xs):
    """`keras.ops.scan`, whose outputs may differ from the carry in shape.

    `step(carry, x)` returns `(carry, y)`; `xs` and `y` are tuples of
    tensors. Keras' TensorFlow scan (3.15) shapes its outputs like its
    carry, so TensorFlow runs a `tf.while_loop` over TensorArrays here;
    JAX runs `lax.scan`, PyTorch and eager TensorFlow a loop. One step's
    tensors live at a time.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.lax.scan(step, carry, xs)
    import tensorflow as tf

    if backend != "tensorflow" or tf.executing_eagerly():
        length = int(xs[0].shape[0])
        ys = []
        for i in range(length):
            carry, y = step(carry, tuple(x[i] for x in xs))
            ys.append(y)
        return carry, tuple(keras.ops.stack(parts) for parts in zip(*ys, strict=True))

    length = xs[0].shape[0]
    if length is None:  # traced with an unknown batch size
        length = tf.shape(xs[0])[0]
    inputs = [tf.TensorArray(x.dtype, size=length).unstack(x) for x in xs]
    # The outputs' shapes from one traced step.
    _, first = step(carry, tuple(x[0] for x in xs))
    outputs = [
        tf.TensorArray(y.dtype, size=length, element_shape=y.shape) for y in first
    ]

    def body(i, carry, outputs):
        carry, y = step(carry, tuple(x.read(i) for x in inputs))
        return i + 1, carry, [o.write(i, v) for o, v in zip(outputs, y, strict=True)]

    # One step at a time: TensorFlow would otherwise run ten side by side,
    # each with its own temporaries.
    _, carry, outputs = tf.while_loop(
        lambda i, *_: i < length, body, (0, carry, outputs), parallel_iterations=1
    )
    return carry, tuple(o.stack() for o in outputs)


def loop_index(i):
    """A loop's index as a Python int where the loop is Python's (PyTorch).

    Keras' PyTorch slices (3.15) take a fast path for int start indices.
    """
    if keras.backend.backend() == "torch" and not isinstance(i, int):
        return int(i)
    return i


def fori_loop(lower, upper, body, carry):
    """`keras.ops.fori_loop`, two iterations at a time on TensorFlow.

    Keras' TensorFlow loop (3.15) lets ten iterations run side by side, and
    each holds its own temporaries (a block of attention's scores). Two
    keep a 2-core CPU busy: one at a time took 1.3x as long.
    """
    if keras.backend.backend() != "tensorflow":
        return keras.ops.fori_loop(lower, upper, body, carry)
    import tensorflow as tf

    _, carry = tf.while_loop(
        lambda i, _: i < upper,
        lambda i, carry: (i + 1, body(i, carry)),
        (lower, carry),
        parallel_iterations=2,
    )
    return carry


def custom_vjp(forward, backward, *, forward_for_derivative=None, saves_outputs=False):
    """A function whose reverse-mode derivative is `backward`, on every backend.

    `forward(*inputs)` returns `(outputs, saved)`, `saved` a tuple of
    tensors; `backward(inputs, saved, upstream)` returns one gradient per
    input (None for an integer or bool input). With `saves_outputs`,
    `backward` receives `(outputs, *saved)` as `saved` (a PyTorch function
    cannot return its output a second time to save it).
    `forward_for_derivative`, of `forward`'s form, runs instead where a
    derivative may be taken (JAX's forward rule; a recording tape on
    TensorFlow; autograd or `torch.func` on PyTorch), so that it can save
    what `backward` would recompute.

    For kernels that must not keep what autodiff would (a large
    vocabulary's logits): TensorFlow's `tf.custom_gradient`, JAX's
    `jax.custom_vjp` (reverse mode, `vmap`), and a PyTorch
    `autograd.Function` in the form `torch.func` accepts (`setup_context`,
    a generated vmap rule).
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def run_tf(*inputs):
            # A tape records only while one is open, traced or eager; a
            # derivative of a `tf.function` traced without one still works,
            # through `backward` with what `forward` saved.
            chosen = (
                forward_for_derivative
                if forward_for_derivative and _keras_internals.tape_could_record()
                else forward
            )

            @tf.custom_gradient
            def rule(*inputs):
                # Unrecorded: a tape would make the loops inside keep every
                # step's intermediates for a derivative the rule replaces.
                with _keras_internals.tape_stop_recording():
                    outputs, saved = chosen(*inputs)

                kept = (outputs, *saved) if saves_outputs else saved

                def grad(upstream):
                    return list(backward(inputs, kept, upstream))

                return outputs, grad

            return rule(*(to_tensor(x) for x in inputs))

        return run_tf
    if backend == "jax":
        import jax

        @jax.custom_vjp
        def rule(*inputs):
            return forward(*inputs)[0]

        def rule_forward(*inputs):
            outputs, saved = (forward_for_derivative or forward)(*inputs)
            kept = (outputs, *saved) if saves_outputs else saved
            return outputs, (inputs, kept)

        def rule_backward(residuals, upstream):
            inputs, saved = residuals
            return tuple(backward(inputs, saved, upstream))

        rule.defvjp(rule_forward, rule_backward)
        return rule
    import torch

    class Rule(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(chosen, *inputs):
            outputs, saved = chosen(*inputs)
            return (outputs, *saved)

        @staticmethod
        def setup_context(ctx, inputs, output):
            inputs = inputs[1:]
            ctx.count = len(inputs)
            kept = output if saves_outputs else output[1:]
            ctx.save_for_backward(*inputs, *kept)
            ctx.mark_non_differentiable(*output[1:])

        @staticmethod
        def backward(ctx, upstream, *unused):
            tensors = ctx.saved_tensors
            inputs, saved = tensors[: ctx.count], tensors[ctx.count :]
            return (None, *backward(inputs, saved, upstream))

    def run_torch(*inputs):
        differentiated = forward_for_derivative and any(
            may_differentiate(x) for x in inputs if x.is_floating_point()
        )
        chosen = forward_for_derivative if differentiated else forward
        return Rule.apply(chosen, *inputs)[0]

    return run_torch


def may_differentiate(tensor) -> bool:
    """Whether a derivative in `tensor` may be asked for, now or later.

    False only for eager calls that nothing records, in either mode: no
    tape or forward accumulator on TensorFlow; on PyTorch no autograd, no
    forward-mode dual and no `torch.func` transform.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly():
            return True
        return _keras_internals.tape_could_record()
    if backend == "torch":
        import torch

        if not is_concrete(tensor):
            return True
        if getattr(tensor, "requires_grad", False) and torch.is_grad_enabled():
            return True
        return _keras_internals.torch_forward_mode_active()
    return True
