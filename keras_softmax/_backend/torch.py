"""PyTorch's edge (PyTorch 2.13, Keras 3.15): eager ops one at a time,
float64 kept where Keras would compute it in float32, and `torch.func`'s
transforms respected."""

import enum
import functools

import numpy as np
import torch

from keras_softmax import _keras_internals
from keras_softmax._backend.base import AttentionDevice
from keras_softmax._backend.base import Edge

# What SDPA's fused kernels take on a GPU (PyTorch 2.13).
_SDPA_GPU_DTYPES = ("float16", "bfloat16", "float32")


class TorchEdge(Edge):
    def takes_fused_path(self, x) -> bool:
        # Eager calls run op by op; under `torch.compile` or `torch.func`
        # the tensors cannot be read to branch on.
        return self.is_concrete(x)

    def keras_attention_is_exact(self, dtype: str, key_size, value_size) -> bool:
        # Keras' attention returns float32 for float64 inputs.
        return dtype != "float64"

    def attention_device(self, tensors) -> AttentionDevice:
        # PyTorch's own kernels run on eager calls only: a traced one would
        # freeze the choice into the trace, and forward mode and `torch.func`
        # find no rules for them. (NumPy inputs, which Keras' layers may be
        # handed, run where Keras converts them to.)
        tensors = [
            t if isinstance(t, torch.Tensor) else self.to_tensor(t) for t in tensors
        ]
        device = tensors[0].device
        eager = all(map(self.is_concrete, tensors))
        eager = eager and not _keras_internals.torch_forward_mode_active()
        if device.type != "cuda":
            return AttentionDevice(device.type, eager)
        capability = torch.cuda.get_device_capability(device)
        return AttentionDevice("gpu", eager, capability)

    def fused_attention(self, device, dtype: str, key_size, value_size) -> str | None:
        # SDPA's flash, memory-efficient and cuDNN kernels (never its math
        # kernel), which accumulate in float32: for eager calls on a GPU.
        fused = device.platform == "gpu" and device.eager
        return "sdpa_gpu" if fused and dtype in _SDPA_GPU_DTYPES else None

    def keras_flash_kernel(self, device) -> bool:
        # Keras 3.15 has none on a CPU: asking only fails.
        return device.platform != "cpu"

    def half_kernels_accumulate_in_float32(self) -> bool:
        # `torch.softmax` and `log_softmax` on float16 and bfloat16 compute
        # in float32 (`acc_type`), on a CPU and a GPU alike (2.13).
        return True

    def cpu_sdpa_serves(self, device, dtype: str) -> bool:
        # Not float64, where derivatives are checked: the CPU kernel has no
        # second derivative.
        return device.platform == "cpu" and device.eager and dtype != "float64"

    def is_concrete(self, tensor) -> bool:
        # A traced value (torch.jit.trace, the ONNX exporter) read now would
        # be frozen into the trace.
        return not (
            torch.compiler.is_compiling()
            or torch.jit.is_tracing()
            or _keras_internals.is_functorch_wrapped(tensor)
        )

    def static_shape(self, x) -> tuple:
        # PyTorch's tracer traces sizes as tensors: branching on one would
        # freeze the example's size into the trace.
        if torch.jit.is_tracing():
            return (None,) * len(x.shape)
        return tuple(x.shape)

    def read(self, tensor) -> np.ndarray:
        # Not Keras' `convert_to_numpy`, which calls `np.array` on the
        # tensor: NumPy 2 makes that warn on every call.
        if isinstance(tensor, torch.Tensor):
            tensor = tensor.detach().cpu()
            if tensor.dtype == torch.bfloat16:  # which NumPy has not
                tensor = tensor.float()
            return tensor.numpy()
        return super().read(tensor)

    def reduce_max(self, x, axis=None, keepdims=False):
        # Keras' maximum breaks `torch.compile`'s graph.
        if axis is None:
            return torch.amax(x)
        return torch.amax(x, dim=axis, keepdim=keepdims)

    def matmul(self, a, b, *, transpose_a=False, transpose_b=False, float32=False):
        # Keras' `result_type` of two torch float64 dtypes is float32. A
        # transposed matrix is a view, which BLAS reads in place.
        a, b = a.T if transpose_a else a, b.T if transpose_b else b
        if float32 and a.dtype != torch.float32:
            if _takes_float32_product(a, b):
                return torch.mm(a, b, out_dtype=torch.float32)
            a, b = a.float(), b.float()
        return torch.matmul(a, b)

    def half_matmul_in_float32_serves(self, tensor) -> bool:
        # Eager calls only: `torch.func` finds no batching rule for the
        # `out_dtype` overloads.
        return (
            self.is_concrete(tensor)
            and _float32_product_of_half(tensor.device, tensor.dtype) is not None
        )

    def maximum(self, a, b):
        return torch.maximum(a, b)  # as `matmul`

    def power_of_two(self, exponent, dtype: str):
        # Keras' `ldexp` (3.15) returns float32 for float64, and PyTorch's
        # raises 2 to an integer power in integers: `pow` of floats is exact.
        two = torch.full_like(exponent, 2.0, dtype=getattr(torch, dtype))
        return torch.pow(two, exponent.to(two.dtype))

    def add_matmul(self, total, a, b, *, transpose_a=False):
        # In place on eager tensors: eager PyTorch would otherwise hold the
        # product and the new sum beside the old one, three copies of a
        # large vocabulary's kernel gradient. Not under `torch.func`: a
        # vmapped operand cannot be added into `total`.
        float32 = total.dtype == torch.float32 and a.dtype != total.dtype
        concrete = all(map(self.is_concrete, (total, a, b)))
        if not concrete or total.requires_grad:
            return total + self.matmul(a, b, transpose_a=transpose_a, float32=float32)
        a = a.T if transpose_a else a
        if not float32 or not _takes_float32_product(a, b):
            return total.addmm_(a.to(total.dtype), b.to(total.dtype))
        product = _float32_product_of_half(a.device, a.dtype)
        if product is _Float32Product.ADDED_IN_PLACE:
            return torch.addmm(total, a, b, out_dtype=total.dtype, out=total)
        # Added a block of the vocabulary at a time: a whole product would
        # be one more float32 tensor of `total`'s size.
        blocks = self.product_blocks(total)
        for start in range(0, total.shape[blocks.axis], blocks.size):
            part = slice(start, start + blocks.size)
            if blocks.axis == 1:
                total[:, part].add_(torch.mm(a, b[:, part], out_dtype=total.dtype))
            else:
                total[part].add_(torch.mm(a[part], b, out_dtype=total.dtype))
        return total

    def slice_add(self, x, starts, update):
        # Out of place through `slice_scatter`: Keras' `slice_update` assigns
        # into a copy, which `torch.func.vmap` refuses when only the update
        # is batched.
        def added(x, axis):
            if axis == x.dim():
                return x + update
            start, size = starts[axis], update.shape[axis]
            if size == x.shape[axis]:
                return added(x, axis + 1)
            inner = added(x.narrow(axis, start, size), axis + 1)
            return torch.slice_scatter(x, inner, axis, start, start + size)

        return added(x, 0)

    def apply_in_place(self, op: str, x, *operands):
        # Eager PyTorch makes each result anew: a chunk of the loss held two
        # [C, V] tensors at once, and a CPU spent a third of the step on the
        # fresh pages (N = 2048, D = 256, V = 65536).
        if self._may_write_over(x, operands):
            return getattr(x, _IN_PLACE[op])(*operands)
        return super().apply_in_place(op, x, *operands)

    def add_at_columns(self, x, columns, values):
        # A scatter: eager PyTorch would hold the bool mask, `x + values`
        # and the `where`'s result beside `x`, each of `x`'s size.
        rows = torch.arange(x.shape[0], device=x.device)
        if self._may_write_over(x, ()) and self.is_concrete(values):
            return x.index_put_((rows, columns.long()), values, accumulate=True)
        return x.index_put((rows, columns.long()), values, accumulate=True)

    def _may_write_over(self, x, operands) -> bool:
        """Whether `x` may take an elementwise result of `operands` in place:
        an eager tensor outside autograd's record and `torch.func`, whose
        shape and dtype the result keeps."""
        tensors = [o for o in operands if isinstance(o, torch.Tensor)]
        if not all(map(self.is_concrete, (x, *tensors))):
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *tensors)):
            return False
        shapes = [o.shape for o in tensors]
        return all(o.dtype == x.dtype for o in tensors) and (
            torch.broadcast_shapes(x.shape, *shapes) == x.shape
        )

    def loop_index(self, i):
        # The loops are Python's, and Keras' slices take a fast path for ints.
        return i if isinstance(i, int) else int(i)

    def may_differentiate(self, tensor) -> bool:
        # Eagerly, only with autograd recording it, a forward-mode dual, or
        # a `torch.func` transform.
        if not self.is_concrete(tensor):
            return True
        if getattr(tensor, "requires_grad", False) and torch.is_grad_enabled():
            return True
        return _keras_internals.torch_forward_mode_active()

    def custom_vjp(
        self,
        forward,
        backward,
        *,
        forward_for_derivative=None,
        saves_outputs=False,
        extra_outputs=0,
    ):
        """An `autograd.Function` in the form `torch.func` accepts."""
        rule = _autograd_function(backward, saves_outputs, extra_outputs)

        def run(*inputs):
            differentiated = forward_for_derivative and any(
                self.may_differentiate(x) for x in inputs if x.is_floating_point()
            )
            chosen = forward_for_derivative if differentiated else forward
            outputs = rule.apply(chosen, *inputs)
            return tuple(outputs[: 1 + extra_outputs]) if extra_outputs else outputs[0]

        return run


