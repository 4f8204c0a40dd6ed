"""Inside Keras: activation names, masks, saving, loss fusion, dtypes, training."""

import inspect
import json
import textwrap
import warnings

import keras
import numpy as np
import pytest
from support.backends import BACKEND
from support.backends import compiled
from support.backends import traced
from support.fresh_process import check_python
from support.references import assert_close_to_reference
from support.references import log_softmax as reference_log_softmax
from support.references import softmax as reference_softmax
from support.references import to_numpy

import keras_softmax
from keras_softmax import StableSoftmax
from keras_softmax import stable_log_softmax
from keras_softmax import stable_softmax


def _run_fresh(code):
    """Runs `code` in a new interpreter with warnings as errors; returns stdout."""
    return check_python(
        "-W", "error::RuntimeWarning", "-c", textwrap.dedent(code), timeout=300
    )


def test_activation_names_work_in_a_fresh_interpreter_and_through_tf_keras():
    out = _run_fresh(
        """
        import keras, numpy as np, tensorflow as tf
        import keras_softmax
        x = np.array([[1.0, 2.0, 3.0]], np.float32)
        dense = keras.layers.Dense(3, activation="stable_softmax")
        assert dense.activation is keras_softmax.stable_softmax
        assert tf.keras.layers.Dense(3, activation="stable_softmax").activation \\
            is keras_softmax.stable_softmax
        assert keras.activations.get("stable_softmax") is keras_softmax.stable_softmax
        assert tf.keras.activations.get("stable_log_softmax") \\
            is keras_softmax.stable_log_softmax
        layer = keras.layers.Activation("stable_log_softmax")
        print(float(np.exp(layer(x)).sum()))
        """
    )
    assert abs(float(out) - 1.0) < 1e-6


def test_activation_names_are_unknown_before_the_import():
    # Guards the test above: Keras must not resolve the name on its own.
    _run_fresh(
        """
        import keras
        try:
            keras.activations.get("stable_softmax")
        except ValueError:
            pass
        else:
            raise SystemExit("Keras resolved stable_softmax by itself")
        """
    )


def test_activation_functions_round_trip_through_keras_serialization():
    # The half of the check that importing leaves out: `serialize` imports
    # TensorFlow.
    for fn in (keras_softmax.stable_softmax, keras_softmax.stable_log_softmax):
        assert keras.activations.deserialize(keras.activations.serialize(fn)) is fn


@pytest.mark.skipif(BACKEND == "tensorflow", reason="its backend imports it")
def test_importing_on_jax_or_pytorch_loads_no_tensorflow():
    # TensorFlow is installed here, as on many machines that train on
    # another backend: loading it cost 2 s and 450 MiB at every import.
    out = _run_fresh(
        """
        import sys
        import keras_softmax
        print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))
        """
    )
    assert out.strip() == "[]"


def test_registration_warns_loudly_if_keras_stops_reading_its_table(monkeypatch):
    from keras_softmax import _keras_internals
    from keras_softmax import registration

    monkeypatch.setattr(_keras_internals, "activation_table", lambda: {})
    monkeypatch.setattr(keras.activations, "get", lambda name: None)
    with pytest.warns(RuntimeWarning, match="could not register"):
        registration.register_activations()


def test_layer_consumes_the_mask_of_an_embedding():
    tokens = np.array([[3, 5, 0, 0], [7, 0, 0, 0]])
    embedding = keras.layers.Embedding(10, 3, mask_zero=True)
    dense = keras.layers.Dense(1)
    inputs = keras.Input((4,), dtype="int32")
    hidden = embedding(inputs)
    logits = keras.layers.TimeDistributed(dense)(hidden)
    probs = StableSoftmax(axis=1)(logits)
    model = keras.Model(inputs, probs)
    out = keras.ops.convert_to_numpy(model(tokens))[..., 0]
    np.testing.assert_array_equal(out[tokens == 0], 0.0)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)


def test_layer_consumes_the_mask_of_a_masking_layer():
    x = np.array([[[1.0], [2.0], [0.0]], [[0.5], [0.0], [0.0]]], np.float32)
    inputs = keras.Input((3, 1))
    masked = keras.layers.Masking(0.0)(inputs)
    probs = StableSoftmax(axis=1)(masked)
    out = keras.ops.convert_to_numpy(keras.Model(inputs, probs)(x))[..., 0]
    np.testing.assert_array_equal(out, [[out[0, 0], out[0, 1], 0.0], [1.0, 0.0, 0.0]])
    assert_close_to_reference(out[:1, :2], reference_softmax([[1.0, 2.0]]))


