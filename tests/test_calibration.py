"""Temperature scaling, calibration error, `calibrate` and the diagram.

Every result is checked against an independent reference written here: a
plain loop for the calibration error, a grid search for the temperature,
and data drawn from a known temperature (the softmax is the suite's float64
one, `tests/support/references.py`). The metric gets the checks Keras gives its own
metrics: config round trip, `reset_state`, batched against unbatched.
"""

import io
import math
import sys

import hypothesis
import keras
import matplotlib
import matplotlib.figure
import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support.references import softmax as reference_softmax

import keras_softmax
from keras_softmax import StableSoftmax
from keras_softmax import StableSoftmaxHead
from keras_softmax import stable_softmax
from keras_softmax.calibration import ExpectedCalibrationError
from keras_softmax.calibration import calibrate
from keras_softmax.calibration import expected_calibration_error
from keras_softmax.calibration import fit_temperature
from keras_softmax.calibration import logits_model
from keras_softmax.calibration import reliability_diagram

matplotlib.use("Agg")


# --- Independent references -------------------------------------------------


def reference_ece(probs, labels, num_bins):
    """Top-label ECE by a loop over bins (i/M, (i+1)/M], 0 in the first."""
    probs = np.asarray(probs, np.float64)
    total = 0.0
    for i in range(num_bins):
        lo, hi = i / num_bins, (i + 1) / num_bins
        members = [
            n
            for n, row in enumerate(probs)
            if lo < max(row) <= hi or (i == 0 and max(row) == 0)
        ]
        if members:
            accuracy = np.mean([np.argmax(probs[n]) == labels[n] for n in members])
            confidence = np.mean([max(probs[n]) for n in members])
            total += len(members) / len(probs) * abs(accuracy - confidence)
    return total


def reference_nll(logits, labels, temperature):
    z = np.asarray(logits, np.float64) / temperature
    return np.mean(np.logaddexp.reduce(z, axis=1) - z[np.arange(len(z)), labels])


def grid_search_temperature(logits, labels, lo=1e-2, hi=1e2):
    """The T of least NLL: a dense log grid, then finer grids around its best."""
    grid = np.geomspace(lo, hi, 2001)
    for _ in range(6):
        nll = [reference_nll(logits, labels, t) for t in grid]
        best = int(np.argmin(nll))
        grid = np.linspace(
            grid[max(best - 2, 0)], grid[min(best + 2, len(grid) - 1)], 41
        )
    return grid[np.argmin([reference_nll(logits, labels, t) for t in grid])]


def far_from_bin_edges(probs, num_bins, margin=1e-6):
    scaled = np.max(probs, axis=1) * num_bins
    return np.abs(scaled - np.round(scaled)).min() > margin * num_bins


def random_probs(rng, n, num_classes, sharpness=3.0):
    return reference_softmax(sharpness * rng.normal(size=(n, num_classes)))


# --- fit_temperature --------------------------------------------------------


@pytest.mark.parametrize(
    "seed, num_classes, scale", [(0, 3, 1.0), (1, 10, 5.0), (2, 2, 0.3), (3, 5, 40.0)]
)
def test_fitted_temperature_matches_a_brute_force_grid_search(seed, num_classes, scale):
    rng = np.random.default_rng(seed)
    logits = scale * rng.normal(size=(300, num_classes))
    # Labels follow softmax(logits / 2): mildly overconfident logits.
    labels = np.array(
        [rng.choice(num_classes, p=p) for p in reference_softmax(logits / 2)]
    )
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(grid_search_temperature(logits, labels), rel=1e-4)


def test_fitted_temperature_recovers_known_overconfidence_factor():
    rng = np.random.default_rng(7)
    n, num_classes, factor = 20000, 5, 3.0
    true_logits = 2.0 * rng.normal(size=(n, num_classes))
    cumulative = np.cumsum(reference_softmax(true_logits), axis=1)
    labels = np.argmax(rng.random((n, 1)) < cumulative, axis=1)
    given = factor * true_logits

    fitted = fit_temperature(given, labels)

    # beta = 1 / T is a maximum-likelihood estimate: its standard error is
    # 1 / sqrt(n * I), with I = mean Var_p[z] the Fisher information per
    # example, and T's relative error equals beta's.
    p = reference_softmax(true_logits)
    mean = np.sum(p * given, axis=1, keepdims=True)
    fisher = np.mean(np.sum(p * (given - mean) ** 2, axis=1))
    relative_sd = factor / math.sqrt(n * fisher)
    assert relative_sd < 0.0125  # So four standard errors stay under 5%.
    assert abs(fitted / factor - 1) < 4 * relative_sd


