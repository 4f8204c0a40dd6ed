"""Temperature scaling: fit it, measure calibration, apply it to a model.

A classifier is calibrated when, among the examples it predicts with
confidence `c`, a fraction `c` is right. Temperature scaling (Guo et al.,
2017, "On Calibration of Modern Neural Networks") divides the logits by one
scalar `T` fitted on held-out data; it changes no prediction, only how sure
the model says it is. One module per job:

- `temperature`: `fit_temperature` finds the `T` that minimises the
  validation NLL, exactly; `calibrate` turns a trained classifier into one
  that ends with `StableSoftmax(temperature=T)`, so it saves and loads like
  any model.
- `logits`: `logits_model` gives a model of a classifier's logits, what
  its softmax normalises and `fit_temperature` needs.
- `metric`: `expected_calibration_error` and the `ExpectedCalibrationError`
  metric measure the top-label calibration error with equal-width bins.
- `plot`: `reliability_diagram` draws accuracy against confidence (needs
  the `plots` extra: `pip install keras-softmax[plots]`).

The two NumPy functions work in float64 on arrays or tensors; the metric is
written with `keras.ops` only, so it runs inside `fit` and `evaluate`. Every
name is importable from `keras_softmax.calibration` itself.
"""

from keras_softmax.calibration.logits import logits_model
from keras_softmax.calibration.metric import ExpectedCalibrationError
from keras_softmax.calibration.metric import expected_calibration_error
from keras_softmax.calibration.plot import reliability_diagram
from keras_softmax.calibration.temperature import calibrate
from keras_softmax.calibration.temperature import fit_temperature

__all__ = [
    "ExpectedCalibrationError",
    "calibrate",
    "expected_calibration_error",
    "fit_temperature",
    "logits_model",
    "reliability_diagram",
]
