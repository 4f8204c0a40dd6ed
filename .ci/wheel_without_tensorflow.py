"""Tries the wheel installed with the `torch` or `jax` extra: no TensorFlow.

`.ci/check_wheel` installs `keras-softmax[torch]`, then `[jax]`, each in a
fresh virtualenv, and runs this file with `KERAS_BACKEND` set to that
backend, from outside the repository. Neither extra may bring TensorFlow,
and the library must run without it.
"""

import importlib.metadata
import importlib.util
import pathlib
import subprocess
import sys

import keras
import numpy as np

import keras_softmax

backend = keras.backend.backend()
installed = pathlib.Path(keras_softmax.__file__).resolve()
assert "site-packages" in installed.parts, f"imported the checkout: {installed}"
distributions = sorted(
    d.metadata["Name"]
    for d in importlib.metadata.distributions()
    if d.metadata["Name"].lower().startswith(("tensorflow", "tensorboard"))
)
assert not distributions, f"keras-softmax[{backend}] installed {distributions}"
assert importlib.util.find_spec("tensorflow") is None

to_numpy = keras.ops.convert_to_numpy
probs = to_numpy(keras_softmax.stable_softmax([[1000.0, 1001.0, 1002.0]]))
expected = np.exp([-2.0, -1.0, 0.0]) / np.sum(np.exp([-2.0, -1.0, 0.0]))
np.testing.assert_allclose(probs, [expected], rtol=1e-6)

# Two chunks of tokens: the scan that once imported TensorFlow everywhere.
rng = np.random.default_rng(0)
hidden = rng.normal(size=(6, 4)).astype("float32")
kernel = rng.normal(size=(4, 7)).astype("float32")
labels = rng.integers(0, 7, size=6)
logits = hidden @ kernel
top = logits.max(-1)
lse = np.log(np.exp(logits - top[:, None]).sum(-1)) + top
loss = keras_softmax.linear_cross_entropy(labels, hidden, kernel, chunk_size=4)
np.testing.assert_allclose(
    to_numpy(loss), np.mean(lse - logits[np.arange(6), labels]), rtol=1e-5
)

# The default path, and the blocks (flash_attention=True on a CPU, below a
# temperature of 1), give the same outputs.
q, k, v = (rng.normal(size=(1, 6, 2, 4)).astype("float32") for _ in range(3))
outputs = [
    to_numpy(
        keras_softmax.dot_product_attention(
            q, k, v, is_causal=True, temperature=0.5, flash_attention=flash
        )
    )
    for flash in (None, True)
]
np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)

# The demo's console script prints its help without TensorFlow too.
script = pathlib.Path(sys.executable).parent / "keras-softmax-demo"
result = subprocess.run([script, "--help"], capture_output=True, text=True)
assert result.returncode == 0 and "--output-dir" in result.stdout, result.stderr

assert "tensorflow" not in sys.modules
loaded = [m for m in sys.modules if m.startswith("tensorflow.")]
assert not loaded, loaded
print(
    f"keras_softmax {keras_softmax.__version__} from the wheel on {backend}, "
    "without TensorFlow: stable_softmax, linear_cross_entropy, "
    "dot_product_attention and keras-softmax-demo --help ok"
)