def test_trainable_temperature_is_learned_by_fit_and_stays_positive():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 4)).astype("float32") * 4
    # Labels drawn from softmax(x / 2): the best temperature is 2.
    p = reference_softmax(x, temperature=2.0)
    y = np.array([rng.choice(4, p=row) for row in p])
    layer = StableSoftmax(temperature=0.5, trainable_temperature=True)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, layer(inputs))
    model.compile(keras.optimizers.Adam(0.05), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=30, batch_size=128, verbose=0)
    learned = float(keras.ops.convert_to_numpy(layer.current_temperature()))
    assert 1.6 < learned < 2.5
    assert [w.name for w in layer.trainable_weights] == ["log_temperature"]


def test_get_config_round_trips():
    layer = StableSoftmax(axis=(1, 2), temperature=0.25, trainable_temperature=True)
    clone = StableSoftmax.from_config(json.loads(json.dumps(layer.get_config())))
    assert clone.axis == (1, 2)
    assert clone.temperature == 0.25
    assert clone.trainable_temperature is True


def _models():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    by_string = keras.Model(
        inputs, keras.layers.Dense(4, activation="stable_softmax")(hidden)
    )
    tempered = keras.Model(
        inputs,
        keras.layers.Dense(4, activation=StableSoftmax(temperature=0.5))(hidden),
    )
    trainable = keras.Model(
        inputs,
        StableSoftmax(temperature=1.5, trainable_temperature=True)(
            keras.layers.Dense(4)(hidden)
        ),
    )
    tokens = keras.Input((5,), dtype="int32")
    logits = keras.layers.TimeDistributed(keras.layers.Dense(1))(
        keras.layers.Embedding(9, 3, mask_zero=True)(tokens)
    )
    masked = keras.Model(tokens, StableSoftmax(axis=1, temperature=0.7)(logits))
    return {
        "by_string": by_string,
        "tempered": tempered,
        "trainable": trainable,
        "masked": masked,
    }


def test_models_save_to_keras_files_and_load_in_a_fresh_process(tmp_path):
    rng = np.random.default_rng(1)
    inputs = {
        "x": rng.normal(size=(3, 6)).astype("float32"),
        "tokens": np.array([[1, 2, 0, 0, 0], [4, 5, 6, 7, 0], [8, 0, 0, 0, 0]]),
    }
    expected = {}
    for name, model in _models().items():
        if name == "trainable":
            layer = model.layers[-1]
            layer.log_temperature.assign(np.log(0.8))  # not the initial value
        x = inputs["tokens"] if name == "masked" else inputs["x"]
        expected[name] = keras.ops.convert_to_numpy(model(x))
        model.save(tmp_path / f"{name}.keras")
    np.savez(tmp_path / "inputs.npz", **inputs)
    out = _run_fresh(
        f"""
        import json, numpy as np, keras
        import keras_softmax
        inputs = np.load({str(tmp_path / "inputs.npz")!r})
        outputs = {{}}
        for name in {sorted(expected)!r}:
            model = keras.saving.load_model(
                {str(tmp_path)!r} + f"/{{name}}.keras", safe_mode=True
            )
            x = inputs["tokens"] if name == "masked" else inputs["x"]
            outputs[name] = keras.ops.convert_to_numpy(model(x)).tolist()
        print(json.dumps(outputs))
        """
    )
    loaded = json.loads(out)
    for name, values in expected.items():
        np.testing.assert_array_equal(np.asarray(loaded[name], np.float32), values)


# Keras' TensorFlow backend alone reads `_keras_logits`; on JAX and PyTorch a
# loss on probabilities is clipped at -log(1e-7), as for the built-in softmax.
FUSES_LOSS = BACKEND == "tensorflow"


def _builtin_loss(loss, y, logits):
    return loss(y, keras.activations.softmax(keras.ops.convert_to_tensor(logits)))