@hypothesis.given(
    margin=st.floats(0.1, 20.0),
    right=st.integers(1, 30),
    wrong=st.integers(1, 30),
)
def test_fitted_temperature_has_the_closed_form_of_a_constant_margin(
    margin, right, wrong
):
    # Every example has logits (margin, 0): the best fit gives the label
    # class the frequency right / (right + wrong) of being right.
    logits = np.tile([margin, 0.0], (right + wrong, 1))
    labels = np.array([0] * right + [1] * wrong)
    expected = margin / math.log(right / wrong) if right != wrong else math.inf
    expected = min(max(expected, 1e-3), 1e3) if expected > 0 else 1e3
    assert fit_temperature(logits, labels) == pytest.approx(expected, rel=1e-8)


@hypothesis.given(
    data=st.data(),
    factor=st.floats(0.05, 20.0),
)
def test_scaling_logits_scales_the_fitted_temperature(data, factor):
    n = data.draw(st.integers(2, 30))
    num_classes = data.draw(st.integers(2, 5))
    # Logits on a 1e-3 grid: a margin like 1e-186 makes the NLL flat to
    # float64 precision over a wide range of T, which then has no exact
    # minimiser to compare.
    elements = st.integers(-10_000, 10_000).map(lambda k: k / 1000)
    logits = data.draw(hnp.arrays(np.float64, (n, num_classes), elements=elements))
    labels = data.draw(
        hnp.arrays(np.int64, n, elements=st.integers(0, num_classes - 1))
    )
    fitted = fit_temperature(logits, labels)
    hypothesis.assume(np.ptp(logits, axis=1).max() > 1e-3)
    hypothesis.assume(2e-3 < fitted < 5e2 and 2e-3 < factor * fitted < 5e2)
    assert fit_temperature(factor * logits, labels) == pytest.approx(
        factor * fitted, rel=1e-6
    )


@hypothesis.given(data=st.data())
def test_fitted_temperature_has_the_least_nll_of_nearby_temperatures(data):
    n = data.draw(st.integers(1, 30))
    num_classes = data.draw(st.integers(2, 6))
    elements = st.floats(-20, 20, allow_subnormal=False)
    logits = data.draw(hnp.arrays(np.float64, (n, num_classes), elements=elements))
    labels = data.draw(
        hnp.arrays(np.int64, n, elements=st.integers(0, num_classes - 1))
    )
    fitted = fit_temperature(logits, labels)
    assert 1e-3 <= fitted <= 1e3
    best = reference_nll(logits, labels, fitted)
    for nearby in (fitted * (1 - 1e-4), fitted * (1 + 1e-4)):
        if 1e-3 <= nearby <= 1e3:
            slack = 1e-12 * (1 + abs(best))
            assert best <= reference_nll(logits, labels, nearby) + slack


def test_fitted_temperature_ignores_a_constant_added_to_each_row():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(200, 4))
    labels = rng.integers(0, 4, 200)
    shifted = logits + rng.normal(scale=1e3, size=(200, 1))
    assert fit_temperature(shifted, labels) == pytest.approx(
        fit_temperature(logits, labels), rel=1e-8
    )


def test_separable_logits_give_the_smallest_temperature():
    logits = np.array([[3.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0]])
    assert fit_temperature(logits, [0, 1, 2]) == 1e-3


def test_logits_that_point_away_from_the_labels_give_the_largest_temperature():
    logits = np.array([[3.0, 0.0], [0.0, 2.0]])
    assert fit_temperature(logits, [1, 0]) == 1e3


def test_constant_logits_give_a_temperature_of_one():
    assert fit_temperature(np.full((4, 3), 7.0), [0, 1, 2, 0]) == 1.0


@pytest.mark.parametrize("magnitude", [1e300, 1e-300])
def test_extreme_logit_magnitudes_stay_finite_and_hit_the_bounds(magnitude):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 3))
    labels = np.array([rng.choice(3, p=p) for p in reference_softmax(logits)])
    # The optimum is T = magnitude * 1.0, far outside [1e-3, 1e3].
    expected = 1e3 if magnitude > 1 else 1e-3
    assert fit_temperature(magnitude * logits, labels) == expected


def test_rows_whose_range_overflows_float64_still_fit():
    big = np.finfo(np.float64).max
    logits = np.array([[big, -big], [big, -big], [-big, big]])
    assert fit_temperature(logits, [0, 1, 1]) == 1e3


def test_label_formats_and_tensors_all_give_the_same_temperature():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(100, 4))
    labels = rng.integers(0, 4, 100)
    expected = fit_temperature(logits, labels)
    one_hot = np.eye(4)[labels]
    for same in (
        labels[:, None],
        labels.astype(np.float32),
        one_hot,
        one_hot.astype(bool),
        labels.tolist(),
        keras.ops.convert_to_tensor(labels),
    ):
        assert fit_temperature(logits, same) == expected
    float64_logits = keras.ops.convert_to_tensor(logits, "float64")
    assert fit_temperature(float64_logits, labels) == expected


