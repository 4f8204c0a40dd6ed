"""Symbolic and empty inputs, `axis=None`, and every form of temperature."""

import json
import textwrap
import warnings

import keras
import numpy as np
import pytest
from support.backends import BACKEND
from support.backends import compiled
from support.backends import gradient
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

FUNCTIONS = [stable_softmax, stable_log_softmax]


# Symbolic inputs


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize(
    "dtype, expected", [("float32", "float32"), ("float16", "float16"), ("int32", None)]
)
def test_keras_tensor_in_gives_keras_tensor_of_same_shape_and_output_dtype(
    fn, dtype, expected
):
    x = keras.Input((4, 5), dtype=dtype)
    y = fn(x, axis=1, temperature=0.5)
    assert isinstance(y, keras.KerasTensor)
    assert tuple(y.shape) == (None, 4, 5)
    assert y.dtype == (expected or keras.config.floatx())


def test_bad_arguments_are_rejected_when_the_symbolic_call_is_made():
    x = keras.Input((4, 5))
    with pytest.raises(ValueError, match="axis"):
        stable_softmax(x, axis=3)
    with pytest.raises(ValueError, match="mask.shape"):
        stable_softmax(x, mask=keras.Input((3,), dtype="bool"))
    with pytest.raises(ValueError, match="temperature"):
        stable_softmax(x, temperature=keras.Input((4, 5)))
    with pytest.raises(ValueError, match="temperature=-1"):
        stable_softmax(x, temperature=-1)


def test_symbolic_mask_and_per_row_temperature_are_model_inputs():
    x = keras.Input((5,))
    mask = keras.Input((5,), dtype="bool")
    t = keras.Input((1,))
    model = keras.Model([x, mask, t], stable_softmax(x, mask=mask, temperature=t))
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(3, 5)).astype("float32") * 4
    masks = rng.random((3, 5)) > 0.3
    masks[:, 0] = True
    ts = np.array([[0.5], [1.0], [3.0]], "float32")
    out = model.predict([xs, masks, ts], verbose=0)
    assert_close_to_reference(out, reference_softmax(xs, -1, masks, ts))


def _functional_model():
    inputs = keras.Input((6,), name="x")
    logits = keras.layers.Dense(4)(inputs)
    outputs = [
        stable_softmax(logits, temperature=0.5),
        stable_log_softmax(logits, axis=None),
    ]
    return keras.Model(inputs, outputs)


def test_functional_model_of_the_functions_reloads_in_a_fresh_process(tmp_path):
    model = _functional_model()
    x = np.random.default_rng(1).normal(size=(3, 6)).astype("float32")
    expected = [to_numpy(o) for o in model(x)]
    path = tmp_path / "functions.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    out = check_python(
        "-c",
        textwrap.dedent(
            f"""
            import json, numpy as np, keras
            import keras_softmax
            model = keras.saving.load_model({str(path)!r}, safe_mode=True)
            x = np.load({str(tmp_path / "x.npy")!r})
            print(json.dumps([keras.ops.convert_to_numpy(o).tolist()
                              for o in model(x)]))
            """
        ),
    )
    for loaded, values in zip(json.loads(out), expected, strict=True):
        np.testing.assert_array_equal(np.asarray(loaded, np.float32), values)


# Empty inputs

EMPTY_CASES = [
    ((0, 4), -1),
    ((0, 4), 0),
    ((5, 0, 0), 1),
    ((5, 0, 0), (1, 2)),
    ((2, 0, 3), -1),
    ((3, 0), None),
    ((0,), 0),
]


