"""The thin backend edges: the only places that name a backend."""

import functools

import keras


def compiling() -> bool:
    """Whether the current trace is being compiled by XLA.

    A compiler fuses the exact path into as few passes as the backend's own
    softmax, while the branch that picks the fused kernel costs it a pass.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if tf.executing_eagerly():
            return False
        try:
            from tensorflow.python.ops import control_flow_util
        except ImportError:
            return False
        return control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()
        )
    if keras.backend.backend() == "jax":
        return True
    return False


def as_graph(fn):
    """Runs `fn` as a TensorFlow graph when called eagerly on TensorFlow.

    A graph reuses the buffers of intermediates in place and runs
    independent reductions side by side, where eager ops allocate a fresh
    output each and run one after another.
    """
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    graphs = {}

    @functools.wraps(fn)
    def run(x, *args, **kwargs):
        if not tf.executing_eagerly():
            return fn(x, *args, **kwargs)
        # One graph per rank of each tensor: retracing then relaxes sizes
        # but keeps ranks known, which shape checks downstream rely on.
        ranks = tuple(len(a.shape) if hasattr(a, "shape") else None for a in args)
        key = (len(x.shape), ranks)
        if key not in graphs:
            graphs[key] = tf.function(fn, reduce_retracing=True, autograph=False)
        return graphs[key](x, *args, **kwargs)

    return run
