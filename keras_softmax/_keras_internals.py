"""The private APIs of Keras, TensorFlow and PyTorch that keras_softmax uses.

Every one: Keras' activation table, `Layer.__call__`'s frame, the members
of `MultiHeadAttention` we override or read, the mask and logits attributes
of tensors (`_keras_mask`, `_keras_logits`, `_keras_history`), TensorFlow's
tape, XLA context and AutoGraph's rules, PyTorch's forward-mode level and
`torch.func` wrapper test.

Gathered here, each with the version it was checked against, so that a
release that moves one breaks one module; `tests/test_keras_integration.py`
checks that each is still where it was.
"""

import inspect
import sys

import keras
from keras.src import activations as _keras_activations  # 3.15
from keras.src.backend import get_keras_mask  # noqa: F401 (3.15)
from keras.src.backend import set_keras_mask  # noqa: F401 (3.15)

# Divides a loss by tf.distribute's replicas, as Keras' mean reductions are.
from keras.src.losses.loss import scale_loss_for_distribution  # noqa: F401 (3.15)

# What `StableMultiHeadAttention` overrides or reads of its base class,
# `keras.layers.MultiHeadAttention` (Keras 3.15).
MULTI_HEAD_ATTENTION_MEMBERS = (
    "_attention_axes",
    "_compute_attention",
    "_dropout",
    "_dropout_layer",
    "_flash_attention",
    "_inverse_sqrt_key_dim",
    "_masked_softmax",
    "_num_heads",
    "_softmax",
)


def activation_table() -> dict | None:
    """The table `keras.activations.get` resolves strings from (Keras 3.15).

    `ALL_OBJECTS_DICT` in keras/src/activations/__init__.py: registered
    custom objects are not read for activation names. None if it moved.
    """
    table = getattr(_keras_activations, "ALL_OBJECTS_DICT", None)
    return table if isinstance(table, dict) else None


def outer_call_is_masked(layer) -> bool:
    """Whether `layer` runs inside another layer's call whose input is masked.

    That is how an activation runs (`Dense(..., activation=layer)`): Keras
    gives the outer layer the mask (`previous_mask`, a local of
    `Layer.__call__` in Keras 3.15) and the activation nothing. Best effort:
    False wherever Keras' frames differ.
    """
    # Keras wraps `Layer.__call__` in its traceback filter.
    call_code = inspect.unwrap(keras.layers.Layer.__call__).__code__
    frame = sys._getframe(2)
    for _ in range(40):
        if frame is None:
            return False
        if frame.f_code is call_code and frame.f_locals.get("self") is not layer:
            caller = frame.f_locals.get("self")
            if isinstance(caller, keras.Model):
                return False
            mask = frame.f_locals.get("previous_mask")
            return mask is not None and not all(
                m is None for m in keras.tree.flatten(mask)
            )
        frame = frame.f_back
    return False


def attach_loss_logits(outputs, logits) -> None:
    """Hands Keras' cross-entropy losses the logits of `outputs` (Keras 3.15).

    Keras' TensorFlow backend reads `_keras_logits` of the probabilities
    (`_get_logits` in keras/src/backend/tensorflow/nn.py) and takes the
    exact log-softmax path with them, as Keras' own softmax sets it.
    """
    outputs._keras_logits = logits


def operation_of(tensor):
    """The operation (a layer, for one) that made a symbolic tensor (Keras
    3.15: `KerasTensor._keras_history.operation`)."""
    return tensor._keras_history.operation


def is_emptied(variable) -> bool:
    """Whether JAX's trainer has emptied `variable` for a jitted step, which
    then reads it only from its state (`KerasVariable._value`, 3.15)."""
    return getattr(variable, "_value", True) is None


def is_functorch_wrapped(tensor) -> bool:
    """Whether `tensor` is wrapped by a `torch.func` transform (PyTorch 2.13)."""
    import torch

    return torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def tape_could_record() -> bool:
    """Whether a TensorFlow tape may record now (TensorFlow 2.21)."""
    from tensorflow.python.eager import record

    return record.could_possibly_record()


def tape_stop_recording():
    """A context in which no TensorFlow tape records (TensorFlow 2.21)."""
    from tensorflow.python.eager import record

    return record.stop_recording()


def leave_out_of_autograph(package: str) -> None:
    """Makes TensorFlow's AutoGraph call `package`'s functions as written,
    as it calls Keras' (TensorFlow 2.21).

    `CONVERSION_RULES` in tensorflow/python/autograph/core/config.py lists
    the packages AutoGraph leaves alone; the first rule that matches a
    function's module decides.
    """
    from tensorflow.python.autograph.core import config

    rules = config.CONVERSION_RULES
    if not any(getattr(rule, "_prefix", None) == package for rule in rules):
        config.CONVERSION_RULES = (config.DoNotConvert(package), *rules)


def in_xla_context() -> bool:
    """Whether TensorFlow traces for XLA, `jit_compile=True` (TensorFlow 2.21)."""
    import tensorflow as tf

    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - a TensorFlow that moved it
        return False
    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph()
    )


def torch_forward_mode_active() -> bool:
    """Whether a PyTorch forward-mode AD level is open (PyTorch 2.13)."""
    from torch.autograd import forward_ad

    return forward_ad._current_level >= 0