# --- Argument checks --------------------------------------------------------

LOGITS = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
PROBS = reference_softmax(LOGITS)


@pytest.mark.parametrize(
    "logits, labels, pattern",
    [
        (np.zeros(3), [0, 1, 2], r"`logits` must have shape.*logits.shape=\(3,\)"),
        (np.zeros((2, 1)), [0, 0], r"`logits`.*two classes.*\(2, 1\)"),
        (np.zeros((2, 3, 1)), [0, 0], r"`logits`.*\(2, 3, 1\)"),
        (np.zeros((0, 3)), [], r"`logits` must hold at least one.*\(0, 3\)"),
        ([[1.0, np.nan, 0.0]], [0], r"`logits` must be finite.*logits\[0, 1\]=nan"),
        ([[1.0, 0.0], [np.inf, 0.0]], [0, 0], r"`logits`.*finite.*\[1, 0\]=inf"),
        ([["a", "b"]], [0], r"`logits` must hold real numbers"),
        ([[True, False]], [0], r"`logits` must hold real numbers.*bool"),
        (LOGITS, [0, 1, 2], r"`labels` must have shape.*labels.shape=\(3,\)"),
        (LOGITS, [[0, 1], [1, 0]], r"`labels`.*\(2, 3\).*labels.shape=\(2, 2\)"),
        (LOGITS, [0, 3], r"`labels` must be class ids in \[0, 3\).*labels\[1\]=3"),
        (LOGITS, [-1, 0], r"`labels` must be class ids.*labels\[0\]=-1"),
        (LOGITS, [0.0, 1.5], r"`labels` must be integer.*labels\[1\]=1.5"),
        (LOGITS, [0.0, np.nan], r"`labels` must be integer.*labels\[1\]=nan"),
        (LOGITS, [True, False], r"`labels` must be integer.*dtype=bool"),
        (LOGITS, [[1, 1, 0], [0, 1, 0]], r"`labels`.*one-hot.*labels\[0\]=\[1, 1, 0\]"),
        (LOGITS, [[1, 0, 0], [0, 0, 0]], r"`labels`.*one-hot.*labels\[1\]"),
        (LOGITS, [[1, 0, 0], [0, 0.5, 0.5]], r"`labels`.*one-hot.*labels\[1\]"),
    ],
)
def test_bad_logits_or_labels_are_rejected_by_name(logits, labels, pattern):
    with pytest.raises(ValueError, match=pattern):
        fit_temperature(logits, labels)
    if pattern.startswith("`labels`"):
        with pytest.raises(ValueError, match=pattern):
            expected_calibration_error(PROBS, labels)


@pytest.mark.parametrize(
    "probs, pattern",
    [
        ([[1.5, -0.5]], r"`probs` must lie in \[0, 1\].*not logits.*probs\[0, 0\]=1.5"),
        ([[0.5, -0.5]], r"`probs` must lie in \[0, 1\].*probs\[0, 1\]=-0.5"),
        ([[0.5, np.nan]], r"`probs` must be finite.*probs\[0, 1\]=nan"),
        ([0.5, 0.5], r"`probs` must have shape.*probs.shape=\(2,\)"),
        (np.zeros((0, 2)), r"`probs` must hold at least one"),
    ],
)
def test_bad_probabilities_are_rejected_by_name(probs, pattern):
    with pytest.raises(ValueError, match=pattern):
        expected_calibration_error(probs, [0] * len(probs))


@pytest.mark.parametrize("num_bins", [0, -3, 1.5, True, "15", None])
def test_bad_num_bins_is_rejected_by_name(num_bins):
    pattern = r"`num_bins` must be a positive integer.*num_bins="
    with pytest.raises(ValueError, match=pattern):
        expected_calibration_error(PROBS, [0, 1], num_bins=num_bins)
    with pytest.raises(ValueError, match=pattern):
        ExpectedCalibrationError(num_bins=num_bins)
    with pytest.raises(ValueError, match=pattern):
        reliability_diagram(PROBS, [0, 1], num_bins=num_bins)


# --- expected_calibration_error ---------------------------------------------


@pytest.mark.parametrize("num_bins", [1, 2, 10, 15, 37])
def test_ece_matches_a_plain_loop_reference(num_bins):
    rng = np.random.default_rng(num_bins)
    probs = random_probs(rng, 500, 4)
    labels = rng.integers(0, 4, 500)
    assert far_from_bin_edges(probs, num_bins)
    expected = reference_ece(probs, labels, num_bins)
    assert expected_calibration_error(probs, labels, num_bins) == pytest.approx(
        expected, rel=1e-12, abs=1e-15
    )
    one_hot = np.eye(4)[labels]
    assert expected_calibration_error(probs, one_hot, num_bins) == pytest.approx(
        expected, rel=1e-12, abs=1e-15
    )


