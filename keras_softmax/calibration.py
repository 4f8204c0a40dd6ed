"""Temperature scaling: fit it, measure calibration, apply it to a model.

A classifier is calibrated when, among the examples it predicts with
confidence `c`, a fraction `c` is right. Temperature scaling (Guo et al.,
2017, "On Calibration of Modern Neural Networks") divides the logits by one
scalar `T` fitted on held-out data; it changes no prediction, only how sure
the model says it is.

- `fit_temperature` finds the `T` that minimises the validation NLL, exactly.
- `expected_calibration_error` and the `ExpectedCalibrationError` metric
  measure the top-label calibration error with equal-width bins.
- `calibrate` turns a trained classifier into one that ends with
  `StableSoftmax(temperature=T)`, so it saves and loads like any model.
- `reliability_diagram` draws accuracy against confidence (needs the
  `plots` extra: `pip install keras-softmax[plots]`).

The two NumPy functions work in float64 on arrays or tensors; the metric is
written with `keras.ops` only, so it runs inside `fit` and `evaluate`.
"""

import numbers

import keras
import numpy as np
from keras import ops

from keras_softmax.layer import StableSoftmax
from keras_softmax.softmax import stable_softmax

# The range `fit_temperature` searches. At the ends the data asks for more:
# T -> 0 for separable logits, T -> inf for logits that carry no signal.
_MIN_TEMPERATURE = 1e-3
_MAX_TEMPERATURE = 1e3
_RTOL = 1e-12
_MAX_STEPS = 200


def fit_temperature(logits, labels) -> float:
    """Fits the temperature that minimises the NLL of `softmax(logits / T)`.

    The mean negative log-likelihood is convex in `1 / T`, with closed-form
    first and second derivatives (the mean of `E_p[z] - z_label` and of
    `Var_p[z]`), so a safeguarded Newton iteration in float64 finds its
    minimum to about 1e-12 relative.

    The search is confined to `1e-3 <= T <= 1e3`, and a bound is returned
    when the optimum lies beyond it: `1e-3` when every example's label has
    the strictly largest logit (the NLL then keeps falling as `T -> 0`), and
    `1e3` when the logits carry no signal, or the wrong one. If every row of
    `logits` is constant the NLL does not depend on `T`, and `1.0` is
    returned. Where the NLL is flat to float64 precision over a range of
    `T` (logits that differ by 1e-100, say), any `T` in that range is a
    minimiser, and which one is returned is not specified.

    Args:
        logits: Float array or tensor of shape `(num_examples, num_classes)`,
            finite, with at least two classes.
        labels: Integer class ids of shape `(num_examples,)` or
            `(num_examples, 1)`, or one-hot rows of shape
            `(num_examples, num_classes)`.

    Returns:
        The fitted temperature, a Python float in `[1e-3, 1e3]`.

    Example:

    >>> import numpy as np
    >>> from keras_softmax.calibration import fit_temperature
    >>> logits = np.array([[1.0, 0.0]] * 4)
    >>> labels = np.array([0, 0, 0, 1])
    >>> # Right 3 times in 4: the best fit gives 3/4, at T = 1 / ln 3.
    >>> round(fit_temperature(logits, labels), 6)
    0.910239
    """
    z = _scores(logits, "logits")
    y = _labels(labels, z.shape, "labels")
    return _fit_temperature(z, y)


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
    """
    counts, confidences, hits = _bin_statistics(probs, labels, num_bins)
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

    In a model: `model.compile(..., metrics=[ExpectedCalibrationError()])`.
    """

    def __init__(
        self, num_bins: int = 15, name: str = "expected_calibration_error", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.num_bins = _num_bins(num_bins)
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


def calibrate(model: keras.Model, x_val, y_val) -> keras.Model:
    """Returns `model` with its softmax replaced by a fitted, tempered one.

    Computes the logits of `model` on `x_val`, fits the temperature `T` of
    `fit_temperature` to them and `y_val`, and builds a new model that maps
    the same inputs to `StableSoftmax(temperature=T)` of those logits. It
    predicts the same classes as `model`, with calibrated confidences, and
    saves to `.keras` and loads with `safe_mode=True` once `keras_softmax`
    is imported.

    The logits are read off the last layer of `model`, which must be one of:

    - a layer whose activation is `"stable_softmax"`, `"softmax"` or a
      `StableSoftmax`, e.g. `Dense(C, activation="stable_softmax")`: a copy
      of the layer, with its weights and no activation, gives the logits;
    - a `StableSoftmax`, `Softmax` or softmax `Activation` layer over the
      last axis: its input is the logits;
    - a layer with a linear activation, e.g. `Dense(C)`: its output is the
      logits.

    The returned model shares every other layer with `model`, so training
    one trains the other.

    Args:
        model: A built Sequential or functional `keras.Model` with one
            output, of shape `(batch, num_classes)`.
        x_val: Validation inputs, in any form `model.predict` accepts.
        y_val: Validation labels: class ids of shape `(num_examples,)` or
            `(num_examples, 1)`, or one-hot rows.

    Returns:
        A functional `keras.Model` whose last layer is `StableSoftmax`, with
        the fitted temperature as its `temperature`.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import keras_softmax
    >>> from keras_softmax.calibration import calibrate
    >>> model = keras.Sequential(
    ...     [keras.Input((2,)), keras.layers.Dense(3, activation="stable_softmax")]
    ... )
    >>> x = np.random.default_rng(0).normal(size=(32, 2))
    >>> calibrated = calibrate(model, x, np.arange(32) % 3)
    >>> type(calibrated.layers[-1]).__name__
    'StableSoftmax'
    """
    inputs, logits = _logits_of(model)
    if len(logits.shape) != 2:
        raise ValueError(
            "`calibrate` needs a model whose logits have shape "
            f"(batch, num_classes). Received: logits of shape {logits.shape}"
        )
    values = keras.Model(inputs, logits).predict(x_val, verbose=0)
    z = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(z)):
        raise ValueError(
            "`model` gives non-finite logits on `x_val`, so no temperature "
            f"fits. Received: {int(np.sum(~np.isfinite(z)))} non-finite logits"
        )
    temperature = _fit_temperature(z, _labels(y_val, z.shape, "y_val"))
    outputs = StableSoftmax(
        temperature=temperature, name=_free_name(model, "calibrated_softmax")
    )(logits)
    return keras.Model(inputs, outputs, name=f"{model.name}_calibrated")


