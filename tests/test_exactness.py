"""Finite logits of any size, any axis and temperature: the float64 reference."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support.references import assert_close_to_reference
from support.references import log_softmax as reference_log_softmax
from support.references import softmax as reference_softmax
from support.references import to_numpy

from keras_softmax import stable_log_softmax
from keras_softmax import stable_softmax

FLOAT32_MAX = float(np.finfo(np.float32).max)

finite_float32 = st.floats(-FLOAT32_MAX / 2, FLOAT32_MAX / 2, allow_nan=False, width=32)
moderate_float32 = st.floats(-300, 300, allow_nan=False, width=32)
temperatures = st.sampled_from([1.0, 0.05, 0.3, 0.7, 2.0, 20.0]) | st.floats(
    0.01, 100.0
)


@st.composite
def logits_and_axis(draw, elements=moderate_float32, max_dims=3):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=max_dims, max_side=6))
    x = draw(hnp.arrays(np.float32, shape, elements=elements))
    rank = len(shape)
    if rank > 1 and draw(st.booleans()):
        axes = draw(
            st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True)
        )
        axis = tuple(a - rank if draw(st.booleans()) else a for a in axes)
    else:
        axis = draw(st.integers(-rank, rank - 1))
    return x, axis


@given(logits_and_axis(), temperatures)
def test_matches_float64_reference_for_any_axis_and_temperature(case, temperature):
    x, axis = case
    actual = stable_softmax(x, axis=axis, temperature=temperature)
    expected = reference_softmax(x, axis=axis, temperature=temperature)
    assert_close_to_reference(actual, expected, axis=axis)


@given(logits_and_axis(elements=finite_float32), temperatures)
def test_logits_up_to_half_float32_max_neither_overflow_nor_lose_accuracy(
    case, temperature
):
    x, axis = case
    actual = to_numpy(stable_softmax(x, axis=axis, temperature=temperature))
    assert np.all(np.isfinite(actual))
    expected = reference_softmax(x, axis=axis, temperature=temperature)
    assert_close_to_reference(actual, expected, axis=axis)


@given(logits_and_axis(), temperatures)
def test_log_softmax_is_the_log_of_the_reference(case, temperature):
    x, axis = case
    actual = to_numpy(stable_log_softmax(x, axis=axis, temperature=temperature))
    expected = reference_log_softmax(x, axis=axis, temperature=temperature)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(actual[~finite], expected[~finite])
    # An absolute error in log space is a relative error in probability, so
    # the bound for probabilities holds, plus the rounding of the result
    # itself to float32: half an ulp, 2**-24 * |log p|.
    error = np.abs(actual[finite] - expected[finite])
    allowed = 1e-6 + 1.5 * 2.0**-23 * np.abs(expected[finite])
    assert np.all(error <= allowed)


def test_near_float32_max_over_two_matches_reference():
    x = np.array(
        [[FLOAT32_MAX / 2, -FLOAT32_MAX / 2, FLOAT32_MAX / 2 * (1 - 2**-20)]],
        np.float32,
    )
    for temperature in (1.0, 0.05, 20.0, 1e30):
        actual = stable_softmax(x, temperature=temperature)
        assert_close_to_reference(actual, reference_softmax(x, temperature=temperature))


def test_largest_finite_logits_are_exact_too():
    x = np.array([[-FLOAT32_MAX, FLOAT32_MAX, FLOAT32_MAX]], np.float32)
    np.testing.assert_array_equal(stable_softmax(x), [[0.0, 0.5, 0.5]])
    np.testing.assert_array_equal(
        stable_softmax(x, temperature=0.01), [[0.0, 0.5, 0.5]]
    )


def test_huge_temperature_keeps_differences_that_dividing_first_would_round_away():
    # -max/1e30 and (-max + 2e31)/1e30 are one float32 ulp apart near 3.4e8.
    x = np.array([[-FLOAT32_MAX, -FLOAT32_MAX + 2.03e31]], np.float32)
    actual = stable_softmax(x, temperature=1e30)
    assert_close_to_reference(actual, reference_softmax(x, temperature=1e30))


def test_classic_example_matches_known_values():
    actual = stable_softmax(np.array([[3.0, 4.0, 1.0]], np.float32))
    np.testing.assert_allclose(
        actual, [[0.25949646, 0.70538451, 0.03511903]], rtol=1e-6
    )


@pytest.mark.parametrize("temperature", [1e-3, 0.05])
def test_small_temperature_tends_to_one_hot_at_the_argmax(temperature):
    x = np.array([[1.0, 3.0, 2.9, -4.0]], np.float32)
    actual = to_numpy(stable_softmax(x, temperature=temperature))
    assert actual[0, 1] > 0.85
    assert np.argmax(actual) == 1
    assert np.all(np.isfinite(actual))


def test_temperature_one_thousandth_is_one_hot_to_float32_precision():
    x = np.array([[1.0, 3.0, 2.9, -4.0]], np.float32)
    actual = to_numpy(stable_softmax(x, temperature=1e-3))
    assert actual[0, 1] == 1.0
    # exp(-100) = 3.7e-44 survives as a subnormal where a backend keeps them.
    assert_close_to_reference(actual, reference_softmax(x, temperature=1e-3))


def test_large_temperature_tends_to_uniform():
    x = np.array([[1000.0, -1000.0, 0.0, 3.0]], np.float32)
    actual = stable_softmax(x, temperature=1e9)
    np.testing.assert_allclose(actual, np.full((1, 4), 0.25), rtol=1e-5)


def test_temperature_may_be_a_scalar_tensor_or_variable():
    import keras

    x = np.array([[1.0, 2.0, 4.0]], np.float32)
    expected = reference_softmax(x, temperature=0.5)
    for t in (keras.ops.convert_to_tensor(0.5), keras.Variable(0.5), np.float32(0.5)):
        assert_close_to_reference(stable_softmax(x, temperature=t), expected)


def test_joint_normalisation_over_two_axes_sums_to_one_over_both():
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    actual = to_numpy(stable_softmax(x, axis=(1, 2)))
    np.testing.assert_allclose(actual.sum(axis=(1, 2)), 1.0, rtol=1e-6)
    assert_close_to_reference(actual, reference_softmax(x, axis=(1, 2)), axis=(1, 2))


@given(logits_and_axis(), temperatures)
def test_probabilities_sum_to_one_and_preserve_order(case, temperature):
    x, axis = case
    actual = to_numpy(stable_softmax(x, axis=axis, temperature=temperature))
    np.testing.assert_allclose(actual.sum(axis=axis), 1.0, rtol=2e-6)
    flat_x, flat_p = x.ravel(), actual.ravel()
    if isinstance(axis, int) and x.ndim == 1:
        order = np.argsort(flat_x, kind="stable")
        assert np.all(np.diff(flat_p[order]) >= 0)


def test_accepts_python_lists_numpy_arrays_and_tensors():
    import keras

    expected = reference_softmax(np.array([[1.0, 2.0]]))
    for x in (
        [[1.0, 2.0]],
        np.array([[1.0, 2.0]], np.float32),
        keras.ops.convert_to_tensor([[1.0, 2.0]]),
    ):
        assert_close_to_reference(stable_softmax(x), expected)