def test_confidence_on_a_bin_edge_falls_in_the_lower_bin():
    # 0.5 is the edge between the two bins. In the lower bin alone (right,
    # at 0.5) the error is 0.5 * 0.5 + 0.5 * 0.9 = 0.7; shared with the
    # 0.9 example (wrong) it would be |0.5 - 0.7| = 0.2.
    probs = np.array([[0.5, 0.3, 0.2], [0.9, 0.1, 0.0]])
    labels = np.array([0, 1])
    assert expected_calibration_error(probs, labels, num_bins=2) == pytest.approx(0.7)
    assert reference_ece(probs, labels, 2) == pytest.approx(0.7)
    metric = ExpectedCalibrationError(num_bins=2)
    metric.update_state(labels, probs)
    assert float(metric.result()) == pytest.approx(0.7, abs=1e-6)


def test_zero_confidence_falls_in_the_first_bin():
    probs = np.array([[0.0, 0.0], [0.95, 0.05]])
    # Both in bins of their own: |1 - 0| / 2 + |1 - 0.95| / 2.
    assert expected_calibration_error(probs, [0, 0], num_bins=4) == pytest.approx(0.525)
    metric = ExpectedCalibrationError(num_bins=4)
    metric.update_state([0, 0], probs)
    assert float(metric.result()) == pytest.approx(0.525, abs=1e-6)


probability_rows = st.integers(1, 40).flatmap(
    lambda n: hnp.arrays(
        np.float64, (n, 3), elements=st.floats(0, 1, allow_subnormal=False)
    )
)


@hypothesis.given(probs=probability_rows, data=st.data())
def test_ece_lies_between_zero_and_one(probs, data):
    labels = data.draw(hnp.arrays(np.int64, len(probs), elements=st.integers(0, 2)))
    num_bins = data.draw(st.integers(1, 30))
    assert 0.0 <= expected_calibration_error(probs, labels, num_bins) <= 1.0


@hypothesis.given(
    groups=st.lists(
        st.integers(1, 5).flatmap(
            lambda k: st.tuples(st.just(2**k), st.integers(2 ** (k - 1) + 1, 2**k))
        ),
        min_size=1,
        max_size=8,
    ),
    num_bins=st.integers(1, 20),
)
def test_ece_is_zero_when_each_confidence_is_the_frequency_of_being_right(
    groups, num_bins
):
    # A group of `size` examples at confidence right / size, of which
    # exactly `right` are right: calibrated in every bin, by construction.
    probs, labels = [], []
    for size, right in groups:
        confidence = right / size
        probs += [[confidence, 1 - confidence]] * size
        labels += [0] * right + [1] * (size - right)
    assert expected_calibration_error(probs, labels, num_bins) < 1e-12
    assert reference_ece(probs, labels, num_bins) < 1e-12


# --- ExpectedCalibrationError -----------------------------------------------


@pytest.mark.parametrize("label_format", ["ids", "column", "one_hot"])
def test_metric_accumulated_over_batches_equals_the_function_on_all_data(
    label_format,
):
    rng = np.random.default_rng(5)
    probs = random_probs(rng, 301, 5).astype(np.float32)
    labels = rng.integers(0, 5, 301)
    assert far_from_bin_edges(probs, 15)
    y_true = {
        "ids": labels,
        "column": labels[:, None],
        "one_hot": np.eye(5, dtype=np.float32)[labels],
    }[label_format]
    metric = ExpectedCalibrationError()
    for batch in np.array_split(np.arange(301), 7):
        metric.update_state(y_true[batch], probs[batch])
    expected = expected_calibration_error(probs, labels)
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(reference_ece(probs, labels, 15), abs=1e-12)


# Probabilities that float32 can tell apart from 0: Keras' JAX argmax rounds
# float64 input to float32 on the CPU (as of Keras 3.15), so a row such as
# [0, 2.2e-308, 0] would have another argmax there than in NumPy.
float32_probability_rows = probability_rows.map(
    lambda p: np.where(p < np.finfo(np.float32).tiny, 0.0, p)
)


@hypothesis.settings(max_examples=20)
@hypothesis.given(probs=float32_probability_rows, data=st.data())
def test_metric_agrees_with_the_function_on_any_probabilities(probs, data):
    labels = data.draw(hnp.arrays(np.int64, len(probs), elements=st.integers(0, 2)))
    num_bins = data.draw(st.integers(1, 20))
    split = data.draw(st.integers(0, len(probs)))
    metric = ExpectedCalibrationError(num_bins=num_bins)
    metric.update_state(labels[:split], probs[:split])
    metric.update_state(labels[split:], probs[split:])
    expected = expected_calibration_error(probs, labels, num_bins)
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)


