"""The top-label expected calibration error: a NumPy function and a metric.

Both put each example in one of `M` equal-width bins by its confidence `c`,
the largest of its probabilities (bin `i` holds `i / M < c <= (i + 1) / M`,
the first also holding 0), and bin in float32, so they always agree on the
bin.
"""

import keras
import numpy as np
from keras import ops

from keras_softmax.calibration._inputs import check_labels
from keras_softmax.calibration._inputs import check_num_bins
from keras_softmax.calibration._inputs import check_scores


def expected_calibration_error(probs, labels, num_bins: int = 15) -> float:
    """Top-label expected calibration error, with equal-width bins.

    Each example falls in a bin by its confidence `c`, the largest of its
    probabilities: bin `i` holds `i / M < c <= (i + 1) / M` (the first also
    holds 0). The error is `sum over bins of |B| / n * |accuracy(B) -
    confidence(B)|`, where the prediction is the argmax.

    Confidences are binned in float32, as the `ExpectedCalibrationError`
    metric bins them, so the two always agree on the bin; a confidence
    within about 1e-7 of an edge may land in the neighbouring bin from the
    one exact arithmetic gives.

    Args:
        probs: Array or tensor of shape `(num_examples, num_classes)`,
            finite and in `[0, 1]`; rows are not required to sum to 1.
        labels: Integer class ids of shape `(num_examples,)` or
            `(num_examples, 1)`, or one-hot rows of shape
            `(num_examples, num_classes)`.
        num_bins: Positive integer `M`. Defaults to 15.

    Returns:
        The error, a Python float in `[0, 1]`.

    Example:

    >>> from keras_softmax.calibration import expected_calibration_error
    >>> probs = [[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.3, 0.7]]
    >>> # Bin (0.8, 0.9]: 2 of 2 right at 0.9; bin (0.6, 0.7]: 1 of 2 at 0.7.
    >>> ece = expected_calibration_error(probs, [0, 0, 1, 0], num_bins=10)
    >>> round(ece, 6)
    0.15

    Reference:

    - [Guo et al., 2017](https://arxiv.org/abs/1706.04599), "On Calibration
      of Modern Neural Networks", ICML 2017.
    - Naeini, Cooper and Hauskrecht, 2015, "Obtaining Well Calibrated
      Probabilities Using Bayesian Binning" (where the ECE is defined).
    """
    counts, confidences, hits = bin_statistics(probs, labels, num_bins)
    return float(np.sum(np.abs(hits - confidences)) / np.sum(counts))