def test_loss_fusion_charges_about_1000_for_a_confident_mistake_in_eager_mode():
    logits = keras.ops.convert_to_tensor([[1000.0, 0.0]])
    probs = stable_softmax(logits)
    dense = keras.losses.categorical_crossentropy(np.array([[0.0, 1.0]]), probs)
    sparse = keras.losses.sparse_categorical_crossentropy(np.array([1]), probs)
    if FUSES_LOSS:
        np.testing.assert_allclose(dense, [1000.0], rtol=1e-6)
        np.testing.assert_allclose(sparse, [1000.0], rtol=1e-6)
    else:
        for loss, got, y in (
            (keras.losses.categorical_crossentropy, dense, np.array([[0.0, 1.0]])),
            (keras.losses.sparse_categorical_crossentropy, sparse, np.array([1])),
        ):
            np.testing.assert_allclose(got, _builtin_loss(loss, y, logits), rtol=1e-6)
    # Keras' clipped path charges -log(1e-7), about 16.1.
    clipped = keras.losses.categorical_crossentropy(
        np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]])
    )
    assert float(clipped[0]) < 17


@pytest.mark.skipif(not FUSES_LOSS, reason="only TensorFlow's losses read logits")
@pytest.mark.parametrize("run", ["eager", "tf.function", "XLA"])
def test_loss_fusion_includes_temperature_and_mask(run):
    import tensorflow as tf

    def losses(logits):
        probs = stable_softmax(logits, mask=[[True, True, False]], temperature=2.0)
        return (
            keras.losses.categorical_crossentropy(np.eye(3)[[1, 0]], probs),
            keras.losses.sparse_categorical_crossentropy(np.array([1, 0]), probs),
        )

    if run != "eager":
        losses = tf.function(losses, jit_compile=run == "XLA")
    logits = tf.constant([[1000.0, 0.0, 5000.0], [2.0, 0.0, 5.0]])
    # The masked logit takes no part: halved, the kept ones are (500, 0)
    # and (1, 0).
    expected = [500.0, np.log1p(np.exp(-1.0))]
    for loss in losses(logits):
        np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "loss", ["categorical_crossentropy", "sparse_categorical_crossentropy"]
)
def test_loss_fusion_holds_inside_fit(loss):
    # A head whose bias makes a confident mistake with a logit gap of 1000.
    inputs = keras.Input((1,))
    dense = keras.layers.Dense(2, activation="stable_softmax")
    model = keras.Model(inputs, dense(inputs))
    dense.set_weights(
        [np.zeros((1, 2), np.float32), np.array([1000.0, 0.0], np.float32)]
    )
    model.compile("sgd", loss)
    y = np.array([[0.0, 1.0]]) if loss.startswith("categorical") else np.array([1])
    evaluated = model.evaluate(np.zeros((1, 1)), y, verbose=0)
    history = model.fit(np.zeros((1, 1)), y, epochs=1, verbose=0)
    # Elsewhere the clipped loss of the built-in softmax: -log(1e-7).
    expected = 1000.0 if FUSES_LOSS else -np.log(1e-7)
    np.testing.assert_allclose(evaluated, expected, rtol=1e-5)
    np.testing.assert_allclose(history.history["loss"][0], expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_computed_in_float32_and_returned_in_its_dtype(dtype):
    rng = np.random.default_rng(2)
    x = keras.ops.cast(rng.normal(size=(4, 7)) * 30, dtype)
    out = stable_softmax(x)
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    x64 = to_numpy(keras.ops.cast(x, "float32")).astype(np.float64)
    expected = reference_softmax(x64)
    # One rounding to the half dtype on top of the float32 computation.
    ulp = 2.0**-10 if dtype == "float16" else 2.0**-7
    np.testing.assert_allclose(
        to_numpy(keras.ops.cast(out, "float32")), expected, rtol=ulp, atol=1e-7
    )
    assert not np.any(np.isnan(to_numpy(keras.ops.cast(out, "float32"))))


def test_float16_logits_beyond_float16_exp_range_do_not_overflow():
    # exp(1000) is inf in float16 (and float32): the naive formula gives NaN.
    x = keras.ops.cast([[1000.0, 999.0, -60000.0]], "float16")
    out = to_numpy(keras.ops.cast(stable_softmax(x), "float32"))
    np.testing.assert_allclose(out, reference_softmax([[1.0, 0.0, -1e9]]), rtol=2**-10)


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool"])
def test_integer_and_bool_inputs_are_computed_in_floatx(dtype):
    x = np.array([[0, 1, 1]]).astype(dtype)
    out = stable_softmax(x)
    assert keras.backend.standardize_dtype(out.dtype) == keras.config.floatx()
    assert_close_to_reference(out, reference_softmax(x.astype(float)))


def test_float64_inputs_stay_float64_and_match_to_float64_precision():
    x = np.random.default_rng(3).normal(size=(5, 9)) * 50
    out = stable_softmax(x, temperature=0.3)
    assert keras.backend.standardize_dtype(out.dtype) == "float64"
    assert_close_to_reference(
        out, reference_softmax(x, temperature=0.3), eps=2.0**-52, rtol=1e-12
    )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_classifier_head_trains_without_nan_under_mixed_precision(policy):
    keras.config.set_dtype_policy(policy)
    try:
        rng = np.random.default_rng(4)
        x = rng.normal(size=(256, 8)).astype("float32")
        y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(3, activation="stable_softmax"),
            ]
        )
        model.compile("adam", "sparse_categorical_crossentropy")
        history = model.fit(x, y, epochs=5, batch_size=32, verbose=0)
        losses = history.history["loss"]
        assert np.all(np.isfinite(losses))
        assert losses[-1] < losses[0]
        assert not np.any(np.isnan(np.asarray(model.predict(x, verbose=0), np.float32)))
    finally:
        keras.config.set_dtype_policy("float32")


