"""keras_softmax where TensorFlow is not installed: PyTorch and JAX users.

Keras 3 needs no TensorFlow on those backends, and neither does the
library: `pip install 'keras-softmax[torch]'` brings none. Fresh processes
run the public API, and the demo, with `import tensorflow` failing as it
does where TensorFlow is not installed; what exists only on TensorFlow (a
SavedModel, `TFSMLayer`, the ONNX and LiteRT exports from it,
`tf.distribute`) raises an error that names the extra to install.
"""

import sys
import textwrap

import keras
import numpy as np
import pytest
from support.backends import BACKEND
from support.backends import exports
from support.backends import once
from support.fresh_process import check_python
from support.fresh_process import run_python

from keras_softmax import _extras
from keras_softmax.demo import digits
from keras_softmax.demo import distributed
from keras_softmax.demo import serving

# The first line of every script: with None in `sys.modules`, `import
# tensorflow` raises ModuleNotFoundError, as where it is not installed.
WITHOUT_TENSORFLOW = 'import sys; sys.modules["tensorflow"] = None\n'
# The end of every script: nothing imported TensorFlow after all.
NO_TENSORFLOW_LOADED = """
assert sys.modules.get("tensorflow") is None
loaded = sorted(m for m in sys.modules if m.startswith("tensorflow."))
assert not loaded, loaded
print("no tensorflow")
"""
TENSORFLOW_EXTRA = "pip install 'keras-softmax[tensorflow]'"