@pytest.mark.parametrize("shape, axis", EMPTY_CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_empty_input_gives_empty_output_of_its_shape_without_warnings(
    shape, axis, masked
):
    x = np.zeros(shape, "float32")
    mask = np.ones(shape, bool) if masked else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outputs = [fn(x, axis=axis, mask=mask, temperature=0.5) for fn in FUNCTIONS]
        outputs.append(StableSoftmax(axis=axis)(x, mask=mask))
        outputs.append(traced(lambda v: stable_softmax(v, axis=axis, mask=mask))(x))
    for out in outputs:
        assert tuple(out.shape) == shape
        assert keras.backend.standardize_dtype(out.dtype) == "float32"


# axis=None


@pytest.mark.parametrize("masked", [False, True])
def test_axis_none_normalises_over_all_axes_jointly(masked):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 4)).astype("float32") * 5
    mask = rng.random((2, 3, 4)) > 0.4 if masked else None
    out = to_numpy(stable_softmax(x, axis=None, mask=mask, temperature=0.7))
    np.testing.assert_allclose(out.sum(), 1.0, rtol=1e-6)
    assert_close_to_reference(
        out, reference_softmax(x, None, mask, 0.7), axis=(0, 1, 2)
    )
    log_out = to_numpy(stable_log_softmax(x, axis=None, mask=mask))
    expected = reference_log_softmax(x, None, mask)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(log_out[~finite], expected[~finite])
    np.testing.assert_allclose(log_out[finite], expected[finite], atol=2e-6)


# Temperature

# Where a tensor's value is only known when the program runs: compiled on
# every backend, and traced without compiling on TensorFlow.
RUN_TIME_MODES = [compiled] + ([traced] if BACKEND == "tensorflow" else [])


def test_per_row_temperature_tempers_each_row_by_its_own():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 5)).astype("float32") * 10
    t = np.array([[0.1], [1.0], [7.0]], "float32")
    for temperature in (t, keras.ops.convert_to_tensor(t), keras.Variable(t)):
        assert_close_to_reference(
            stable_softmax(x, temperature=temperature),
            reference_softmax(x, temperature=t),
        )


def test_per_head_temperature_broadcasts_over_joint_axes():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 4, 5)).astype("float32") * 10
    t = rng.uniform(0.2, 4.0, size=(1, 3, 1, 1)).astype("float32")
    for axis in (-1, (2, 3)):
        assert_close_to_reference(
            stable_softmax(x, axis=axis, temperature=t),
            reference_softmax(x, axis=axis, temperature=t),
            axis=axis,
        )


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 1), (4, 1)])
def test_temperature_that_does_not_fit_is_rejected_naming_its_shape(shape):
    x = np.zeros((3, 5), "float32")
    with pytest.raises(ValueError, match=r"`temperature`.*shape"):
        stable_softmax(x, temperature=np.ones(shape, "float32"))


@pytest.mark.parametrize("value", [-1.0, 0.0, np.nan, np.inf])
def test_known_bad_tensor_temperature_is_rejected_naming_the_value(value):
    x = np.zeros((2, 3), "float32")
    for temperature in (
        keras.ops.convert_to_tensor(value),
        keras.Variable(value),
        np.array([[1.0], [value]], "float32"),
    ):
        with pytest.raises(ValueError, match="temperature=.*" + str(value)[:2]):
            stable_softmax(x, temperature=temperature)


@pytest.mark.parametrize("wrap", RUN_TIME_MODES, ids=lambda wrap: wrap.__name__)
@pytest.mark.parametrize("value", [-1.0, 0.0, np.nan, np.inf])
@pytest.mark.parametrize("fn", FUNCTIONS)
def test_bad_temperature_known_only_at_run_time_makes_the_whole_output_nan(
    wrap, value, fn
):
    x = keras.ops.convert_to_tensor([[0.0, -200.0, 5.0], [1.0, 2.0, 3.0]])
    t = keras.ops.convert_to_tensor([[1.0], [value]])
    scalar = keras.ops.convert_to_tensor(value)
    call = wrap(lambda x, t: fn(x, temperature=t))
    for temperature in (t, scalar):
        assert np.all(np.isnan(to_numpy(call(x, temperature))))
    masked = wrap(lambda x, t: fn(x, mask=[[True, False, True]] * 2, temperature=t))
    assert np.all(np.isnan(to_numpy(masked(x, t))))