@keras.saving.register_keras_serializable(package="keras_softmax")
class ExpectedCalibrationError(keras.metrics.Metric):
    """Top-label expected calibration error, accumulated over batches.

    Keeps, for each of `num_bins` equal-width confidence bins, the number of
    examples, the sum of their confidences and the number predicted right,
    so `result()` is `expected_calibration_error` on all the data seen
    since the last reset, whatever the batching. Bins follow the same rule:
    bin `i` holds `i / M < c <= (i + 1) / M`, the first also holding 0.

    Args:
        num_bins: Positive integer. Defaults to 15.
        name: Name of the metric.
        **kwargs: Base metric keyword arguments, such as `dtype`.

    Call arguments (of `update_state`):
        y_true: Integer class ids of shape `(batch,)` or `(batch, 1)`, or
            one-hot rows of the same shape as `y_pred`.
        y_pred: Probabilities of shape `(batch, num_classes)`.
        sample_weight: Optional scalar or weights of shape `(batch,)`; an
            example of weight `w` counts as `w` examples.

    Example:

    >>> from keras_softmax.calibration import ExpectedCalibrationError
    >>> metric = ExpectedCalibrationError(num_bins=10)
    >>> metric.update_state([0, 0], [[0.9, 0.1], [0.9, 0.1]])
    >>> metric.update_state([1, 0], [[0.3, 0.7], [0.3, 0.7]])
    >>> round(float(metric.result()), 6)
    0.15
    >>> metric.reset_state()
    >>> float(metric.result())
    0.0

    Usage with `compile()` API:

    ```python
    model.compile(
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=[ExpectedCalibrationError()],
    )
    ```

    Reference:

    - [Guo et al., 2017](https://arxiv.org/abs/1706.04599), "On Calibration
      of Modern Neural Networks", ICML 2017.
    """

    def __init__(
        self, num_bins: int = 15, name: str = "expected_calibration_error", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.num_bins = check_num_bins(num_bins)
        self.bin_counts, self.bin_confidences, self.bin_hits = (
            self.add_variable(
                shape=(self.num_bins,),
                initializer="zeros",
                dtype=self.dtype,
                name=variable,
            )
            for variable in ("bin_counts", "bin_confidences", "bin_hits")
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.convert_to_tensor(y_pred)
        y_true = ops.convert_to_tensor(y_true)
        num_classes = y_pred.shape[-1] or ops.shape(y_pred)[-1]
        probs = ops.reshape(y_pred, (-1, num_classes))
        one_hot = len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] != 1
        labels = ops.argmax(y_true, axis=-1) if one_hot else y_true
        labels = ops.cast(ops.reshape(labels, (-1,)), "int32")

        predicted = ops.argmax(probs, axis=-1)
        # Read off at the argmax: `ops.max` refuses an empty batch.
        confidence = ops.take_along_axis(probs, predicted[:, None], axis=-1)[:, 0]
        confidence = ops.cast(confidence, "float32")
        hits = ops.cast(ops.equal(ops.cast(predicted, "int32"), labels), self.dtype)
        # Rows: examples, columns: bins; each row is its example's weight.
        weights = ops.one_hot(_bin_index(confidence, self.num_bins), self.num_bins)
        weights = ops.cast(weights, self.dtype)
        if sample_weight is not None:
            sample_weight = ops.cast(sample_weight, self.dtype)
            if len(sample_weight.shape) == 0:
                sample_weight = ops.broadcast_to(sample_weight, ops.shape(hits))
            weights = weights * ops.reshape(sample_weight, (-1, 1))
        confidence = ops.cast(confidence, self.dtype)
        self.bin_counts.assign_add(ops.sum(weights, axis=0))
        self.bin_confidences.assign_add(ops.sum(weights * confidence[:, None], 0))
        self.bin_hits.assign_add(ops.sum(weights * hits[:, None], axis=0))

    def result(self):
        gaps = ops.sum(ops.abs(self.bin_hits - self.bin_confidences))
        return ops.divide_no_nan(gaps, ops.sum(self.bin_counts))

    def get_config(self):
        config = super().get_config()
        config["num_bins"] = self.num_bins
        return config


def bin_statistics(probs, labels, num_bins):
    """Checks its arguments; returns per-bin counts, confidence sums and hits.

    Shared by `expected_calibration_error` and `reliability_diagram`, so
    both bin alike. Each is a float64 array of shape `(num_bins,)`.
    """
    num_bins = check_num_bins(num_bins)
    p = check_scores(probs, "probs")
    if np.any((p < 0) | (p > 1)):
        i, j = np.argwhere((p < 0) | (p > 1))[0]
        raise ValueError(
            "`probs` must lie in [0, 1]: the calibration error is measured on "
            "probabilities, not logits (`keras_softmax.stable_softmax(logits)` "
            f"gives them). Received: probs[{i}, {j}]={p[i, j]}"
        )
    y = check_labels(labels, p.shape, "labels")
    confidence = np.max(p, axis=1)
    bins = _bin_index(confidence.astype(np.float32), num_bins, np)
    hits = (np.argmax(p, axis=1) == y).astype(np.float64)
    return (
        np.bincount(bins, minlength=num_bins).astype(np.float64),
        np.bincount(bins, weights=confidence, minlength=num_bins),
        np.bincount(bins, weights=hits, minlength=num_bins),
    )


def _bin_index(confidence, num_bins, xp=ops):
    """`ceil(c * M) - 1` clipped to `[0, M - 1]`, for float32 confidences."""
    # Computed in float32 by both the function and the metric, so an edge
    # case such as c = i / M falls in the same (lower) bin for both.
    scaled = confidence * np.float32(num_bins)
    index = xp.clip(xp.ceil(scaled) - 1, 0, num_bins - 1)
    return index.astype(np.int64) if xp is np else ops.cast(index, "int32")
