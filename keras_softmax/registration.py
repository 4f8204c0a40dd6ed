"""Makes "stable_softmax" and "stable_log_softmax" work as activation names.

`keras.activations.get` resolves a string only from Keras' built-in table
(`_keras_internals.activation_table`) and ignores registered custom
objects, so registration alone does not make
`Dense(..., activation="stable_softmax")` work. The names are added to that
table, and the result is checked through the public API: if a future Keras
stops reading the table, importing keras_softmax warns, and the test suite,
which turns that warning into an error, fails. (The check stops short of
`keras.activations.serialize`, which imports TensorFlow wherever it is
installed, whatever the backend: seconds at every import on PyTorch and
JAX. The test suite checks the round trip through a saved model.)
"""

import warnings

import keras

from keras_softmax import _keras_internals
from keras_softmax.softmax import stable_log_softmax
from keras_softmax.softmax import stable_softmax

ACTIVATIONS = {
    "stable_softmax": stable_softmax,
    "stable_log_softmax": stable_log_softmax,
}


def register_activations() -> None:
    """Registers the activation names; warns if Keras does not resolve them."""
    table = _keras_internals.activation_table()
    for name, fn in ACTIVATIONS.items():
        # Saved models name the function by its registered name.
        keras.saving.register_keras_serializable(package="keras_softmax")(fn)
        if table is not None and table.get(name, fn) is fn:
            table[name] = fn

    unresolved = [name for name, fn in ACTIVATIONS.items() if not _resolves(name, fn)]
    if unresolved:
        warnings.warn(
            f"keras_softmax could not register the activation names "
            f"{unresolved} with Keras {keras.__version__}: "
            f"`activation={unresolved[0]!r}` will not work. Pass the function "
            "itself, e.g. `activation=keras_softmax.stable_softmax`.",
            RuntimeWarning,
            stacklevel=2,
        )


def _resolves(name, fn):
    """Whether Keras resolves `name`, and the name saved models give `fn`,
    to `fn`."""
    try:
        saved_as = keras.saving.get_registered_name(fn)
        return (
            keras.activations.get(name) is fn
            and keras.saving.get_registered_object(saved_as) is fn
        )
    except (TypeError, ValueError):
        return False
