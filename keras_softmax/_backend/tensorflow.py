"""TensorFlow's edge (TensorFlow 2.21, Keras 3.15): the one module of the
library that imports TensorFlow (with the private-API ledger)."""

import functools

import numpy as np
import tensorflow as tf

from keras_softmax import _keras_internals
from keras_softmax._backend.base import AttentionDevice
from keras_softmax._backend.base import Edge

# Inside a user's `tf.function`, AutoGraph would rewrite every function of
# the library it reaches, as it leaves Keras' alone: 345 of them for one
# step of the loss, most of its trace time. They are written for graphs as
# they are (Keras' `fit` calls them unconverted).
_keras_internals.leave_out_of_autograph("keras_softmax")

# Elements from which an eager call runs as a graph (see graph_when_large).
_LARGE = 1 << 16
_TENSOR = object()
# Elements in a block of a running total on a CPU (4 MiB of float32; see
# running_total). On a GPU, blocks of `chunk_elements`: fewer, larger products.
# At most 64 blocks, each a product and a sum in every step's graph: at
# D = 8192, 4 MiB blocks would cut V = 131072 into 1024.
_CPU_TOTAL_BLOCK = 1 << 20
_MOST_TOTAL_BLOCKS = 64


class TensorFlowEdge(Edge):
    def takes_fused_path(self, x) -> bool:
        # Eager, or a `tf.function` without XLA: how Keras' `fit` and
        # `predict` run on a CPU, and how `model.export` traces.
        return not _keras_internals.in_xla_context()

    def losses_read_logits(self) -> bool:
        return True

    def attention_device(self, tensors) -> AttentionDevice:
        # An eager tensor names its device. A traced one names it only under
        # `tf.device` (else ""), and NumPy inputs never: TensorFlow places
        # those ops on a GPU where it sees one, as `fit` runs. (Keras'
        # TensorFlow attention has no fused kernel; the loss's chunks
        # depend on the device.)
        device = (getattr(tensors[0], "device", "") or "").upper()
        gpus = tf.config.list_logical_devices("GPU")  # (cached: 0.4 us)
        on_gpu = bool(gpus) and (not device or "GPU" in device)
        return AttentionDevice("gpu" if on_gpu else "cpu")

    def is_concrete(self, tensor) -> bool:
        return tf.executing_eagerly() or not tf.is_tensor(tensor)

    def read(self, tensor) -> np.ndarray:
        # A view of an eager tensor's buffer, where Keras' `convert_to_numpy`
        # copies it (an eager softmax's check reads its outputs: 5 us
        # against 9 at [1, 32000]). Nothing here writes to what it reads.
        return np.asarray(tensor)

    def to_tensor(self, value):
        # Keras' `convert_to_tensor` returns a variable as it is, and a
        # `tf.custom_gradient` may not read a variable it was not handed.
        return tf.convert_to_tensor(value)

    def matmul(self, a, b, *, transpose_a=False, transpose_b=False, float32=False):
        # The kernel's flags read a transposed operand in place, where
        # `tf.transpose` would copy a large kernel. (`output_type` takes
        # integers only: half operands are cast.)
        if float32:
            a, b = tf.cast(a, tf.float32), tf.cast(b, tf.float32)
        if a.shape[0 if transpose_a else 1] == 0:
            # An empty sum: in a graph, Grappler fuses the product with a
            # bias added to it, and that kernel aborts the process on an
            # empty contraction (oneDNN) or drops the bias (Eigen).
            rows = tf.shape(a)[1 if transpose_a else 0]
            columns = tf.shape(b)[0 if transpose_b else 1]
            return tf.zeros(tf.stack([rows, columns]), a.dtype)
        return tf.linalg.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)

    def chunk_elements(self, device: AttentionDevice) -> int:
        # On a CPU, chunks of 128 MiB of float32 logits run faster than 64,
        # now that the kernel's gradient is added in blocks (running_total):
        # 0.88x the naive step's time against 0.99x at N = 4096, D = 512,
        # V = 131072, at 22 to 94 MiB of extra peak (400 is the target).
        if device.platform == "cpu":
            return 1 << 25
        return super().chunk_elements(device)

    def running_total(self, like, dtype: str, axis: int):
        # TensorFlow adds a product into a new tensor: each chunk of the loss
        # held the kernel's gradient, its product and their sum at once
        # (768 MiB at D = 512, V = 131072). Held as blocks of the vocabulary,
        # each added by its own product, one block's product and sum join
        # the total: 4 MiB blocks cut a step's extra peak there from 404 to
        # 73 MiB in a fresh process, at the same speed (docs/speed.md).
        rows, columns = like.shape
        if rows is None or columns is None:
            return super().running_total(like, dtype, axis)
        device = self.attention_device([like])
        if device.platform == "cpu":
            elements = _CPU_TOTAL_BLOCK
        else:
            elements = self.chunk_elements(device)
        length = like.shape[axis]
        size = max(1, elements // max(1, like.shape[1 - axis]))
        size = max(size, -(-length // _MOST_TOTAL_BLOCKS))
        if size >= length:  # one block: the total itself
            return super().running_total(like, dtype, axis)
        blocks = []
        for start in range(0, length, size):
            shape = [rows, columns]
            shape[axis] = min(size, length - start)
            blocks.append(tf.zeros(shape, dtype))
        return tuple(blocks)

    def total_of(self, total, axis: int):
        return tf.concat(total, axis) if isinstance(total, tuple) else total

    def add_matmul(self, total, a, b, *, transpose_a=False):
        if not isinstance(total, tuple):
            return super().add_matmul(total, a, b, transpose_a=transpose_a)
        # The blocks' axis: the one along which the first is shorter than
        # the product (`a`'s rows, or its columns where read transposed).
        rows = a.shape[1 if transpose_a else 0]
        axis = 0 if total[0].shape[0] != rows else 1
        sizes = [block.shape[axis] for block in total]
        if axis == 1:
            pairs = [(a, part) for part in tf.split(b, sizes, axis=1)]
        else:
            pairs = [(part, b) for part in tf.split(a, sizes, axis=int(transpose_a))]
        return tuple(
            super(TensorFlowEdge, self).add_matmul(block, x, y, transpose_a=transpose_a)
            for block, (x, y) in zip(total, pairs, strict=True)
        )

    def add_at_columns(self, x, columns, values):
        # A scatter, which updates `x` in place when nothing else reads it:
        # without XLA, the base's `where` is three passes over `x` (13 ms
        # against 4 at [128, 131072] on a CPU). XLA fuses the `where`.
        if _keras_internals.in_xla_context():
            return super().add_at_columns(x, columns, values)
        rows = tf.range(tf.shape(x)[0], dtype=columns.dtype)
        indices = tf.stack([rows, columns], axis=1)
        return tf.tensor_scatter_nd_add(x, indices, tf.cast(values, x.dtype))

    def reduce_max(self, x, axis=None, keepdims=False):
        # Keras' eager maximum runs an extra op to refuse empty tensors,
        # more than the softmax of a small tensor costs.
        return tf.reduce_max(x, axis=axis, keepdims=keepdims)

    def graph_when_large(self, fn):
        """Runs eager calls of `fn` on large inputs as a graph.

        A graph updates intermediates in place and runs independent
        reductions side by side, where eager ops allocate a fresh output
        each; for a small input the call of a graph costs more than that
        saves. One graph per static configuration (the Python arguments,
        and the rank, dtype and size-1 axes of each tensor), traced once for
        every size, so a loop over varying shapes never retraces.
        """
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
                    return fn(
                        x, *(next(supplied) if a is _TENSOR else a for a in layout)
                    )

                graph = tf.function(call, input_signature=specs, autograph=False)
                graphs[specs + layout] = graph
            return graphs[specs + layout](*tensors)

        run.graphs = graphs  # for a look at what was traced
        return run

    def scan(self, step, carry, xs):
        # Keras' TensorFlow scan shapes its outputs like its carry, so a
        # traced scan is a `tf.while_loop` over TensorArrays here.
        if tf.executing_eagerly():
            return super().scan(step, carry, xs)
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
            written = [o.write(i, v) for o, v in zip(outputs, y, strict=True)]
            return i + 1, carry, written

        # One step at a time: TensorFlow would otherwise run ten side by
        # side, each with its own temporaries.
        _, carry, outputs = tf.while_loop(
            lambda i, *_: i < length, body, (0, carry, outputs), parallel_iterations=1
        )
        return carry, tuple(o.stack() for o in outputs)

    def fori_loop(self, lower, upper, body, carry):
        # Keras' loop lets ten iterations run side by side, each holding its
        # own temporaries (a block of attention's scores). Two keep a 2-core
        # CPU busy: one at a time took 1.3x as long.
        _, carry = tf.while_loop(
            lambda i, _: i < upper,
            lambda i, carry: (i + 1, body(i, carry)),
            (lower, carry),
            parallel_iterations=2,
        )
        return carry

    def may_differentiate(self, tensor) -> bool:
        # Eagerly, only while a tape or forward accumulator may record.
        if not tf.executing_eagerly():
            return True
        return _keras_internals.tape_could_record()

    def has_reverse_rules(self) -> bool:
        return True

    def with_reverse_rule(self, forward, backward, *inputs):
        """`forward(*inputs)`, differentiated in reverse mode by `backward`.

        `backward(*inputs, outputs)` returns the function that maps an
        upstream gradient to one gradient per input. The fused path's
        branch is a `tf.cond` in a graph, whose own derivative would cost a
        gradient about 10% more. TensorFlow derives forward mode by
        differentiating the rule in its (linear) upstream, and higher
        orders by differentiating the rule itself, so `backward` must be
        written with differentiable ops that stay finite.
        """
        if not any(self.may_differentiate(t) for t in inputs):
            return forward(*inputs)

        @tf.custom_gradient
        def rule(*inputs):
            outputs = forward(*inputs)
            vjp = backward(*inputs, outputs)

            def grad(upstream):
                grads = vjp(upstream)
                return grads if len(inputs) > 1 else grads[0]

            return outputs, grad

        return rule(*inputs)

    def custom_vjp(
        self,
        forward,
        backward,
        *,
        forward_for_derivative=None,
        saves_outputs=False,
        extra_outputs=0,
    ):
        """`tf.custom_gradient`, its forward pass unrecorded."""

        def run(*inputs):
            # A tape records only while one is open, traced or eager; a
            # derivative of a `tf.function` traced without one still works,
            # through `backward` with what `forward` saved.
            recording = _keras_internals.tape_could_record()
            chosen = forward_for_derivative if recording else None
            return _with_gradient(
                chosen or forward,
                backward,
                saves_outputs,
                extra_outputs,
                inputs,
                self.to_tensor,
            )

        return run


def _with_gradient(forward, backward, saves_outputs, extra_outputs, inputs, to_tensor):
    @tf.custom_gradient
    def rule(*inputs):
        # Unrecorded: a tape would make the loops inside keep every step's
        # intermediates for a derivative the rule replaces.
        with _keras_internals.tape_stop_recording():
            outputs, saved = forward(*inputs)
        output = outputs[0] if extra_outputs else outputs
        kept = (output, *saved) if saves_outputs else saved

        def grad(*upstream):
            # One upstream per output; the extras' are ignored.
            return list(backward(inputs, kept, upstream[0]))

        return outputs, grad

    return rule(*(to_tensor(x) for x in inputs))


def _size(x):
    size = 1
    for n in x.shape:
        size *= n
    return size


EDGE = TensorFlowEdge()