# `Edge.apply_in_place`'s ops, as PyTorch's in-place methods.
_IN_PLACE = {
    "add": "add_",
    "subtract": "sub_",
    "multiply": "mul_",
    "divide": "div_",
    "exp": "exp_",
}


class _Float32Product(enum.Enum):
    """How a device multiplies half-precision operands into float32."""

    ADDED_IN_PLACE = "adds the product into a float32 total in place (`addmm`)"
    MADE_APART = "makes the product (`mm`), which is then added"


def _takes_float32_product(a, b) -> bool:
    """Whether `a @ b` of half operands runs as one `out_dtype` product.

    Not where autograd records the product (a second derivative does): the
    overloads have no derivative, and the operands are cast instead.
    """
    recorded = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    return (
        a.dtype == b.dtype
        and not recorded
        and EDGE.is_concrete(b)
        and EDGE.half_matmul_in_float32_serves(a)
    )


@functools.cache
def _float32_product_of_half(device, dtype) -> _Float32Product | None:
    """How `device` multiplies `dtype` operands into a float32 product, or
    None where it cannot (casting them then copies the operands).

    PyTorch's `out_dtype` overloads of `mm` and `addmm` accumulate half
    operands in float32 without a float32 copy of them. In 2.13 they have
    CUDA kernels only, and some versions' `addmm` refuses a float32 total
    or writes it elsewhere. Each is tried once per device and dtype, on a
    product that the half dtype cannot hold (`1 + eps / 2`).
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    half_eps = torch.finfo(dtype).eps / 2
    a = torch.ones((1, 2), dtype=dtype, device=device)
    b = torch.tensor([[1.0], [half_eps]], dtype=dtype, device=device)
    try:
        product = torch.mm(a, b, out_dtype=torch.float32)
        if product.dtype != torch.float32 or product.item() != 1.0 + half_eps:
            return None
    except torch.OutOfMemoryError:
        raise  # not an answer to cache
    except (NotImplementedError, RuntimeError, TypeError):
        return None
    total = torch.full((1, 1), 0.5, dtype=torch.float32, device=device)
    try:
        added = torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
        in_place = added.data_ptr() == total.data_ptr()
        if in_place and total.item() == 1.5 + half_eps:
            return _Float32Product.ADDED_IN_PLACE
    except torch.OutOfMemoryError:
        raise
    except (NotImplementedError, RuntimeError, TypeError):
        pass
    return _Float32Product.MADE_APART


def _autograd_function(backward, saves_outputs, extra_outputs):
    """A `torch.autograd.Function` (`setup_context`, a generated vmap rule)
    whose first argument is the forward pass to run."""

    class Rule(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(chosen, *inputs):
            outputs, saved = chosen(*inputs)
            return (*(outputs if extra_outputs else (outputs,)), *saved)

        @staticmethod
        def setup_context(ctx, inputs, output):
            inputs = inputs[1:]
            ctx.count = len(inputs)
            # A PyTorch function cannot return its output twice to save it.
            saved = output[1 + extra_outputs :]
            kept = (output[0], *saved) if saves_outputs else saved
            ctx.save_for_backward(*inputs, *kept)
            ctx.mark_non_differentiable(*output[1:])
            # No zeros for the outputs that carry saved tensors: autograd
            # would otherwise make one of each, a large kernel's gradient.
            ctx.set_materialize_grads(False)

        @staticmethod
        def backward(ctx, upstream, *unused):
            if upstream is None:  # only the non-differentiable outputs were used
                return (None,) * (1 + ctx.count)
            tensors = ctx.saved_tensors
            inputs, saved = tensors[: ctx.count], tensors[ctx.count :]
            return (None, *backward(inputs, saved, upstream))

    return Rule


EDGE = TorchEdge()
