"""The backend edges of the math: what `keras.ops` cannot tell.

One module per framework (`tensorflow.py`, `jax.py`, `torch.py`), each a
small class over the same surface, `base.Edge`, whose methods are the
`keras.ops` answers that a framework keeps where they serve it. As Keras
picks `keras/src/backend/<name>/` once, the edge of the running backend is
made once (and again after `keras.config.set_backend`, which switches it),
and `_backend.scan(...)` reads the running backend's `scan`. Only
`tensorflow.py` (and the private-API ledger, `_keras_internals`) imports
TensorFlow, so PyTorch and JAX users need none.

Everything in the library that depends on the backend asks here. (The
demo, serving and the tests name backends for their own reasons: exports
start from TensorFlow, for one.)
"""

import functools
import importlib

import keras

from keras_softmax._backend.base import SURFACE
from keras_softmax._backend.base import AttentionDevice  # noqa: F401 (re-exported)
from keras_softmax._backend.base import Edge

# The frameworks with an edge of their own; any other backend (NumPy,
# OpenVINO) gets `keras.ops`' answers.
_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
_EDGES: dict[str, Edge] = {}


def edge() -> Edge:
    """The edge of the backend Keras runs now, made on first use."""
    name = keras.backend.backend()
    chosen = _EDGES.get(name)
    if chosen is None:
        module = _MODULES.get(name)
        if module is None:
            chosen = Edge()
        else:
            chosen = importlib.import_module(f"{__name__}.{module}").EDGE
        _EDGES[name] = chosen
    return chosen


def __getattr__(name: str):
    # `_backend.scan` is the running backend's: read on every use, so that a
    # switched backend still resolves.
    if name in SURFACE:
        return getattr(edge(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def graph_when_large(fn):
    """`fn`, run as a graph on large eager inputs where that pays
    (`Edge.graph_when_large`), decided on each call for the running backend.
    """
    runners = {}

    @functools.wraps(fn)
    def run(*args):
        chosen = edge()
        runner = runners.get(id(chosen))
        if runner is None:
            runner = runners[id(chosen)] = chosen.graph_when_large(fn)
            # For a look at what TensorFlow traced.
            run.graphs = getattr(runner, "graphs", {})
        return runner(*args)

    run.graphs = {}
    return run


# TensorFlow's edge is made on import: its module leaves the library out of
# AutoGraph, which must hold before a user's `tf.function` first traces a
# call of it.
if keras.backend.backend() == "tensorflow":
    edge()