# The layer's temperature


def _layer_model(**kwargs):
    inputs = keras.Input((4,))
    layer = StableSoftmax(**kwargs)
    model = keras.Model(inputs, layer(inputs))
    model.compile(loss="categorical_crossentropy")
    return model, layer


X = np.array([[1.0, 2.0, 3.0, -1.0], [0.5, 0.5, 4.0, 2.0]], "float32")
Y = np.array([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]], "float32")


def test_setting_the_temperature_takes_effect_in_predict_and_evaluate():
    model, layer = _layer_model(temperature=1.0)
    model.predict(X, verbose=0)
    before = model.evaluate(X, Y, verbose=0)
    predict_function = model.predict_function
    layer.temperature = 0.25
    assert_close_to_reference(
        model.predict(X, verbose=0), reference_softmax(X, temperature=0.25)
    )
    assert model.predict_function is predict_function  # not recompiled
    after = model.evaluate(X, Y, verbose=0)
    expected = -np.mean(np.sum(Y * reference_log_softmax(X, temperature=0.25), -1))
    np.testing.assert_allclose(after, expected, rtol=1e-5)
    assert after != before


def test_setting_the_temperature_takes_effect_in_fit():
    model, layer = _layer_model(temperature=1.0)
    history = model.fit(X, Y, epochs=1, verbose=0)
    layer.temperature = 0.25
    history = model.fit(X, Y, epochs=1, verbose=0)
    expected = -np.mean(np.sum(Y * reference_log_softmax(X, temperature=0.25), -1))
    np.testing.assert_allclose(history.history["loss"][0], expected, rtol=1e-5)


def test_config_and_saved_file_keep_the_current_temperature(tmp_path):
    model, layer = _layer_model(temperature=1.0)
    layer.temperature = 0.7
    assert layer.get_config()["temperature"] == 0.7
    model.save(tmp_path / "set.keras")
    loaded = keras.saving.load_model(tmp_path / "set.keras", safe_mode=True)
    assert loaded.layers[-1].temperature == 0.7
    assert_close_to_reference(
        loaded.predict(X, verbose=0), reference_softmax(X, temperature=0.7)
    )


def test_layer_follows_a_variable_passed_as_its_temperature():
    variable = keras.Variable(0.5, trainable=False)
    model, layer = _layer_model(temperature=variable)
    assert_close_to_reference(
        model.predict(X, verbose=0), reference_softmax(X, temperature=0.5)
    )
    variable.assign(3.0)
    assert layer.temperature == 3.0
    assert_close_to_reference(
        model.predict(X, verbose=0), reference_softmax(X, temperature=3.0)
    )


def test_layer_variable_assigned_a_bad_value_gives_nan_when_traced():
    model, layer = _layer_model(temperature=1.0)
    model.predict(X, verbose=0)
    layer._temperature_variable.assign(-1.0)
    if BACKEND == "torch":
        # Keras runs predict eagerly on PyTorch: the value is known, and
        # checked like a Python number.
        with pytest.raises(ValueError, match="temperature=-1"):
            model.predict(X, verbose=0)
    else:
        assert np.all(np.isnan(model.predict(X, verbose=0)))


def test_setting_a_trainable_temperature_sets_the_learned_weight():
    model, layer = _layer_model(temperature=1.0, trainable_temperature=True)
    layer.temperature = 3.0
    np.testing.assert_allclose(to_numpy(layer.log_temperature), np.log(3.0), 1e-6)
    assert_close_to_reference(
        model.predict(X, verbose=0), reference_softmax(X, temperature=3.0)
    )


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), "hot"])
def test_setting_a_bad_temperature_is_rejected_naming_the_value(value):
    layer = StableSoftmax()
    with pytest.raises(ValueError, match="temperature="):
        layer.temperature = value
    assert layer.temperature == 1.0