def test_works_inside_traced_and_compiled_functions():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 6)).astype("float32")
    mask = rng.random((4, 6)) > 0.3
    x_tensor = keras.ops.convert_to_tensor(x)
    mask_tensor = keras.ops.convert_to_tensor(mask)
    for wrap in (traced, compiled):
        fn = wrap(lambda x, m: stable_softmax(x, mask=m, temperature=0.7))
        assert_close_to_reference(
            fn(x_tensor, mask_tensor), reference_softmax(x, -1, mask, 0.7)
        )
        log_fn = wrap(lambda x: stable_log_softmax(x))
        np.testing.assert_allclose(
            np.exp(keras.ops.convert_to_numpy(log_fn(x_tensor))),
            reference_softmax(x),
            rtol=2e-6,
        )


def test_package_version_is_exposed():
    assert keras_softmax.__version__.count(".") == 2


@pytest.mark.skipif(BACKEND != "torch", reason="torch.onnx exports on this backend")
def test_onnx_export_on_pytorch_serves_the_keras_result_and_we_warn_nothing(tmp_path):
    import onnxruntime

    inputs = keras.Input((4,), name="x")
    mask = keras.Input((3,), dtype="bool", name="keep")
    logits = keras.layers.Dense(3, activation="stable_softmax")(inputs)
    model = keras.Model([inputs, mask], StableSoftmax(temperature=2.0)(logits, mask))
    x = np.array([[0.5, -1.0, 2.0, 3.0], [1e4, 0.0, -1e4, 5.0]], "float32")
    keep = np.array([[True, False, True], [False, False, False]])
    expected = to_numpy(model([x, keep]))  # Keras exports a model once called
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.export(str(path), format="onnx", verbose=False)
    ours = [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if "keras_softmax" in w.filename
    ]
    assert ours == []
    session = onnxruntime.InferenceSession(
        str(path), providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    served = session.run(None, dict(zip(names, [x, keep], strict=True)))[0]
    np.testing.assert_allclose(served, expected, atol=1e-6)
    np.testing.assert_array_equal(served[1], 0.0)  # a fully masked row


def test_private_apis_relied_on_are_where_they_were_checked():
    from keras_softmax import _keras_internals

    assert "softmax" in _keras_internals.activation_table()
    layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    x = np.zeros((1, 3, 4), "float32")
    layer(x, x)  # built, so that every member exists
    for member in _keras_internals.MULTI_HEAD_ATTENTION_MEMBERS:
        assert hasattr(layer, member), member
    symbolic = keras.Input((3,))
    dense = keras.layers.Dense(2)
    assert _keras_internals.operation_of(dense(symbolic)) is dense
    assert callable(_keras_internals.scale_loss_for_distribution)
    if BACKEND == "tensorflow":
        # Keras' TensorFlow losses read `_keras_logits` of probabilities.
        from keras.src.backend.tensorflow import nn as tensorflow_nn

        source = inspect.getsource(tensorflow_nn)
        assert 'hasattr(output, "_keras_logits")' in source
        assert _keras_internals.in_xla_context() is False
        assert isinstance(_keras_internals.tape_could_record(), bool)
        from tensorflow.python.autograph.core import config

        rules = [getattr(rule, "_prefix", None) for rule in config.CONVERSION_RULES]
        assert "keras_softmax" in rules
    if BACKEND == "torch":
        import torch

        assert _keras_internals.torch_forward_mode_active() is False
        assert _keras_internals.is_functorch_wrapped(torch.ones(2)) is False
        wrapped = torch.func.vmap(
            lambda t: torch.tensor(_keras_internals.is_functorch_wrapped(t))
        )(torch.ones(2))
        assert bool(wrapped.all())


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's AutoGraph")
def test_a_users_tf_function_calls_the_library_as_written_not_autographed():
    # AutoGraph rewrites each function a `tf.function` reaches, unless its
    # package is left alone, as Keras' is: for one step of the loss it
    # rewrote 345 of ours, most of a 7.7 s trace (0.8 s without).
    import sys

    import tensorflow as tf

    ours = {
        name
        for module_name, module in list(sys.modules.items())
        if module_name.split(".")[0] == "keras_softmax"
        for name, value in vars(module).items()
        if inspect.isfunction(value)
        and (value.__module__ or "").split(".")[0] == "keras_softmax"
    }
    called = set()

    def record(frame, event, arg):
        if event == "call" and "__autograph_generated" in frame.f_code.co_filename:
            called.add(frame.f_code.co_name)

    x = np.random.default_rng(0).normal(size=(6, 16)).astype("float32")
    w = np.random.default_rng(1).normal(size=(16, 40)).astype("float32")

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = keras_softmax.linear_cross_entropy(np.arange(6), x, w)
            loss += tf.reduce_sum(stable_softmax(x, mask=x > 0) * x)
        return tape.gradient(loss, x)

    sys.setprofile(record)
    try:
        step.get_concrete_function(tf.TensorSpec(x.shape))
    finally:
        sys.setprofile(None)
    assert "tf__step" in called  # the user's own function is converted
    rewritten = {name.removeprefix("tf__") for name in called}
    assert not rewritten & ours, sorted(rewritten & ours)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("log", [False, True])
def test_half_precision_masks_keep_exact_zeros_and_nan_slices(dtype, log):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5, 9)) * 20
    mask = rng.random((5, 9)) < 0.7
    mask[1] = False  # nothing kept
    x[2, 3] = np.nan  # a NaN shows in its slice, masked or not
    mask[2, 3] = False
    fn = stable_log_softmax if log else stable_softmax
    out = fn(keras.ops.cast(x, dtype), mask=mask)
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    out = to_numpy(keras.ops.cast(out, "float32"))
    halved = to_numpy(keras.ops.cast(keras.ops.cast(x, dtype), "float32"))
    reference = reference_log_softmax if log else reference_softmax
    expected = reference(halved.astype(np.float64), mask=mask)
    assert np.all(np.isnan(out[2]))
    out, expected, mask = (np.delete(a, 2, axis=0) for a in (out, expected, mask))
    empty = -np.inf if log else 0.0
    np.testing.assert_array_equal(out[~mask], empty)
    np.testing.assert_array_equal(out[1], empty)
    live = mask
    ulp = 2.0**-10 if dtype == "float16" else 2.0**-7
    np.testing.assert_allclose(out[live], expected[live], rtol=2 * ulp, atol=1e-6)


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's kernels take bfloat16")
@pytest.mark.parametrize("masked", [False, True])
def test_pytorch_bfloat16_softmax_makes_no_float32_copy_of_its_input(masked):
    """`torch.softmax` accumulates bfloat16 in float32 itself (issue 28)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    x = torch.randn(64, 512).to(torch.bfloat16)
    mask = torch.rand(64, 512) < 0.8 if masked else None
    full_float32 = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    if t.numel() >= x.numel():
                        full_float32.append(str(func))
            return out

    with Watch():
        out = stable_softmax(x, mask=mask)
    assert out.dtype == torch.bfloat16
    assert not full_float32, full_float32
    expected = stable_softmax(x.float(), mask=mask).to(torch.bfloat16)
    np.testing.assert_array_equal(to_numpy(out.float()), to_numpy(expected.float()))
