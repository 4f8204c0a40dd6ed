"""The thin backend edges of the math: what `keras.ops` cannot tell.

Everything in `softmax.py` and `_checks.py` that depends on the backend
asks here. (The demo, serving and the tests name backends for their own
reasons: exports start from TensorFlow, for one.)
"""

import keras


def takes_fused_path() -> bool:
    """Whether the backend's own fused softmax kernel is worth a branch here.

    True where ops run as separate kernels: TensorFlow eagerly or in a
    `tf.function` without XLA (which is how Keras' `fit` and `predict` run
    on a CPU, and how `model.export` traces), and PyTorch eagerly. There
    the fused kernel does in one pass what the exact formula does in
    several, and a cheap check picks the exact path for the rare slice that
    needs it.

    False where a compiler fuses the exact formula into as few passes as a
    softmax anyway, and a branch would only cost: XLA (`jit_compile=True`),
    JAX (every JAX call is compiled) and `torch.compile`.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return not _in_xla_context()
    if backend == "torch":
        import torch

        return not torch.compiler.is_compiling()
    return False


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

        return not torch.compiler.is_compiling()
    return True


def _in_xla_context() -> bool:
    """Whether TensorFlow is tracing for XLA (`jit_compile=True`)."""
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
