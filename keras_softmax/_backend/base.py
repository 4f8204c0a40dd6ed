"""`Edge`: the surface every framework's edge offers, with `keras.ops`' answers.

A framework's module (`tensorflow.py`, `jax.py`, `torch.py`) subclasses
`Edge` and overrides what Keras 3.15 answers slowly, inexactly or not at
all there; what it keeps is Keras'. The last methods (`cond_no_nan`,
`reduce_any`, `reduce_all`) are framework-free: they are written once, on
the rest of the surface.
"""

from typing import NamedTuple

import keras
import numpy as np

# The fewest rows a chunk of the large-vocabulary loss has on a GPU. Each
# chunk reads and rewrites the kernel's float32 gradient, 8 D V bytes, for
# 6 C D V flops of products: 4 / (3 C) bytes a flop at any D and V. An H200
# streams about 0.007 bytes per bf16 flop (4.8 TB/s, some 700 TFLOP/s), so
# at 128 rows (64 MiB of logits, V = 131072) the accumulation outlasts the
# products by half; at 2048, it adds a tenth. (A 2-core CPU streams 0.12:
# there 128 rows cost 8%, as measured.)
GPU_CHUNK_ROWS = 2048

# What `_backend.<name>` resolves on the running backend.
SURFACE = (
    "add_at_columns",
    "add_matmul",
    "apply_in_place",
    "attention_device",
    "chunk_rows",
    "cond_no_nan",
    "cpu_sdpa_serves",
    "custom_vjp",
    "fori_loop",
    "fused_attention",
    "half_kernels_accumulate_in_float32",
    "half_matmul_in_float32_serves",
    "has_reverse_rules",
    "is_concrete",
    "keras_attention_is_exact",
    "keras_flash_kernel",
    "loop_index",
    "losses_read_logits",
    "matmul",
    "maximum",
    "may_differentiate",
    "read",
    "power_of_two",
    "reduce_all",
    "reduce_any",
    "reduce_max",
    "running_total",
    "scan",
    "slice_add",
    "static_shape",
    "takes_fused_path",
    "to_tensor",
    "total_of",
    "with_reverse_rule",
)


class ProductBlocks(NamedTuple):
    """How `add_matmul` cuts a product it cannot add whole in place."""

    axis: int  # the total's axis cut: its longer one, the vocabulary's
    size: int  # the length of a block along `axis` (the last may be shorter)


class AttentionDevice(NamedTuple):
    """The device an attention call runs on, as its choice of path sees it.

    The edge describes the running call's (`Edge.attention_device`); a test
    describes a GPU on a CPU, to check the path a GPU call would take.

    Attributes:
        platform: `"cpu"`, `"gpu"` or `"tpu"` (JAX's names: PyTorch's
            `"cuda"` is a `"gpu"`).
        eager: Whether the call runs now, outside the transforms that
            PyTorch's own attention lacks rules for (tracing, `torch.func`,
            forward mode). Always True on the other backends.
        compute_capability: An NVIDIA GPU's `(major, minor)`, else None.
    """

    platform: str
    eager: bool = True
    compute_capability: tuple[int, int] | None = None


