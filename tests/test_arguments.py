"""Bad arguments raise a ValueError that names the argument and its value."""

import keras
import numpy as np
import pytest

from keras_softmax import StableSoftmax
from keras_softmax import stable_log_softmax
from keras_softmax import stable_softmax

X = np.zeros((2, 3), np.float32)


@pytest.mark.parametrize("fn", [stable_softmax, stable_log_softmax])
@pytest.mark.parametrize(
    "temperature", [0, 0.0, -1.0, float("nan"), float("inf"), "hot", True, None, 1e-50]
)
def test_bad_python_temperature_is_rejected_by_name(fn, temperature):
    with pytest.raises(ValueError, match=r"`temperature`.*temperature="):
        fn(X, temperature=temperature)


@pytest.mark.parametrize("temperature", [0, -1, float("nan"), float("inf"), "x"])
def test_layer_with_bad_temperature_is_rejected_when_constructed(temperature):
    with pytest.raises(ValueError, match="temperature"):
        StableSoftmax(temperature=temperature)


def test_non_scalar_temperature_tensor_is_rejected():
    with pytest.raises(ValueError, match="temperature.*scalar"):
        stable_softmax(X, temperature=keras.ops.ones((2,)))


@pytest.mark.parametrize("axis", [2, -3, (0, 2), (1, 1)])
def test_axis_out_of_range_or_repeated_names_axis_and_rank(axis):
    with pytest.raises(ValueError, match=r"axis=.*") as info:
        stable_softmax(X, axis=axis)
    if axis != (1, 1):
        assert "rank 2" in str(info.value)


@pytest.mark.parametrize("axis", ["abc", 1.5, (), True, [1, "x"]])
def test_axis_of_the_wrong_type_is_rejected(axis):
    with pytest.raises(ValueError, match="axis="):
        stable_softmax(X, axis=axis)
    with pytest.raises(ValueError, match="axis="):
        StableSoftmax(axis=axis)


def test_scalar_input_has_no_axis_to_normalise():
    with pytest.raises(ValueError, match="rank 0"):
        stable_softmax(3.0)


@pytest.mark.parametrize(
    "field, value", [("temperature", -1), ("axis", "abc"), ("trainable_temperature", 2)]
)
def test_config_with_a_bad_value_names_the_field(field, value):
    config = StableSoftmax().get_config()
    config[field] = value
    with pytest.raises(ValueError, match=field):
        StableSoftmax.from_config(config)


def test_string_logits_are_rejected():
    with pytest.raises((ValueError, TypeError)):
        stable_softmax(np.array(["a", "b"]))