def reliability_diagram(probs, labels, num_bins: int = 15, ax=None):
    """Draws accuracy against confidence, bin by bin.

    Bars show the accuracy of each non-empty bin, shaded bars the gap to its
    mean confidence, and a dashed diagonal perfect calibration; the title
    gives the expected calibration error. Bins are those of
    `expected_calibration_error`. Needs matplotlib: `pip install
    keras-softmax[plots]`.

    Args:
        probs: Probabilities, as for `expected_calibration_error`.
        labels: Labels, as for `expected_calibration_error`.
        num_bins: Positive integer. Defaults to 15.
        ax: Optional matplotlib `Axes` to draw on. If `None`, a new figure
            is made, without pyplot, so no window opens and none is kept.

    Returns:
        The matplotlib `Figure` drawn on.

    Example:

    >>> from keras_softmax.calibration import reliability_diagram
    >>> probs = [[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.3, 0.7]]
    >>> figure = reliability_diagram(probs, [0, 0, 1, 0], num_bins=10)
    >>> figure.axes[0].get_title()
    'Reliability diagram (ECE = 15.00%)'
    """
    try:
        import matplotlib.figure
    except ImportError as error:
        raise ImportError(
            "`reliability_diagram` needs matplotlib. Install it with "
            "`pip install keras-softmax[plots]`."
        ) from error

    counts, confidences, hits = _bin_statistics(probs, labels, num_bins)
    ece = np.sum(np.abs(hits - confidences)) / np.sum(counts)
    if ax is None:
        ax = matplotlib.figure.Figure(figsize=(4.5, 4.5)).add_subplot()
    filled = counts > 0
    left = (np.arange(num_bins) / num_bins)[filled]
    accuracy = hits[filled] / counts[filled]
    confidence = confidences[filled] / counts[filled]
    bars = {"width": 1 / num_bins, "align": "edge", "edgecolor": "black"}
    ax.bar(left, accuracy, color="tab:blue", label="Accuracy", **bars)
    ax.bar(
        left,
        confidence - accuracy,
        bottom=accuracy,
        color="tab:red",
        alpha=0.3,
        hatch="//",
        label="Gap to confidence",
        **bars,
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", label="Perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("Confidence")
    ax.set_ylabel("Accuracy")
    ax.set_title(f"Reliability diagram (ECE = {100 * ece:.2f}%)")
    ax.legend(loc="upper left")
    return ax.figure


def _fit_temperature(z, y):
    """Minimises the NLL over `b = s / T` for checked float64 logits."""
    scale = np.max(np.abs(z))
    if scale == 0:
        return 1.0
    # Dividing by a power of 2 is exact and brings every logit into (-2, 2),
    # so no square below overflows, whatever the logits' magnitude.
    s = np.ldexp(1.0, max(int(np.frexp(scale)[1]) - 1, -1022))
    u = z / s
    u = u - np.max(u, axis=1, keepdims=True)
    if not np.any(u):
        return 1.0  # Every row is constant: the NLL does not depend on T.
    u_true = u[np.arange(len(y)), y]

    lo = s / _MAX_TEMPERATURE
    largest = np.finfo(np.float64).max
    hi = s / _MIN_TEMPERATURE if s < largest * _MIN_TEMPERATURE else largest
    if _slope(u, u_true, lo)[0] >= 0:
        return _MAX_TEMPERATURE
    if _slope(u, u_true, hi)[0] <= 0:
        return _MIN_TEMPERATURE

    b, g_prev = s, np.inf  # Start at T = 1.
    for _ in range(_MAX_STEPS):
        g, h = _slope(u, u_true, b)
        if g == 0:
            break
        lo, hi = (b, hi) if g < 0 else (lo, b)
        step_to = b - g / h if h > 0 else np.nan
        # Newton while it stays inside the bracket and converges; otherwise
        # bisect, in log space since the bracket spans six decades.
        if not (lo < step_to < hi and abs(g) < 0.5 * abs(g_prev)):
            step_to = np.sqrt(lo) * np.sqrt(hi)
        done = abs(step_to - b) <= _RTOL * b
        b, g_prev = step_to, g
        if done:
            break
    return float(np.clip(s / b, _MIN_TEMPERATURE, _MAX_TEMPERATURE))


def _slope(u, u_true, b):
    """The first and second derivatives of the mean NLL in `b`."""
    # Each row of u peaks at exactly 0, so the sum is at least 1.
    e = np.exp(b * u)
    p = e / np.sum(e, axis=1, keepdims=True)
    mean = np.sum(p * u, axis=1)
    var = np.sum(p * (u - mean[:, None]) ** 2, axis=1)
    return float(np.mean(mean - u_true)), float(np.mean(var))


def _bin_statistics(probs, labels, num_bins):
    """Per-bin example counts, confidence sums and numbers right."""
    num_bins = _num_bins(num_bins)
    p = _scores(probs, "probs")
    if np.any((p < 0) | (p > 1)):
        i, j = np.argwhere((p < 0) | (p > 1))[0]
        raise ValueError(
            f"`probs` must lie in [0, 1]. Received: probs[{i}, {j}]={p[i, j]}"
        )
    y = _labels(labels, p.shape, "labels")
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


def _scores(x, name):
    """Checks logits or probabilities; returns them as float64 NumPy."""
    x = _to_numpy(x)
    if x.dtype == bool or not (
        np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    ):
        raise ValueError(
            f"`{name}` must hold real numbers. Received: {name}.dtype={x.dtype}"
        )
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(
            f"`{name}` must have shape (num_examples, num_classes), with at "
            f"least two classes. Received: {name}.shape={x.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError(
            f"`{name}` must hold at least one example. Received: {name}.shape={x.shape}"
        )
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        i, j = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(
            f"`{name}` must be finite. Received: {name}[{i}, {j}]={x[i, j]}"
        )
    return x


def _labels(labels, scores_shape, name):
    """Checks class ids or one-hot rows; returns class ids as int64 NumPy."""
    n, num_classes = scores_shape
    labels = _to_numpy(labels)
    numeric = labels.dtype != bool and (
        np.issubdtype(labels.dtype, np.integer)
        or np.issubdtype(labels.dtype, np.floating)
    )
    if labels.shape == (n, num_classes):
        valid = (labels == 0) | (labels == 1)
        rows = np.all(valid, axis=1) & (np.sum(labels == 1, axis=1) == 1)
        if not np.all(rows):
            i = int(np.argmin(rows))
            raise ValueError(
                f"`{name}` of shape (num_examples, num_classes) must be one-hot: "
                f"one 1 per row, 0 elsewhere. Received: {name}[{i}]="
                f"{labels[i].tolist()}"
            )
        return np.argmax(labels, axis=1)
    if labels.shape not in ((n,), (n, 1)):
        raise ValueError(
            f"`{name}` must have shape ({n},) or ({n}, 1) of class ids, or "
            f"({n}, {num_classes}) of one-hot rows, to match {n} examples of "
            f"{num_classes} classes. Received: {name}.shape={labels.shape}"
        )
    labels = labels.reshape(-1)
    if not numeric:
        raise ValueError(
            f"`{name}` must be integer class ids. Received: {name}.dtype={labels.dtype}"
        )
    bad = ~np.isfinite(labels) | (labels != np.floor(labels))
    if np.any(bad):
        i = int(np.argmax(bad))
        raise ValueError(
            f"`{name}` must be integer class ids. Received: {name}[{i}]={labels[i]}"
        )
    out = (labels < 0) | (labels >= num_classes)
    if np.any(out):
        i = int(np.argmax(out))
        raise ValueError(
            f"`{name}` must be class ids in [0, {num_classes}). "
            f"Received: {name}[{i}]={labels[i]}"
        )
    return labels.astype(np.int64)


def _num_bins(num_bins):
    if (
        not isinstance(num_bins, numbers.Integral)
        or isinstance(num_bins, bool)
        or num_bins < 1
    ):
        raise ValueError(
            f"`num_bins` must be a positive integer. Received: num_bins={num_bins!r}"
        )
    return int(num_bins)


def _to_numpy(x):
    # Lists stay float64; tensors of any backend go through Keras.
    if ops.is_tensor(x) or isinstance(x, keras.Variable):
        return np.asarray(ops.convert_to_numpy(x))
    return np.asarray(x)


def _logits_of(model):
    """`(inputs, logits)`: the symbolic inputs and logits of `model`."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            "`model` must be a keras.Model. "
            f"Received: model of type {type(model).__name__}"
        )
    try:
        outputs = model.outputs
    except (AttributeError, ValueError) as error:
        raise ValueError(
            "`model` must be a built Sequential or functional model; call it "
            f"or build it first. Received: model={model.name!r}"
        ) from error
    if not outputs or len(outputs) != 1:
        raise ValueError(
            "`model` must have exactly one output. "
            f"Received: {len(outputs or ())} outputs"
        )
    # A Sequential model has one input, and no `input` until it is called.
    inputs = model.inputs[0] if isinstance(model, keras.Sequential) else model.input
    return inputs, _head_logits(model, outputs[0])


def _head_logits(model, output):
    """The logits that the last layer of `model` turns into `output`."""
    head = output._keras_history.operation
    activation = getattr(head, "activation", None)
    rank = len(output.shape)

    if isinstance(head, (StableSoftmax, keras.layers.Softmax)):
        _check_last_axis(head.axis, rank, head)
        return _input_of(head)
    if isinstance(head, keras.layers.Activation) and _is_softmax(activation):
        return _input_of(head)
    if _is_softmax(activation):
        if isinstance(activation, StableSoftmax):
            _check_last_axis(activation.axis, rank, head)
        # The same layer, weights and all, but without its activation.
        config = head.get_config()
        config["activation"] = "linear"
        config["name"] = _free_name(model, f"{head.name}_logits")
        copy = type(head).from_config(config)
        logits = copy(_input_of(head))
        copy.set_weights(head.get_weights())
        return logits
    if activation is keras.activations.linear:
        return output
    described = "no activation" if activation is None else f"activation {activation}"
    raise ValueError(
        "`calibrate` supports a model whose last layer has the activation "
        "`stable_softmax` or `softmax` (e.g. Dense(C, activation="
        "'stable_softmax')), is a StableSoftmax, Softmax or softmax Activation "
        "layer, or has a linear activation (its output is then the logits). "
        f"Received: last layer {head.name!r} ({type(head).__name__}) with "
        f"{described}"
    )


def _is_softmax(activation):
    return (
        activation is stable_softmax
        or activation is keras.activations.softmax
        or isinstance(activation, StableSoftmax)
    )


def _check_last_axis(axis, rank, head):
    if axis not in (-1, rank - 1):
        raise ValueError(
            "`calibrate` needs the softmax over the last axis. "
            f"Received: layer {head.name!r} with axis={axis!r}"
        )


def _input_of(layer):
    try:
        return layer.input
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"`calibrate` needs the last layer to be called once, on one "
            f"input. Received: layer {layer.name!r}"
        ) from error


def _free_name(model, name):
    # Functional models need unique layer names; Keras picks one otherwise.
    taken = {layer.name for layer in model.layers}
    return None if name in taken else name
