"""Masks, -inf, NaN and +inf: what each does to its slice, and to the gradient."""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support.backends import gradient
from support.backends import jacobian
from support.references import assert_close_to_reference
from support.references import numerical_jacobian
from support.references import softmax as reference_softmax
from support.references import to_numpy

from keras_softmax import stable_log_softmax
from keras_softmax import stable_softmax


@st.composite
def logits_and_mask(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=6))
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-100, 100, width=32)))
    # A mask of full shape or broadcast along some dimensions.
    mask_shape = tuple(1 if draw(st.booleans()) else n for n in shape)
    mask_shape = mask_shape[draw(st.integers(0, len(shape) - 1)) :]
    mask = draw(hnp.arrays(np.bool_, mask_shape))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    return x, mask, axis


@given(logits_and_mask(), st.sampled_from([1.0, 0.3, 4.0]))
def test_masked_softmax_matches_reference_and_masked_positions_are_zero(
    case, temperature
):
    x, mask, axis = case
    actual = to_numpy(stable_softmax(x, axis=axis, mask=mask, temperature=temperature))
    keep = np.broadcast_to(mask, x.shape)
    np.testing.assert_array_equal(actual[~keep], 0.0)
    assert_close_to_reference(
        actual, reference_softmax(x, axis, mask, temperature), axis=axis
    )


@given(logits_and_mask())
def test_masked_log_softmax_is_minus_inf_exactly_where_masked(case):
    x, mask, axis = case
    actual = to_numpy(stable_log_softmax(x, axis=axis, mask=mask))
    keep = np.broadcast_to(mask, x.shape)
    np.testing.assert_array_equal(actual[~keep], -np.inf)
    assert not np.any(np.isnan(actual))