# Tiny shapes and one epoch: whether each call runs, and gives the values
# it gives on TensorFlow, not how well it trains.
PUBLIC_API = """
import functools
import os
import tempfile

import keras
import numpy as np

import keras_softmax
from keras_softmax import calibration

BACKEND = keras.backend.backend()
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
to_numpy = keras.ops.convert_to_numpy


def grad(fn, *args):
    # The gradients of the scalar fn(*args), by the backend's own autodiff.
    if BACKEND == "jax":
        import jax

        return jax.grad(fn, argnums=tuple(range(len(args))))(*args)
    import torch

    tensors = [torch.tensor(a, requires_grad=True) for a in args]
    fn(*tensors).backward()
    return [t.grad for t in tensors]


# The functions and the layer, masked and tempered, against NumPy.
x = rng.normal(size=(3, 5)).astype("float32") * 10
mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 0, 1]], bool)
z = np.where(mask, x / 2.0, -np.inf)
expected = np.exp(z - z.max(-1, keepdims=True))
expected /= expected.sum(-1, keepdims=True)
probs = keras_softmax.stable_softmax(x, mask=mask, temperature=2.0)
np.testing.assert_allclose(to_numpy(probs), expected, rtol=1e-5, atol=1e-7)
log_probs = keras_softmax.stable_log_softmax(x, mask=mask, temperature=2.0)
with np.errstate(divide="ignore"):
    np.testing.assert_allclose(to_numpy(log_probs), np.log(expected), rtol=1e-5)
layer = keras_softmax.StableSoftmax(temperature=2.0)
probs = layer(x, mask=mask)
np.testing.assert_allclose(to_numpy(probs), expected, rtol=1e-5, atol=1e-7)

# The activation by name: fit, save as .keras, load, same predictions.
features = rng.normal(size=(32, 4)).astype("float32")
classes = np.argmax(features[:, :3], axis=1)  # a rule to learn, for calibration
dense = keras.layers.Dense(3, activation="stable_softmax")
model = keras.Sequential([keras.Input((4,)), dense])
assert dense.activation is keras_softmax.stable_softmax
model.compile(
    optimizer=keras.optimizers.Adam(0.05),
    loss="sparse_categorical_crossentropy",
    metrics=[calibration.ExpectedCalibrationError()],
)
model.fit(features, classes, batch_size=8, epochs=1, verbose=0)
with tempfile.TemporaryDirectory() as tmp:
    model.save(os.path.join(tmp, "model.keras"))
    reloaded = keras.saving.load_model(os.path.join(tmp, "model.keras"))
np.testing.assert_allclose(reloaded.predict(features, verbose=0),
                           model.predict(features, verbose=0), rtol=1e-6)

# Attention, values and gradients: the default path against
# flash_attention=True, which on a CPU takes the blocks wherever the
# backend's kernel cannot serve (always on JAX; at T < 1 on PyTorch).
q, k, v = (rng.normal(size=(1, 6, 2, 4)).astype("float32") for _ in range(3))
weights = np.arange(48, dtype="float32").reshape(1, 6, 2, 4)


def attention_loss(q, k, v, **options):
    out = keras_softmax.dot_product_attention(q, k, v, is_causal=True, **options)
    return keras.ops.sum(out * keras.ops.convert_to_tensor(weights))


for temperature in (1.0, 0.5):
    runs = []
    for flash in (None, True):
        loss = functools.partial(
            attention_loss, flash_attention=flash, temperature=temperature
        )
        runs.append([loss(q, k, v), *grad(loss, q, k, v)])
    for default, flash in zip(*runs, strict=True):
        np.testing.assert_allclose(
            to_numpy(flash), to_numpy(default), rtol=1e-4, atol=1e-5
        )

tokens = rng.normal(size=(8, 5, 4)).astype("float32")
inputs = keras.Input((5, 4))
attention = keras_softmax.StableMultiHeadAttention(num_heads=2, key_dim=2)
attended = attention(inputs, inputs)
attention_model = keras.Model(inputs, attended)
attention_model.compile(optimizer="adam", loss="mse")
attention_model.fit(tokens, tokens, epochs=1, verbose=0)

# The large-vocabulary loss, in two chunks, against NumPy; its gradients;
# and the head that trains with it.
hidden = rng.normal(size=(6, 4)).astype("float32")
kernel = rng.normal(size=(4, 7)).astype("float32")
labels = rng.integers(0, 7, size=6)


def cross_entropy(hidden, kernel):
    return keras_softmax.linear_cross_entropy(labels, hidden, kernel, chunk_size=4)


logits = hidden @ kernel
top = logits.max(-1)
lse = np.log(np.exp(logits - top[:, None]).sum(-1)) + top
np.testing.assert_allclose(to_numpy(cross_entropy(hidden, kernel)),
                           np.mean(lse - logits[np.arange(6), labels]), rtol=1e-5)
d_hidden, d_kernel = (to_numpy(g) for g in grad(cross_entropy, hidden, kernel))
assert np.all(np.isfinite(d_hidden)) and np.any(d_kernel != 0)

head = keras_softmax.StableSoftmaxHead(7)
head_model = keras.Sequential([keras.Input((4,)), head])
head_model.compile(optimizer="adam", loss=head.loss())
head_model.fit(hidden, labels, epochs=1, verbose=0)
predicted = head_model.predict(hidden, verbose=0)
np.testing.assert_allclose(predicted.sum(-1), 1.0, rtol=1e-5)

# Calibration of the model above.
logits = calibration.logits_model(model).predict(features, verbose=0)
found = calibration.fit_temperature(logits, classes)
calibrated = calibration.calibrate(model, features, classes)
assert 1e-3 < found < 1e3  # inside the search's bounds: the logits carry signal
np.testing.assert_allclose(calibrated.layers[-1].temperature, found, rtol=1e-4)
probs = calibrated.predict(features, verbose=0)
ece = calibration.expected_calibration_error(probs, classes)
assert 0 <= ece <= 1
"""


@once
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_public_api_runs_without_tensorflow(backend):
    script = WITHOUT_TENSORFLOW + PUBLIC_API + NO_TENSORFLOW_LOADED
    output = check_python("-c", script, env={"KERAS_BACKEND": backend}, timeout=300)
    assert output.splitlines()[-1] == "no tensorflow"


