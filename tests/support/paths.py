"""Attention's choice of path, asked for a call on a described device.

`attention.choose_path` takes the device as an argument, so that a CPU can
tell which path a GPU would take (`describe(..., device=GPU)`), and run the
GPU's path itself as far as it can (`as_on_a_gpu`).
"""

import contextlib
import functools
from unittest import mock

import keras
import numpy as np

from keras_softmax import _backend
from keras_softmax import _temperature
from keras_softmax import attention
from keras_softmax._backend import AttentionDevice
from support.backends import BACKEND

CPU = AttentionDevice("cpu")
# An H200: compute capability 9.0 (cuDNN's attention takes heads up to 256).
GPU = AttentionDevice("gpu", compute_capability=(9, 0))
# The path of the device's own fused kernel on a GPU, on this backend.
GPU_KERNEL = {"jax": "cudnn", "torch": "sdpa_gpu"}.get(BACKEND)


def describe(
    query,
    mask=None,
    bias=None,
    temperature=1.0,
    soft_cap=None,
    flash=None,
    weights=False,
    key_length=None,
    device=CPU,
    refused=(),
):
    """The path `attend` takes for these arguments on `device`.

    `query` (a NumPy array or a tensor) is also the keys and values, cut to
    `key_length` keys where given; `temperature` is a number or a tensor.
    """
    query = keras.ops.convert_to_tensor(query)
    key = query if key_length is None else query[:, :key_length]
    keep = None if mask is None else keras.ops.convert_to_tensor(mask)
    bias = None if bias is None else keras.ops.convert_to_tensor(bias)
    t = _temperature.normalize_temperature(temperature)
    choice = attention._Choice(
        foldable=soft_cap is None and t.foldable,
        weightless=not weights,
        flash_attention=flash,
    )
    return attention.choose_path(query, key, key, bias, keep, choice, device, refused)


def ones(shape, dtype="float32"):
    """A tensor of ones in `dtype` (bfloat16 included, which NumPy lacks)."""
    return keras.ops.cast(keras.ops.convert_to_tensor(np.ones(shape, "float32")), dtype)


def _recording(seen):
    """`choose_path`, appending each path it chooses to `seen`."""
    choose = attention.choose_path

    def recorded(*args, **kwargs):
        seen.append(choose(*args, **kwargs))
        return seen[-1]

    return recorded


def record_paths(monkeypatch):
    """A list that each path `attend` chooses is appended to, in order."""
    seen = []
    monkeypatch.setattr(attention, "choose_path", _recording(seen))
    return seen


@contextlib.contextmanager
def paths_taken():
    """`record_paths` for a `with` block, where no fixture reaches."""
    seen = []
    with mock.patch.object(attention, "choose_path", _recording(seen)):
        yield seen


def as_on_a_gpu(monkeypatch, refuse=False):
    """Runs the default path on this CPU as a GPU takes it; returns the paths
    taken (`record_paths`).

    The edge describes a GPU. PyTorch's fused SDPA kernels run on a CPU
    too; on JAX, cuDNN's call runs on XLA, for any dtype. With `refuse`,
    the GPU's kernel refuses every call instead, as where it cannot take
    one. (TensorFlow has no kernel of its own to run.)
    """
    edge = _backend.edge()
    monkeypatch.setattr(edge, "attention_device", lambda tensors: GPU)
    if BACKEND == "jax":
        monkeypatch.setattr(edge, "fused_attention", lambda *args: "cudnn")
        if not refuse:  # else cuDNN's own call, which fails on a CPU
            xla = functools.partial(attention._cudnn_attention, implementation="xla")
            monkeypatch.setitem(attention._FUSED_KERNELS, "cudnn", xla)
    elif BACKEND == "torch" and refuse:
        import torch

        @contextlib.contextmanager
        def no_kernel(backends):
            raise RuntimeError("No available kernel. Aborting execution.")
            yield

        monkeypatch.setattr(torch.nn.attention, "sdpa_kernel", no_kernel)
    return record_paths(monkeypatch)