def test_fully_masked_row_is_zeros_not_nan_and_not_uniform():
    x = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], np.float32)
    mask = np.array([[True, False, True], [False, False, False]])
    actual = to_numpy(stable_softmax(x, mask=mask))
    np.testing.assert_array_equal(actual[1], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(actual[0].sum(), 1.0, rtol=1e-6)
    log_actual = to_numpy(stable_log_softmax(x, mask=mask))
    np.testing.assert_array_equal(log_actual[1], [-np.inf] * 3)


def test_numeric_mask_keeps_values_above_one_half():
    x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    numeric = np.array([[0.9, 0.5, 0.1, 1.0]], np.float32)
    np.testing.assert_array_equal(
        stable_softmax(x, mask=numeric), stable_softmax(x, mask=numeric > 0.5)
    )


def test_masked_values_of_any_size_are_ignored():
    x = np.array([[0.0, 1.0, -np.inf, np.inf, 3e38, -3e38]], np.float32)
    mask = np.array([[True, True, False, False, False, False]])
    expected = reference_softmax([[0.0, 1.0]])
    actual = to_numpy(stable_softmax(x, mask=mask))
    assert_close_to_reference(actual[:, :2], expected)
    np.testing.assert_array_equal(actual[:, 2:], 0.0)


def test_kept_logits_below_the_fill_value_still_give_exact_zeros_where_masked():
    low = -float(np.finfo(np.float32).max) * 0.9
    x = np.array([[low, low * 0.99, 5.0]], np.float32)
    mask = np.array([[True, True, False]])
    actual = stable_softmax(x, mask=mask)
    np.testing.assert_array_equal(actual, [[0.0, 1.0, 0.0]])


def test_minus_inf_logits_get_exactly_zero_probability():
    x = np.array([[-np.inf, 0.0, 1.0]], np.float32)
    actual = to_numpy(stable_softmax(x))
    assert actual[0, 0] == 0.0
    assert_close_to_reference(actual, reference_softmax(x))


def test_slice_of_only_minus_inf_is_all_zeros():
    x = np.array([[-np.inf, -np.inf], [0.0, 1.0]], np.float32)
    actual = to_numpy(stable_softmax(x))
    np.testing.assert_array_equal(actual[0], [0.0, 0.0])
    np.testing.assert_array_equal(stable_log_softmax(x)[0], [-np.inf, -np.inf])


def test_slice_whose_kept_logits_are_all_minus_inf_is_all_zeros():
    x = np.array([[-np.inf, 5.0, -np.inf]], np.float32)
    actual = stable_softmax(x, mask=[[True, False, True]])
    np.testing.assert_array_equal(actual, [[0.0, 0.0, 0.0]])


@pytest.mark.parametrize("mask", [None, [[True, True, True]], [[True, True, False]]])
def test_nan_anywhere_in_a_slice_makes_that_slice_nan(mask):
    x = np.array([[1.0, 2.0, np.nan], [1.0, 2.0, 3.0]], np.float32)
    actual = to_numpy(stable_softmax(x, mask=mask))
    assert np.all(np.isnan(actual[0]))
    assert not np.any(np.isnan(actual[1]))
    assert np.all(np.isnan(to_numpy(stable_log_softmax(x, mask=mask))[0]))


def test_plus_inf_makes_its_slice_nan():
    x = np.array([[np.inf, 1.0], [np.inf, np.inf], [0.0, 1.0]], np.float32)
    actual = to_numpy(stable_softmax(x))
    assert np.all(np.isnan(actual[:2]))
    assert_close_to_reference(actual[2:], reference_softmax(x[2:]))


def test_mask_that_does_not_broadcast_names_both_shapes():
    with pytest.raises(ValueError, match=r"mask\.shape=\(3,\).*x\.shape=\(2, 4\)"):
        stable_softmax(np.zeros((2, 4)), mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="mask.shape"):
        stable_softmax(np.zeros((4,)), mask=np.ones((2, 4), bool))


@pytest.mark.parametrize("fn", [stable_softmax, stable_log_softmax])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gradients_are_finite_with_fully_masked_and_minus_inf_slices(fn, temperature):
    x = np.array(
        [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [-np.inf, -np.inf, -np.inf], [0, 1, 2]],
        np.float32,
    )
    mask = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1], [1, 1, 1]], bool)
    grad = gradient(
        lambda v: fn(v, mask=mask, temperature=temperature), x.astype(np.float64)
    )
    assert np.all(np.isfinite(grad))
    # Masked positions and the fully masked row do not depend on x.
    np.testing.assert_array_equal(grad[~mask], 0.0)
    np.testing.assert_array_equal(grad[1], 0.0)


@pytest.mark.parametrize("log", [False, True])
@given(
    x=hnp.arrays(np.float64, (2, 4), elements=st.floats(-5, 5)),
    mask=hnp.arrays(np.bool_, (2, 4)),
    temperature=st.sampled_from([1.0, 0.5, 3.0]),
    axis=st.sampled_from([-1, 0, (0, 1)]),
)
def test_gradients_match_central_differences(log, x, mask, temperature, axis):
    fn = stable_log_softmax if log else stable_softmax

    def f(v):
        return fn(v, axis=axis, mask=mask, temperature=temperature)

    numerical = numerical_jacobian(f, x)
    analytic = jacobian(f, x)
    finite = np.isfinite(numerical)
    assert np.all(np.isfinite(analytic))
    np.testing.assert_allclose(
        analytic[finite], numerical[finite], atol=1e-7, rtol=1e-6
    )


def test_gradient_with_respect_to_temperature_matches_central_differences():
    x = np.array([[0.5, -1.0, 2.0, 0.0]], np.float64)
    weights = np.array([[1.0, 2.0, 3.0, 4.0]])

    def loss(t):
        p = stable_softmax(x, temperature=t)
        return keras.ops.reshape(keras.ops.sum(keras.ops.multiply(p, weights)), (1,))

    analytic = jacobian(lambda t: loss(keras.ops.reshape(t, ())), np.array([0.8]))
    numerical = (to_numpy(loss(0.8 + 1e-6)) - to_numpy(loss(0.8 - 1e-6))) / 2e-6
    np.testing.assert_allclose(analytic.ravel(), numerical, rtol=1e-6)