def test_metric_sample_weights_count_as_repeated_examples():
    rng = np.random.default_rng(6)
    probs = random_probs(rng, 60, 3).astype(np.float32)
    labels = rng.integers(0, 3, 60)
    weights = rng.integers(0, 4, 60)
    metric = ExpectedCalibrationError(num_bins=10)
    metric.update_state(labels, probs, sample_weight=weights.astype(np.float32))
    repeated = np.repeat(np.arange(60), weights)
    expected = expected_calibration_error(probs[repeated], labels[repeated], 10)
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)

    metric.reset_state()
    metric.update_state(labels, probs, sample_weight=2.0)
    assert float(metric.result()) == pytest.approx(
        expected_calibration_error(probs, labels, 10), abs=1e-6
    )


def test_metric_reset_state_forgets_earlier_batches():
    rng = np.random.default_rng(8)
    metric = ExpectedCalibrationError()
    assert float(metric.result()) == 0.0
    metric.update_state(rng.integers(0, 3, 50), random_probs(rng, 50, 3, 8.0))
    metric.reset_state()
    assert float(metric.result()) == 0.0
    assert not np.any(keras.ops.convert_to_numpy(metric.bin_counts))
    probs, labels = random_probs(rng, 40, 3), rng.integers(0, 3, 40)
    metric.update_state(labels, probs)
    assert float(metric.result()) == pytest.approx(
        expected_calibration_error(probs, labels), abs=1e-6
    )


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_metric_fed_in_batches_equals_the_metric_fed_all_at_once(weighted):
    rng = np.random.default_rng(14)
    probs = random_probs(rng, 200, 4).astype(np.float32)
    labels = rng.integers(0, 4, 200)
    weights = rng.random(200).astype(np.float32) if weighted else None
    whole = ExpectedCalibrationError(num_bins=12)
    whole.update_state(labels, probs, sample_weight=weights)
    batched = ExpectedCalibrationError(num_bins=12)
    # Batches of unequal sizes, an empty one among them.
    for batch in np.array_split(np.arange(200), [0, 0, 7, 64, 150]):
        batched.update_state(
            labels[batch],
            probs[batch],
            sample_weight=None if weights is None else weights[batch],
        )
    for name in ("bin_counts", "bin_confidences", "bin_hits"):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(getattr(batched, name)),
            keras.ops.convert_to_numpy(getattr(whole, name)),
            rtol=1e-6,
            err_msg=name,
        )
    assert float(batched.result()) == pytest.approx(float(whole.result()), abs=1e-6)
    assert float(whole.result()) > 0


def test_metric_config_round_trips_through_keras_serialization():
    metric = ExpectedCalibrationError(num_bins=7, name="ece7", dtype="float64")
    config = metric.get_config()
    assert config["num_bins"] == 7
    assert config["name"] == "ece7"
    again = ExpectedCalibrationError.from_config(config)
    assert (again.num_bins, again.name, again.dtype) == (7, "ece7", "float64")
    assert again.bin_counts.shape == (7,)
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(metric)
    )
    assert isinstance(restored, ExpectedCalibrationError)
    assert restored.get_config() == config
    # The metric rebuilt from its config measures what the original does.
    rng = np.random.default_rng(15)
    probs, labels = random_probs(rng, 50, 3), rng.integers(0, 3, 50)
    for each in (metric, restored):
        each.update_state(labels, probs)
    assert float(restored.result()) == float(metric.result())


def test_metric_saved_under_the_module_path_before_the_split_still_loads():
    # Files saved before calibration became a package (saved_models/ among
    # them) record the module "keras_softmax.calibration". Keras looks the
    # class up by its registered name, which did not change, and the package
    # still exports it under that module.
    config = keras.saving.serialize_keras_object(ExpectedCalibrationError(num_bins=7))
    assert config["registered_name"] == "keras_softmax>ExpectedCalibrationError"
    config["module"] = "keras_softmax.calibration"
    restored = keras.saving.deserialize_keras_object(config)
    assert isinstance(restored, ExpectedCalibrationError)
    assert restored.num_bins == 7


def test_metric_in_compile_fit_and_evaluate_matches_the_function_on_predict():
    keras.utils.set_random_seed(0)
    x, y = blobs(np.random.default_rng(9), 256)
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(3, activation="stable_softmax")]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss="sparse_categorical_crossentropy",
        metrics=[ExpectedCalibrationError()],
    )
    history = model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    assert len(history.history["expected_calibration_error"]) == 2
    result = model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    probs = model.predict(x, batch_size=64, verbose=0)
    expected = expected_calibration_error(probs, y)
    assert result["expected_calibration_error"] == pytest.approx(expected, abs=1e-6)


# --- calibrate --------------------------------------------------------------


def blobs(rng, n, num_classes=3, spread=1.4):
    """Overlapping Gaussian blobs around the vertices of a polygon."""
    labels = rng.integers(0, num_classes, n)
    angles = 2 * np.pi * labels / num_classes
    centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    x = centers + spread * rng.normal(size=(n, 2))
    return x.astype(np.float32), labels