class Edge:
    """`keras.ops`' answers: what a backend without an edge of its own gets."""

    # Paths.

    def takes_fused_path(self, x) -> bool:
        """Whether the backend's own fused softmax kernel is worth a branch.

        True where ops run as separate kernels (TensorFlow without XLA,
        eager PyTorch): there the fused kernel does in one pass what the
        exact formula does in several, and a cheap check picks the exact
        path for the rare slice that needs it. False where a compiler fuses
        the exact formula anyway, and a branch would only cost.
        """
        return False

    def keras_attention_is_exact(self, dtype: str, key_size, value_size) -> bool:
        """Whether `keras.ops.dot_product_attention` gives our result for
        inputs of `dtype` and these head sizes (before our mask and fill)."""
        return True

    def attention_device(self, tensors) -> AttentionDevice:
        """The device attention of `tensors` (query first) runs on.

        A backend without an edge of its own (NumPy, OpenVINO) runs on a CPU.
        """
        return AttentionDevice("cpu")

    def fused_attention(
        self, device: AttentionDevice, dtype: str, key_size, value_size
    ) -> str | None:
        """The device's fused attention kernel that attention calls itself,
        for inputs of `dtype` and these head sizes: the name of its path in
        `attention.choose_path`, or None where there is none."""
        return None

    def keras_flash_kernel(self, device: AttentionDevice) -> bool:
        """Whether Keras may have a fused flash-attention kernel on `device`."""
        return False

    def cpu_sdpa_serves(self, device: AttentionDevice, dtype: str) -> bool:
        """Whether PyTorch's `scaled_dot_product_attention` on a CPU serves
        inputs of `dtype` on `device` (see `attention._sdpa_attention`)."""
        return False

    def half_kernels_accumulate_in_float32(self) -> bool:
        """Whether the backend's fused softmax kernels, given float16 or
        bfloat16, accumulate in float32: then they need no float32 copy."""
        return False

    def losses_read_logits(self) -> bool:
        """Whether Keras' cross-entropy losses read `_keras_logits` here."""
        return False

    # Tensors and their values.

    def is_concrete(self, tensor) -> bool:
        """Whether `tensor`'s values can be read now, without tracing them."""
        return True

    def static_shape(self, x) -> tuple:
        """`x`'s shape as Python ints, with None for sizes not known now."""
        return tuple(x.shape)

    def read(self, tensor) -> np.ndarray:
        """A concrete tensor's values as a NumPy array."""
        return keras.ops.convert_to_numpy(tensor)

    def to_tensor(self, value):
        """`value` as a tensor; a variable is read."""
        return keras.ops.convert_to_tensor(value)

    # Arithmetic, where Keras' is inexact or slow.

    def reduce_max(self, x, axis=None, keepdims=False):
        """`keras.ops.amax`."""
        return keras.ops.amax(x, axis=axis, keepdims=keepdims)

    def matmul(self, a, b, *, transpose_a=False, transpose_b=False, float32=False):
        """`a @ b` of matrices, either read transposed, in float64 where the
        inputs are.

        The flags let a backend read a transposed operand in place (BLAS'
        `trans` arguments) where a transpose would copy a large kernel.
        With `float32`, half-precision operands give a float32 product,
        accumulated in float32 (here by casting them: where
        `half_matmul_in_float32_serves`, without).
        """
        a = keras.ops.transpose(a) if transpose_a else a
        b = keras.ops.transpose(b) if transpose_b else b
        if float32:
            a, b = keras.ops.cast(a, "float32"), keras.ops.cast(b, "float32")
        return keras.ops.matmul(a, b)

    def chunk_elements(self, device: AttentionDevice) -> int:
        """How many logits a chunk of the large-vocabulary loss holds at
        once on `device` (64 MiB in float32), before `chunk_rows`' floor;
        and how large a block of the kernel's gradient `add_matmul` makes
        where it cannot add a whole product in place."""
        return 1 << 24

    def chunk_rows(self, tensor, vocabulary: int) -> int:
        """Rows per chunk of the large-vocabulary loss, for inputs like
        `tensor`: as many as `chunk_elements` logits hold, and on a GPU at
        least `GPU_CHUNK_ROWS`."""
        device = self.attention_device([tensor])
        rows = max(1, self.chunk_elements(device) // max(int(vocabulary), 1))
        if device.platform == "gpu":
            rows = max(rows, GPU_CHUNK_ROWS)
        return rows

    def half_matmul_in_float32_serves(self, tensor) -> bool:
        """Whether `matmul(..., float32=True)` multiplies half-precision
        operands like `tensor` as they are, accumulating in float32, with
        no float32 copy of them."""
        return False

    def maximum(self, a, b):
        """`keras.ops.maximum`, in float64 where the inputs are."""
        return keras.ops.maximum(a, b)

    def power_of_two(self, exponent, dtype: str):
        """`2 ** exponent`, exactly, in `dtype` (`exponent` integers as floats)."""
        ones = keras.ops.ones(keras.ops.shape(exponent), dtype)
        return keras.ops.ldexp(ones, keras.ops.cast(exponent, "int32"))

    def running_total(self, like, dtype: str, axis: int):
        """Zeros shaped like the `[rows, columns]` `like`, in `dtype`: a total
        for `add_matmul` to add products into, its `axis` the vocabulary's.
        `total_of` gives it back as one tensor."""
        return keras.ops.zeros(keras.ops.shape(like), dtype)

    def total_of(self, total, axis: int):
        """A `running_total`'s sum as one tensor (`axis` as given there)."""
        return total

    def add_matmul(self, total, a, b, *, transpose_a=False):
        """`total + a @ b`, `a` read transposed with `transpose_a` (in place
        where the backend can), in `total`'s dtype."""
        float32 = keras.backend.standardize_dtype(total.dtype) == "float32"
        return total + self.matmul(a, b, transpose_a=transpose_a, float32=float32)

    def slice_add(self, x, starts, update):
        """`x` with `update` added to its block that starts at `starts`."""
        block = keras.ops.slice(x, starts, keras.ops.shape(update))
        return keras.ops.slice_update(x, starts, block + update)

    def product_blocks(self, total) -> ProductBlocks:
        """Blocks of the longer axis (the vocabulary's) of the `[rows,
        columns]` `total`, each of `chunk_elements` at most on its device
        (one block where that holds it all).

        Each block reads its own slice of the operand with the vocabulary's
        axis, and all of the other, small one.
        """
        elements = self.chunk_elements(self.attention_device([total]))
        rows, columns = total.shape
        axis = 1 if columns >= rows else 0
        return ProductBlocks(axis, max(1, elements // max(1, total.shape[1 - axis])))

    def apply_in_place(self, op: str, x, *operands):
        """`keras.ops.<op>(x, *operands)`, for an elementwise `op` (`"add"`,
        `"subtract"`, `"multiply"`, `"divide"`, `"exp"`) whose result has
        `x`'s shape and dtype, written over `x` where the backend can: the
        caller gives `x` up. Compilers plan their own buffers, and Keras'
        op serves them."""
        return getattr(keras.ops, op)(x, *operands)

    def add_at_columns(self, x, columns, values):
        """`x` `[C, V]` with `values[i]` added at `x[i, columns[i]]`, over
        `x` where the backend can (as `apply_in_place`).

        A `where` over `x`, which compilers fuse with what makes `x` and
        what reads the result (a scatter is a kernel of its own there).
        """
        hit = keras.ops.arange(x.shape[-1], dtype="int32")[None, :] == columns[:, None]
        return keras.ops.where(hit, x + values[:, None], x)

    # Control flow.

    def graph_when_large(self, fn):
        """`fn`, or a version that runs large eager inputs as a graph."""
        return fn

    def scan(self, step, carry, xs):
        """`keras.ops.scan`, whose outputs may differ from the carry in shape.

        `step(carry, x)` returns `(carry, y)`; `xs` and `y` are tuples of
        tensors. A Python loop here: one step's tensors live at a time.
        """
        ys = []
        for i in range(int(xs[0].shape[0])):
            carry, y = step(carry, tuple(x[i] for x in xs))
            ys.append(y)
        return carry, tuple(keras.ops.stack(parts) for parts in zip(*ys, strict=True))

    def loop_index(self, i):
        """A loop's index, as the backend's slices take it fastest."""
        return i

    def fori_loop(self, lower, upper, body, carry):
        """`keras.ops.fori_loop`."""
        return keras.ops.fori_loop(lower, upper, body, carry)

    # Derivatives.

    def may_differentiate(self, tensor) -> bool:
        """Whether a derivative in `tensor` may be asked for, now or later."""
        return True

    def has_reverse_rules(self) -> bool:
        """Whether `with_reverse_rule` installs its rule on this backend."""
        return False

    def with_reverse_rule(self, forward, backward, *inputs):
        """`forward(*inputs)`, differentiated in reverse mode by `backward`
        where the backend gains by a rule (TensorFlow); else autodiff's own.
        """
        return forward(*inputs)

    def custom_vjp(
        self,
        forward,
        backward,
        *,
        forward_for_derivative=None,
        saves_outputs=False,
        extra_outputs=0,
    ):
        """A function whose reverse-mode derivative is `backward`.

        `forward(*inputs)` returns `(outputs, saved)`, `saved` a tuple of
        tensors; `backward(inputs, saved, upstream)` returns one gradient
        per input (None for an integer or bool input). With
        `saves_outputs`, `backward` receives `(outputs, *saved)` as
        `saved`. `forward_for_derivative`, of `forward`'s form, runs instead
        where a derivative may be taken, so that it can save what
        `backward` would recompute. With `extra_outputs = k`, `outputs` is
        `(output, *extras)`: `k` tensors computed in the same pass and
        returned beside `output` without a derivative (`backward` gets
        `output`'s upstream alone; `saves_outputs` saves `output`). Here,
        with no autodiff to tell, the forward pass alone.
        """
        return lambda *inputs: forward(*inputs)[0]

    # Framework-free, on the surface above.

    def cond_no_nan(self, value, true_fn, false_fn):
        """`true_fn()` unless the small tensor `value` holds a NaN, else
        `false_fn()`.

        Where `value` can be read now, a plain `if`: eager calls then skip
        Keras' `Cond` operation, whose set-up costs more than the softmax
        of a small tensor.
        """
        if self.is_concrete(value):
            has_nan = np.isnan(self.read(value)).any()
            return false_fn() if has_nan else true_fn()
        return keras.ops.cond(
            self.reduce_any(keras.ops.isnan(value)), false_fn, true_fn
        )

    def reduce_any(self, x):
        """Whether any element of the bool tensor `x` is True, over every axis.

        Every axis is named: Keras' `any` without axes passes PyTorch
        `dim=None`, on which PyTorch's ONNX exporter fails (Keras 3.15,
        PyTorch 2.13).
        """
        return keras.ops.any(x, axis=tuple(range(len(x.shape))))

    def reduce_all(self, x):
        """Whether every element of the bool tensor `x` is True (see
        `reduce_any`)."""
        return keras.ops.all(x, axis=tuple(range(len(x.shape))))
