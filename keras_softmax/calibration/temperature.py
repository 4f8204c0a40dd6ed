"""Temperature scaling: fit the temperature, and apply it to a trained model.

Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural
Networks") divides a classifier's logits by one scalar `T` fitted on
held-out data; it changes no prediction, only how sure the model says it is.
"""

import keras
import numpy as np

from keras_softmax.calibration._inputs import check_labels
from keras_softmax.calibration._inputs import check_scores
from keras_softmax.calibration.logits import free_name
from keras_softmax.calibration.logits import logits_of
from keras_softmax.layer import StableSoftmax

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

    Probabilities are not logits: where every row is in `[0, 1]` and sums
    to 1 (one-hot rows aside), a `ValueError` says so, and
    `logits_model(model).predict(x)` gives a model's logits. Adding a
    constant to a row changes no fitted temperature, so logits that only
    look like probabilities can be shifted; and log-probabilities of a
    softmax are its logits shifted per row: `np.log(probabilities)` works
    where no probability is 0.

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
    >>> logits = np.array([[2.0, 0.0]] * 4)
    >>> labels = np.array([0, 0, 0, 1])
    >>> # Right 3 times in 4: the best fit gives 3/4, at T = 2 / ln 3.
    >>> round(fit_temperature(logits, labels), 6)
    1.820478

    Reference:

    - [Guo et al., 2017](https://arxiv.org/abs/1706.04599), "On Calibration
      of Modern Neural Networks", ICML 2017.
    """
    z = check_scores(logits, "logits")
    _refuse_probabilities(z)
    y = check_labels(labels, z.shape, "labels")
    return _fit_temperature(z, y)


def _refuse_probabilities(z):
    """A fitted `T` of probabilities would be plausible and meaningless."""
    # One-hot rows are kept: as logits they are an ordinary margin of 1.
    inside = (z > 0) & (z < 1)
    rows_are_distributions = np.all((z >= 0) & (z <= 1)) and np.allclose(
        z.sum(axis=1), 1.0, atol=1e-5
    )
    if rows_are_distributions and np.any(inside):
        raise ValueError(
            "`logits` look like probabilities: every row is in [0, 1] and "
            "sums to 1. `fit_temperature` needs the logits the softmax "
            "normalises: `keras_softmax.calibration.logits_model(model)"
            ".predict(x)` gives them, and `calibrate(model, x_val, y_val)` "
            f"fits and applies the temperature in one call. Received: "
            f"logits[0]={z[0].tolist()}"
        )


def calibrate(model: keras.Model, x_val, y_val) -> keras.Model:
    """Returns `model` with its softmax replaced by a fitted, tempered one.

    Computes the logits of `model` on `x_val`, fits the temperature `T` of
    `fit_temperature` to them and `y_val`, and builds a new model that maps
    the same inputs to `StableSoftmax(temperature=T)` of those logits. It
    predicts the same classes as `model`, with calibrated confidences, and
    saves to `.keras` and loads with `safe_mode=True` once `keras_softmax`
    is imported.

    The logits are read off the last layer of `model` as `logits_model`
    reads them, which says which last layers it supports: a softmax
    activation or layer, a `StableSoftmaxHead`, or a linear one. They are
    the logits before any temperature of that softmax, which the fitted
    temperature replaces.

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

    Reference:

    - [Guo et al., 2017](https://arxiv.org/abs/1706.04599), "On Calibration
      of Modern Neural Networks".
    """
    inputs, logits = logits_of(model, "calibrate")
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
    temperature = _fit_temperature(z, check_labels(y_val, z.shape, "y_val"))
    outputs = StableSoftmax(
        temperature=temperature, name=free_name(model, "calibrated_softmax")
    )(logits)
    return keras.Model(inputs, outputs, name=f"{model.name}_calibrated")


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