@pytest.fixture(scope="module")
def trained():
    """A small classifier with a `stable_softmax` head, and its data."""
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(10)
    x_train, y_train = blobs(rng, 800)
    x_val, y_val = blobs(rng, 800)
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(3, activation="stable_softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.02), loss="sparse_categorical_crossentropy"
    )
    model.fit(x_train, y_train, epochs=8, batch_size=64, verbose=0)
    return model, x_val, y_val


def head_logits(model, x):
    """The logits of the last Dense layer, computed in NumPy from its weights."""
    head = model.layers[-1]
    features = keras.Model(model.inputs, head.input).predict(x, verbose=0)
    kernel, bias = head.get_weights()
    return features.astype(np.float64) @ kernel + bias


def overconfident(model, factor):
    """A copy of `model` whose head's logits are `factor` times larger."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    kernel, bias = copy.layers[-1].get_weights()
    copy.layers[-1].set_weights([factor * kernel, factor * bias])
    return copy


def nll(probs, labels):
    return float(-np.mean(np.log(probs[np.arange(len(probs)), labels])))


def test_calibrated_output_is_stable_softmax_of_the_logits_over_the_fitted_temperature(
    trained,
):
    model, x_val, y_val = trained
    calibrated = calibrate(model, x_val, y_val)
    assert isinstance(calibrated.layers[-1], StableSoftmax)
    temperature = calibrated.layers[-1].temperature
    logits = head_logits(model, x_val)
    assert temperature == pytest.approx(fit_temperature(logits, y_val), rel=1e-5)
    expected = reference_softmax(logits / temperature)
    np.testing.assert_allclose(
        calibrated.predict(x_val, verbose=0), expected, atol=1e-6
    )
    via_package = stable_softmax(logits.astype(np.float32), temperature=temperature)
    np.testing.assert_allclose(
        calibrated.predict(x_val, verbose=0), via_package, atol=1e-6
    )
    # Only confidences change, never the predicted class.
    np.testing.assert_array_equal(
        np.argmax(calibrated.predict(x_val, verbose=0), axis=1),
        np.argmax(model.predict(x_val, verbose=0), axis=1),
    )


def test_calibration_lowers_validation_nll_and_ece_of_an_overconfident_model(trained):
    model, x_val, y_val = trained
    base_temperature = calibrate(model, x_val, y_val).layers[-1].temperature
    sharp = overconfident(model, 4.0)
    calibrated = calibrate(sharp, x_val, y_val)

    # Logits 4 times larger need a temperature 4 times higher.
    temperature = calibrated.layers[-1].temperature
    assert temperature == pytest.approx(4.0 * base_temperature, rel=1e-4)
    before = sharp.predict(x_val, verbose=0)
    after = calibrated.predict(x_val, verbose=0)
    assert nll(after, y_val) < nll(before, y_val)
    ece_before = expected_calibration_error(before, y_val)
    ece_after = expected_calibration_error(after, y_val)
    assert ece_after < 0.5 * ece_before
    # Calibrating again refits the same logits: the same temperature.
    again = calibrate(calibrated, x_val, y_val)
    assert again.layers[-1].temperature == pytest.approx(temperature, rel=1e-6)


def test_calibrated_model_saves_and_loads_in_safe_mode(trained, tmp_path):
    model, x_val, y_val = trained
    calibrated = calibrate(model, x_val, y_val)
    path = tmp_path / "calibrated.keras"
    calibrated.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.layers[-1], StableSoftmax)
    assert loaded.layers[-1].temperature == calibrated.layers[-1].temperature
    np.testing.assert_array_equal(
        loaded.predict(x_val, verbose=0), calibrated.predict(x_val, verbose=0)
    )


def test_calibrate_reads_the_output_of_a_logits_model_as_logits():
    keras.utils.set_random_seed(2)
    x, y = blobs(np.random.default_rng(11), 200)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    logits = model.predict(x, verbose=0)
    assert_calibrates_to_fitted_temperature(model, x, y, logits, rel=1e-6)


def assert_calibrates_to_fitted_temperature(model, x, y, logits, rel):
    """`calibrate(model, x, y)` ends in the temperature `fit_temperature` fits
    to `logits`, and predicts their softmax at that temperature."""
    calibrated = calibrate(model, x, y)
    temperature = calibrated.layers[-1].temperature
    assert temperature == pytest.approx(fit_temperature(logits, y), rel=rel)
    np.testing.assert_allclose(
        calibrated.predict(x, verbose=0),
        reference_softmax(logits / temperature),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "head",
    [
        lambda: StableSoftmax(temperature=0.5),
        lambda: keras.layers.Softmax(),
        lambda: keras.layers.Activation("stable_softmax"),
        lambda: keras.layers.Activation("softmax"),
    ],
)
def test_calibrate_replaces_a_final_softmax_layer_of_a_functional_model(head):
    keras.utils.set_random_seed(3)
    x, y = blobs(np.random.default_rng(12), 200)
    inputs = keras.Input((2,))
    logits = keras.layers.Dense(3)(keras.layers.Dense(8, activation="tanh")(inputs))
    model = keras.Model(inputs, head()(logits))
    expected_logits = keras.Model(inputs, logits).predict(x, verbose=0)
    calibrated = calibrate(model, x, y)
    temperature = calibrated.layers[-1].temperature
    assert temperature == pytest.approx(fit_temperature(expected_logits, y), rel=1e-6)
    np.testing.assert_allclose(
        calibrated.predict(x, verbose=0),
        reference_softmax(expected_logits / temperature),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "activation",
    ["softmax", keras_softmax.stable_softmax, StableSoftmax(temperature=2)],
)
def test_calibrate_strips_any_softmax_activation_from_the_head(trained, activation):
    model, x_val, y_val = trained
    copy = keras.Sequential(
        [
            keras.Input((2,)),
            model.layers[0],
            keras.layers.Dense(3, activation=activation),
        ]
    )
    # Kernel and bias: a StableSoftmax activation adds its temperature
    # variable to the layer's weights.
    trained_head, head = model.layers[-1], copy.layers[-1]
    head.kernel.assign(trained_head.kernel)
    head.bias.assign(trained_head.bias)
    reference = calibrate(model, x_val, y_val)
    calibrated = calibrate(copy, x_val, y_val)
    assert calibrated.layers[-1].temperature == pytest.approx(
        reference.layers[-1].temperature, rel=1e-6
    )
    np.testing.assert_allclose(
        calibrated.predict(x_val, verbose=0),
        reference.predict(x_val, verbose=0),
        atol=1e-7,
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_stable_softmax_head_gives_its_logits_and_calibrates(trained, temperature):
    # Its activation is linear, yet its output is probabilities.
    model, x_val, y_val = trained
    head = StableSoftmaxHead(3, temperature=temperature)
    copy = keras.Sequential([keras.Input((2,)), model.layers[0], head])
    head.set_weights(model.layers[-1].get_weights())
    logits = head_logits(model, x_val)
    np.testing.assert_allclose(
        logits_model(copy).predict(x_val, verbose=0), logits, rtol=1e-5, atol=1e-5
    )
    # The head's softmax normalises those logits over its temperature.
    np.testing.assert_allclose(
        copy.predict(x_val, verbose=0),
        reference_softmax(logits / temperature),
        atol=1e-6,
    )
    # Calibrating replaces the head's temperature with the fitted one.
    assert_calibrates_to_fitted_temperature(copy, x_val, y_val, logits, rel=1e-5)


def test_a_tied_or_soft_capped_head_is_refused_by_name():
    # A `Dense` copy would drop the tie or the cap: no silent wrong logits.
    tokens = keras.Input((None,), dtype="int32")
    embedding = keras.layers.Embedding(5, 4)
    for head, message in (
        (StableSoftmaxHead(5, tied_to=embedding), "tied_to='embedding"),
        (StableSoftmaxHead(5, logit_soft_cap=3.0), "logit_soft_cap=3.0"),
    ):
        model = keras.Model(tokens, head(embedding(tokens)))
        with pytest.raises(ValueError, match=message):
            logits_model(model)


def two_output_model():
    inputs = keras.Input((2,))
    return keras.Model(
        inputs, [keras.layers.Dense(3)(inputs), keras.layers.Dense(2)(inputs)]
    )


@pytest.mark.parametrize(
    "make_model, pattern",
    [
        (
            lambda: keras.Sequential(
                [keras.Input((2,)), keras.layers.Dense(3, "relu")]
            ),
            r"supports a model whose last layer.*'dense.*\(Dense\) with activation",
        ),
        (
            lambda: keras.Sequential(
                [keras.Input((2,)), keras.layers.Dense(3, "sigmoid")]
            ),
            r"StableSoftmax, Softmax or softmax Activation",
        ),
        (
            lambda: keras.Sequential([keras.Input((2,)), keras.layers.Flatten()]),
            r"supports a model whose last layer.*\(Flatten\) with no activation",
        ),
        (two_output_model, r"`model` must have exactly one output.*2 outputs"),
        (lambda: keras.layers.Dense(3), r"`model` must be a keras.Model.*Dense"),
        (
            lambda: keras.Sequential([keras.layers.Dense(3)]),
            r"`model` must be a built Sequential or functional model",
        ),
        (
            lambda: keras.Sequential([keras.Input((4, 2)), keras.layers.Dense(3)]),
            r"logits have shape \(batch, num_classes\).*\(None, 4, 3\)",
        ),
        (
            lambda: keras.Sequential([keras.Input((4, 3)), StableSoftmax(axis=1)]),
            r"softmax over the last axis.*axis=1",
        ),
    ],
)
def test_calibrate_rejects_unsupported_models_and_says_what_is_supported(
    make_model, pattern
):
    with pytest.raises(ValueError, match=pattern):
        calibrate(make_model(), np.zeros((4, 2), np.float32), [0, 1, 2, 0])


def test_calibrate_names_y_val_when_it_does_not_fit(trained):
    model, x_val, y_val = trained
    with pytest.raises(ValueError, match=r"`y_val` must be class ids in \[0, 3\)"):
        calibrate(model, x_val, y_val + 1)
    with pytest.raises(ValueError, match=r"`y_val` must have shape"):
        calibrate(model, x_val, y_val[:-1])


def test_fit_temperature_refuses_probabilities_and_says_how_to_get_logits(trained):
    model, x_val, y_val = trained
    probabilities = model.predict(x_val, verbose=0)
    with pytest.raises(ValueError, match=r"look like probabilities.*logits_model"):
        fit_temperature(probabilities, y_val)
    logits = logits_model(model).predict(x_val, verbose=0)
    # The calibrated layer keeps its temperature in a float32 variable.
    assert fit_temperature(logits, y_val) == pytest.approx(
        calibrate(model, x_val, y_val).layers[-1].temperature, rel=1e-6
    )


def test_log_probabilities_fit_the_temperature_of_their_logits(trained):
    # log softmax(z) is z shifted per row, which no temperature sees.
    model, x_val, y_val = trained
    logits = logits_model(model).predict(x_val, verbose=0).astype(np.float64)
    log_probabilities = np.log(reference_softmax(logits))
    assert fit_temperature(log_probabilities, y_val) == pytest.approx(
        fit_temperature(logits, y_val), rel=1e-9
    )


@pytest.mark.parametrize(
    "head",
    [
        lambda: [keras.layers.Dense(3, activation="stable_softmax")],
        lambda: [keras.layers.Dense(3, activation="softmax")],
        lambda: [keras.layers.Dense(3), StableSoftmax()],
        lambda: [keras.layers.Dense(3, activation=StableSoftmax(temperature=2.0))],
    ],
)
def test_logits_model_gives_what_the_last_softmax_normalises(head):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4), *head()])
    x = np.random.default_rng(0).normal(size=(8, 2)).astype("float32")
    logits = keras.ops.convert_to_numpy(logits_model(model)(x))
    activation = getattr(model.layers[-1], "activation", None)
    temperature = getattr(activation, "temperature", 1.0)
    np.testing.assert_allclose(
        reference_softmax(logits.astype(np.float64) / temperature),
        keras.ops.convert_to_numpy(model(x)),
        atol=1e-6,
    )


def test_logits_model_names_itself_in_its_errors():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, "relu")])
    with pytest.raises(ValueError, match=r"`logits_model` supports a model whose"):
        logits_model(model)


# --- reliability_diagram ----------------------------------------------------


def test_reliability_diagram_returns_a_figure_with_accuracy_bars_and_the_ece():
    rng = np.random.default_rng(13)
    probs = random_probs(rng, 400, 3, sharpness=4.0)
    labels = rng.integers(0, 3, 400)
    assert far_from_bin_edges(probs, 10)
    figure = reliability_diagram(probs, labels, num_bins=10)
    assert isinstance(figure, matplotlib.figure.Figure)
    (ax,) = figure.axes
    ece = reference_ece(probs, labels, 10)
    assert ax.get_title() == f"Reliability diagram (ECE = {100 * ece:.2f}%)"

    # Accuracy bars come first, one per non-empty bin, then as many gaps.
    confidence = probs.max(axis=1)
    bins = np.clip(np.ceil(confidence * 10) - 1, 0, 9).astype(int)
    filled = np.unique(bins)
    bars = ax.patches[: len(filled)]
    assert len(ax.patches) == 2 * len(filled)
    for bar, i in zip(bars, filled, strict=True):
        accuracy = np.mean(np.argmax(probs[bins == i], axis=1) == labels[bins == i])
        assert bar.get_x() == pytest.approx(i / 10)
        assert bar.get_height() == pytest.approx(accuracy)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    assert buffer.getvalue().startswith(b"\x89PNG")


def test_reliability_diagram_draws_on_the_axes_it_is_given():
    figure = matplotlib.figure.Figure()
    ax = figure.add_subplot()
    assert reliability_diagram(PROBS, [0, 0], num_bins=5, ax=ax) is figure
    assert ax.get_xlabel() == "Confidence"
    assert ax.patches


def test_reliability_diagram_without_matplotlib_names_the_plots_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install keras-softmax\[plots\]"):
        reliability_diagram(PROBS, [0, 1])