@once
def test_demo_runs_on_pytorch_without_tensorflow_and_says_what_it_skips(tmp_path):
    # As `python -m`, with TensorFlow blocked first: both entry points'
    # help, then one short run of the demo (one epoch: below its bar).
    script = WITHOUT_TENSORFLOW + textwrap.dedent(
        f"""
        import runpy
        for module in ("keras_softmax.demo", "keras_softmax.demo.distributed"):
            sys.argv = [module, "--help"]
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as exit:
                assert exit.code == 0, exit.code
        sys.argv = ["keras-softmax-demo", "--epochs", "1", "--quiet",
                    "--output-dir", {str(tmp_path)!r}]
        try:
            runpy.run_module("keras_softmax.demo", run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            print("exit", exit.code)
        """
    )
    result = run_python(
        "-c", script + NO_TENSORFLOW_LOADED, env={"KERAS_BACKEND": "torch"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "no tensorflow"
    assert sum("usage:" in line for line in lines) == 2
    assert any(line.split()[:2] == ["keras", "0.00e+00"] for line in lines)
    for fmt in ("saved_model", "onnx", "litert"):
        assert f"  {fmt:12s} skipped: exporting runs on the TensorFlow backend" in lines
    assert serving.verify(tmp_path)["tensorflow_version"] is None
    assert lines[-2] == "exit 1" and "below the bar" in lines[-3]


@once
def test_tensorflow_backend_without_tensorflow_names_the_extra():
    # Keras' default backend: what a user who forgot KERAS_BACKEND gets.
    result = run_python(
        "-c",
        WITHOUT_TENSORFLOW + "import keras_softmax",
        env={"KERAS_BACKEND": "tensorflow"},
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: Keras' backend"), last
    assert TENSORFLOW_EXTRA in last and "KERAS_BACKEND" in last


@pytest.fixture
def without_tensorflow(monkeypatch):
    """`import tensorflow` fails for the test, as where it is not installed."""
    monkeypatch.setitem(sys.modules, "tensorflow", None)


def _model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model(np.zeros((1, 4), "float32"))
    return model


def test_saved_model_export_without_tensorflow_names_the_extra(tmp_path, monkeypatch):
    model = _model()  # built first: on TensorFlow's backend, Keras needs it
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ModuleNotFoundError) as error:
        serving.save(model, tmp_path / "out", "model", formats=("keras", "saved_model"))
    assert str(error.value) == f"SavedModel export needs TensorFlow: {TENSORFLOW_EXTRA}"
    assert not (tmp_path / "out").exists()  # checked before anything is written


@pytest.mark.parametrize(
    "serve, feature",
    [
        (serving.predict_saved_model_fresh, "Serving a SavedModel"),
        (serving.predict_tfsm_layer, "keras.layers.TFSMLayer"),
    ],
)
def test_serving_a_saved_model_without_tensorflow_names_the_extra(
    serve, feature, tmp_path, without_tensorflow
):
    with pytest.raises(ModuleNotFoundError) as error:
        serve(tmp_path, {"x": np.zeros((1, 4), "float32")})
    assert str(error.value) == f"{feature} needs TensorFlow: {TENSORFLOW_EXTRA}"


@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="tf.distribute is the TensorFlow backend's"
)
def test_data_parallel_on_tensorflow_without_it_names_the_extra(without_tensorflow):
    with pytest.raises(ModuleNotFoundError, match=r"tf\.distribute needs TensorFlow"):
        distributed.data_parallel(2)


@exports
@pytest.mark.parametrize(
    "fmt, module, needs",
    [
        ("onnx", "tf2onnx", "ONNX export needs tf2onnx"),
        ("litert", "ai_edge_litert", "LiteRT export needs LiteRT (ai-edge-litert)"),
    ],
)
def test_demo_skips_an_export_whose_exporter_is_missing_and_names_the_extra(
    fmt, module, needs, monkeypatch
):
    monkeypatch.setitem(sys.modules, module, None)
    assert (
        digits._why_not_exported(fmt) == f"{needs}: pip install 'keras-softmax[export]'"
    )
    assert digits._why_not_exported("keras") is None


def test_missing_message_names_the_extra_of_the_module_asked_for():
    # tf2onnx imported without TensorFlow: the `export` extra brings both.
    error = ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
    assert (
        _extras.missing_message(error, "ONNX export", "export")
        == "ONNX export needs TensorFlow: pip install 'keras-softmax[export]'"
    )
    assert _extras.missing_message(error, "SavedModel export") == (
        f"SavedModel export needs TensorFlow: {TENSORFLOW_EXTRA}"
    )


def test_missing_message_leaves_other_missing_modules_alone():
    # A module that no extra installs, as from a broken installation: the
    # error is not about an extra, and `require` raises it as it is.
    error = ModuleNotFoundError("No module named 'yaml'", name="yaml")
    assert _extras.missing_message(error, "anything") is None