def test_file_saved_before_the_temperature_was_a_variable_loads_the_same():
    data = np.load("tests/data/saved_before_temperature_variable.npz")
    model = keras.saving.load_model(
        "tests/data/saved_before_temperature_variable.keras", safe_mode=True
    )
    outputs = model(data["tokens"])
    for name, out in zip(("masked", "tempered", "learned"), outputs, strict=True):
        np.testing.assert_allclose(to_numpy(out), data[name], rtol=1e-6, atol=1e-7)
    assert model.get_layer("masked_softmax").temperature == 0.7
    assert model.get_layer("tempered").activation.temperature == 0.5
    assert model.get_layer("learned").temperature == 0.8


# The mask an activation never sees


def _tokens_model(head):
    tokens = keras.Input((4,), dtype="int32")
    hidden = keras.layers.Embedding(10, 3, mask_zero=True)(tokens)
    return keras.Model(tokens, head(hidden))


TOKENS = np.array([[3, 5, 0, 0], [7, 0, 0, 0]])


def test_as_an_activation_after_a_masked_layer_it_warns_that_the_mask_is_lost():
    model = _tokens_model(keras.layers.Dense(1, activation=StableSoftmax(axis=1)))
    with pytest.warns(UserWarning, match="passes no mask to activations"):
        out = to_numpy(model(TOKENS))[..., 0]
    # What the warning is about: padded positions got probability.
    assert np.all(out[TOKENS == 0] > 0)


def test_as_a_layer_after_dense_it_consumes_the_mask_without_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _tokens_model(lambda h: StableSoftmax(axis=1)(keras.layers.Dense(1)(h)))
        out = to_numpy(model(TOKENS))[..., 0]
    assert not [w for w in caught if "mask" in str(w.message)]
    np.testing.assert_array_equal(out[TOKENS == 0], 0.0)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("temperature", [1e-160, 1e-20, 0.3])
@pytest.mark.parametrize(
    "path", ["stable_softmax", "attention", "attention_blocks"], ids=str
)
def test_temperature_gradients_are_finite_for_any_positive_temperature(
    path, temperature
):
    """Autodiff's derivative of `x / t` squares `t`, which underflows for a
    tiny temperature (below 1e-154 in float64); 0 times its inverse is NaN."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3)) * 3
    mask = np.array([[True, True, False], [True, True, True]])
    q = rng.normal(size=(1, 4, 1, 3))

    def loss(t):
        t = keras.ops.reshape(t, ())
        if path == "stable_softmax":
            out = keras_softmax.stable_softmax(x, mask=mask, temperature=t)
        else:
            out = keras_softmax.dot_product_attention(
                q, q, q, temperature=t, flash_attention=path == "attention_blocks"
            )
        return keras.ops.reshape(keras.ops.sum(out), (1,))

    (derivative,) = gradient(loss, np.array([temperature]))
    assert np.isfinite(derivative)
    if temperature < 1e-8:
        # A one-hot distribution: nothing moves with the temperature.
        assert derivative == 0.0


@pytest.mark.parametrize(
    "dtype, temperature", [("float64", 1e-160), ("float32", 1e-20)]
)
def test_the_blocks_at_a_tiny_temperature_attend_to_the_largest_score_alone(
    dtype, temperature
):
    # Divided by such a temperature, one ulp between the scores' maximum and
    # their shift is the whole distribution (XLA on a CPU rounds the two
    # differently): the blocks snap scores within two ulps to the maximum.
    q = np.random.default_rng(4).normal(size=(1, 4, 1, 3)).astype(dtype)
    t = keras.ops.convert_to_tensor(np.array(temperature, dtype))
    blocks = keras_softmax.dot_product_attention(
        q, q, q, temperature=t, flash_attention=True
    )
    scores = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), q.astype(np.float64))
    one_hot = scores == scores.max(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhd->bqhd", one_hot / one_hot.sum(-1, keepdims=True), q)
    np.testing.assert_allclose(to_numpy(blocks), expected, rtol=1e-6)
