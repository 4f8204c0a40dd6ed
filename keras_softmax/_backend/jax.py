"""JAX's edge (JAX 0.10, Keras 3.15): every call is compiled, so Keras'
answers serve, but for a scan, attention and the custom derivative."""

import math

import jax

from keras_softmax._backend.base import AttentionDevice
from keras_softmax._backend.base import Edge


class JaxEdge(Edge):
    def keras_attention_is_exact(self, dtype: str, key_size, value_size) -> bool:
        # Keras' attention returns float32 for float64 inputs (JAX 0.10's own
        # takes the softmax in float32), and fails on values whose head size
        # differs from the keys'.
        return dtype != "float64" and key_size == value_size

    def attention_device(self, tensors) -> AttentionDevice:
        device = jax.devices()[0]
        capability = getattr(device, "compute_capability", None)  # "9.0"
        if capability is not None:
            capability = tuple(int(n) for n in capability.split(".")[:2])
        return AttentionDevice(device.platform, compute_capability=capability)

    def fused_attention(self, device, dtype: str, key_size, value_size) -> str | None:
        # cuDNN's flash attention through `jax.nn.dot_product_attention`
        # (JAX 0.10): half precision only, from Ampere on, with heads of one
        # size, a multiple of 8 (at most 128, or 256 from Hopper on).
        capability = device.compute_capability
        if device.platform != "gpu" or capability is None or capability < (8, 0):
            return None
        largest = 256 if capability >= (9, 0) else 128
        heads = key_size == value_size and key_size is not None
        if dtype in ("float16", "bfloat16") and heads and key_size % 8 == 0:
            return "cudnn" if key_size <= largest else None
        return None

    def keras_flash_kernel(self, device) -> bool:
        # Keras 3.15 has none on a CPU: asking only fails.
        return device.platform != "cpu"

    def is_concrete(self, tensor) -> bool:
        return not isinstance(tensor, jax.core.Tracer)

    def matmul(self, a, b, *, transpose_a=False, transpose_b=False, float32=False):
        # `dot_general` contracts the named axes: eager JAX would copy a
        # transposed kernel first. Its `preferred_element_type` multiplies
        # half-precision operands into a float32 product.
        contract = ((0 if transpose_a else 1,), (1 if transpose_b else 0,))
        return jax.lax.dot_general(
            a,
            b,
            (contract, ((), ())),
            preferred_element_type="float32" if float32 else None,
        )

    def add_matmul(self, total, a, b, *, transpose_a=False):
        # XLA makes a whole product before adding it (on a CPU at least): a
        # second float32 copy of a large kernel's gradient (2 GiB at
        # D = 4096, V = 131072). Blocks of the vocabulary, each added where
        # it lies (`dynamic_update_slice` in a loop), hold one at a time;
        # on a CPU, chunk-sized blocks also ran 7 to 13% faster.
        blocks = self.product_blocks(total)
        view = _PartsView(total.shape[blocks.axis], jax.device_count())
        width = max(1, blocks.size // view.parts)
        if width >= view.part:
            return super().add_matmul(total, a, b, transpose_a=transpose_a)
        float32 = total.dtype == "float32"
        # The operand with the vocabulary's axis, and that axis.
        if blocks.axis == 1:  # the total's columns: `b`'s
            operand, axis = b, 1
        else:  # its rows: `a`'s, its columns where read transposed
            operand, axis = a, int(transpose_a)
        operand = view.split(operand, axis)
        total = view.split(total, blocks.axis)

        def add(total, start, size):
            part = view.block(operand, axis, start, size)
            a_part, b_part = (a, part) if blocks.axis == 1 else (part, b)
            product = self.matmul(
                a_part, b_part, transpose_a=transpose_a, float32=float32
            )
            return view.with_block_added(total, blocks.axis, product, start)

        whole = view.part // width
        total = jax.lax.fori_loop(
            0, whole, lambda i, t: add(t, i * width, width), total
        )
        if view.part % width:
            total = add(total, whole * width, view.part % width)
        return view.merged(total, blocks.axis)

    def half_matmul_in_float32_serves(self, tensor) -> bool:
        return True

    def chunk_elements(self, device: AttentionDevice) -> int:
        # On a CPU, chunks of 32 MiB of float32 logits run faster than 64
        # (N = 2048, D = 256, V = 65536: 0.92x the naive step's time against
        # 1.06x) and halve their memory.
        if device.platform == "cpu":
            return 1 << 23
        return super().chunk_elements(device)

    def power_of_two(self, exponent, dtype: str):
        # Keras' `ldexp` (3.15) returns float32 for float64 and int32.
        return jax.numpy.ldexp(
            jax.numpy.ones_like(exponent, dtype), exponent.astype("int32")
        )

    def scan(self, step, carry, xs):
        # `lax.scan`: Keras' shapes its outputs like its carry.
        return jax.lax.scan(step, carry, xs)

    def custom_vjp(
        self,
        forward,
        backward,
        *,
        forward_for_derivative=None,
        saves_outputs=False,
        extra_outputs=0,
    ):
        """`jax.custom_vjp`: reverse mode and `vmap`."""

        @jax.custom_vjp
        def rule(*inputs):
            return forward(*inputs)[0]

        def rule_forward(*inputs):
            outputs, saved = (forward_for_derivative or forward)(*inputs)
            output = outputs[0] if extra_outputs else outputs
            kept = (output, *saved) if saves_outputs else saved
            return outputs, (inputs, kept)

        def rule_backward(residuals, upstream):
            inputs, saved = residuals
            upstream = upstream[0] if extra_outputs else upstream
            return tuple(backward(inputs, saved, upstream))

        rule.defvjp(rule_forward, rule_backward)
        if not extra_outputs:
            return rule

        def run(*inputs):
            # Without a derivative, the extras belong to the trace outside a
            # transform (`grad`'s), where they may be read after it.
            output, *extras = rule(*inputs)
            return (output, *map(jax.lax.stop_gradient, extras))

        return run


EDGE = JaxEdge()


class _PartsView:
    """A vocabulary of `length` seen as `[parts, length // parts]`, `parts`
    the largest number that divides both it and the device count: an even
    shard of it over any of the devices' mesh axes holds whole rows of that
    view. A block that takes a slice of every row never crosses a shard,
    where a block of the vocabulary itself would make XLA gather a sharded
    kernel's whole gradient onto every device.

    A tensor is split once (`split`), its blocks read and added in the
    view (`block`, `with_block_added`, as 2-D tensors), and merged at the end.
    With one part, the tensor is used as it is: XLA may lay out a view of
    the loop's total anew, copying it.
    """

    def __init__(self, length: int, devices: int):
        self.parts = math.gcd(length, devices)
        self.part = length // self.parts

    def split(self, x, axis):
        """`x`, its `axis` the vocabulary's (or a block's), as the view."""
        if self.parts == 1:
            return x
        return x.reshape(x.shape[:axis] + (self.parts, -1) + x.shape[axis + 1 :])

    def merged(self, x, axis):
        """`split`'s inverse."""
        if self.parts == 1:
            return x
        return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])

    def block(self, x, axis, start, size):
        """The view `x`'s columns `[start, start + size)` of every part, as a
        tensor of `x`'s rank before the split."""
        inner = self._inner(axis)
        return self.merged(jax.lax.dynamic_slice_in_dim(x, start, size, inner), axis)

    def with_block_added(self, x, axis, block, start):
        """The view `x` with `block` (as `block` returns it) added at `start`,
        in the view: a merged slice of the total would be a copy."""
        block, inner = self.split(block, axis), self._inner(axis)
        old = jax.lax.dynamic_slice_in_dim(x, start, block.shape[inner], inner)
        return jax.lax.dynamic_update_slice_in_dim(x, old + block, start, inner)

    def _inner(self, axis):
        """The view's axis along a part."""
        return axis if self.parts == 1 else axis + 1
