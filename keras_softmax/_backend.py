"""The thin backend edges: the only places that name a backend."""

import functools

import keras


def eager() -> bool:
    """Whether ops run one by one now, rather than being traced.

    Only then does a branch between the fused kernel and the exact path pay
    off. A traced program (`fit`, `tf.function`, XLA, `model.export`, JAX's
    `jit`) gets the exact path alone: compilers fuse it into as few passes as
    a softmax, and exporters convert it without control flow.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    if backend == "torch":
        import torch

        return not torch.compiler.is_compiling()
    # JAX runs each op of an eager call as its own compiled program, where
    # a branch costs more than the passes it saves.
    return False


def losses_read_logits() -> bool:
    """Whether Keras' cross-entropy losses read `_keras_logits` here.

    Only the TensorFlow backend does; elsewhere attaching them would only
    cost work (and `torch.compile` a graph break).
    """
    return keras.backend.backend() == "tensorflow"


def as_graph(fn):
    """Runs `fn` as a cached TensorFlow graph; other backends call it as is.

    A graph reuses the buffers of intermediates in place and runs
    independent reductions side by side, where eager ops allocate a fresh
    output each and run one after another.
    """
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    graphs = {}

    @functools.wraps(fn)
    def run(x, *args):
        # One graph per rank of each tensor: retracing then relaxes sizes
        # but keeps ranks known, which shape checks downstream rely on.
        ranks = tuple(len(a.shape) if hasattr(a, "shape") else None for a in args)
        key = (len(x.shape), ranks)
        if key not in graphs:
            graphs[key] = tf.function(fn, reduce_retracing=True, autograph=False)
        return graphs[key](x, *args)

    return run
