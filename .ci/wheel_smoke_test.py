"""Tries the built wheel the way a user gets it: installed, not the checkout.

`.ci/run` builds the wheel, installs it with its dependencies (not editable)
into a fresh virtualenv, and runs this file with that virtualenv's Python
from outside the repository, so `import keras_softmax` can only find the
installed copy.
"""

import importlib.metadata
import importlib.resources
import pathlib
import subprocess
import sys

import keras
import numpy as np

import keras_softmax
from keras_softmax import stable_softmax
from keras_softmax.calibration import fit_temperature
from keras_softmax.demo import quiet

installed = pathlib.Path(keras_softmax.__file__).resolve()
assert "site-packages" in installed.parts, f"imported the checkout: {installed}"
assert keras_softmax.__version__ == importlib.metadata.version("keras-softmax")
assert (importlib.resources.files("keras_softmax") / "py.typed").is_file()

probs = keras.ops.convert_to_numpy(stable_softmax([[1000.0, 1001.0, 1002.0]]))
expected = np.exp([-2.0, -1.0, 0.0]) / np.sum(np.exp([-2.0, -1.0, 0.0]))
np.testing.assert_allclose(probs, [expected], rtol=1e-6)

dense = keras.layers.Dense(3, activation="stable_softmax")
assert dense.activation is stable_softmax
rows = keras.ops.convert_to_numpy(dense(np.ones((2, 4), "float32")))
np.testing.assert_allclose(rows.sum(axis=1), 1.0, rtol=1e-6)

# The calibration subpackage is in the wheel too.
assert round(fit_temperature(np.array([[2.0, 0.0]] * 4), [0, 0, 0, 1]), 6) == 1.820478

# The console script is installed, and prints its help on stdout, free of
# TensorFlow's log lines (which go to stderr, while Keras is imported).
script = pathlib.Path(sys.executable).parent / "keras-softmax-demo"
result = subprocess.run([script, "--help"], capture_output=True, text=True)
assert result.returncode == 0 and "--output-dir" in result.stdout, result.stderr
noise = [
    line for line in result.stdout.splitlines() if quiet.is_tensorflow_log_line(line)
]
assert not noise, noise

print(
    f"keras_softmax {keras_softmax.__version__} from the wheel: import, "
    f"stable_softmax, Dense(activation='stable_softmax'), calibration, py.typed "
    f"and keras-softmax-demo --help ok ({installed.parent})"
)
