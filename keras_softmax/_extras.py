"""The optional dependencies, each with the extra that installs it.

keras_softmax itself needs only Keras and NumPy. Keras needs a backend, and
what the demo does with TensorFlow (a SavedModel, the ONNX and LiteRT
exports from TensorFlow, serving them, `tf.distribute`) needs TensorFlow and
the exporters. `require` imports such a module, or raises a
`ModuleNotFoundError` that names the extra to install, rather than a bare
"No module named 'tensorflow'".
"""

import importlib
from types import ModuleType
from typing import NoReturn

# Each optional top-level module: its name in messages, and the extra that
# installs it (pyproject.toml).
EXTRAS = {
    "tensorflow": ("TensorFlow", "tensorflow"),
    "jax": ("JAX", "jax"),
    "torch": ("PyTorch", "torch"),
    "tf2onnx": ("tf2onnx", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "ai_edge_litert": ("LiteRT (ai-edge-litert)", "export"),
    "sklearn": ("scikit-learn", "demo"),
}


def require(module: str, feature: str) -> ModuleType:
    """Imports `module` for `feature`; if it is missing, says what to install.

    Args:
        module: The module to import, whose top-level package is in
            `EXTRAS`, e.g. `"tensorflow"` or `"ai_edge_litert.interpreter"`.
        feature: What needs it, as the message's subject, e.g.
            `"SavedModel export"`.

    Returns:
        The imported module.

    Raises:
        ModuleNotFoundError: "<feature> needs TensorFlow: pip install
            'keras-softmax[tensorflow]'" where `module`, or an optional
            module it imports, is not installed; the extra is `module`'s.
            Any other import error (a broken installation) as it is.
    """
    extra = EXTRAS[_top_level(module)][1]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        message = missing_message(error, feature, extra)
        if message is None:
            raise
        raise ModuleNotFoundError(message, name=error.name) from error


def missing_message(
    error: ModuleNotFoundError, feature: str, extra: str | None = None
) -> str | None:
    """The message for `error` if an optional module is what is missing.

    `extra` defaults to the one that installs the missing module. None
    where the missing module is not an optional one: that error is not
    about an extra.
    """
    top = _top_level(error.name or "")
    if top not in EXTRAS:
        return None
    name, own_extra = EXTRAS[top]
    return f"{feature} needs {name}: pip install 'keras-softmax[{extra or own_extra}]'"


def raise_missing_backend(error: ModuleNotFoundError) -> NoReturn:
    """Raises `error`, Keras' failed import, naming the backend's extra."""
    message = missing_message(
        error, "Keras' backend (KERAS_BACKEND, TensorFlow by default)"
    )
    if message is None:
        raise error
    raise ModuleNotFoundError(
        f"{message}, or set KERAS_BACKEND to one that is installed", name=error.name
    ) from error


def _top_level(module: str) -> str:
    return module.partition(".")[0]
