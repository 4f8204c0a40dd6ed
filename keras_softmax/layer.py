"""The `StableSoftmax` layer: mask-aware, with a fixed or learnable temperature."""

import math
import warnings

import keras
from keras import ops

from keras_softmax import _arguments
from keras_softmax import _backend
from keras_softmax import _keras_internals
from keras_softmax import _masks
from keras_softmax import _temperature
from keras_softmax.softmax import stable_softmax


@keras.saving.register_keras_serializable(package="keras_softmax")
class StableSoftmax(keras.layers.Layer):
    """Softmax layer that is exact for any finite logits.

    It consumes Keras masks: a mask from `Embedding(mask_zero=True)` or
    `Masking` upstream reaches `call` and its masked positions come out as
    exactly 0. It also serves as a tempered activation,
    `Dense(10, activation=StableSoftmax(temperature=0.5))`, but an
    activation sees no mask: Keras passes none to activations. To normalise
    over padded timesteps, apply it as a layer after `Dense` (it warns when
    it sees the mask dropped that way).

    The temperature is a variable, so setting `layer.temperature` takes
    effect in the next call, `predict`, `fit` or `evaluate`, without
    recompiling the model.

    Args:
        axis: Integer, tuple of integers to normalise jointly over, or
            `None` for all axes. Defaults to `-1`.
        temperature: Positive finite number dividing the logits, or a
            `keras.Variable` holding one, which the layer then follows.
            With `trainable_temperature=True` it is the initial value.
        trainable_temperature: If `True`, the temperature is a weight that
            `fit` learns. It is stored as its logarithm, so it stays
            strictly positive.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: The logits.
        mask: Optional bool tensor, `True` to keep a position. Keras passes
            the upstream mask here by itself: a mask of one value per
            timestep, shaped like the leading axes of `inputs`, applies to
            all the trailing axes; any other mask broadcasts as in NumPy.

    Returns:
        Probabilities of the same shape as `inputs`.

    Example:

    >>> import numpy as np
    >>> import keras_softmax
    >>> layer = keras_softmax.StableSoftmax(temperature=2.0)
    >>> p = layer(np.array([[2.0, 0.0, -2.0]]), mask=np.array([[1, 1, 0]]))
    >>> [round(float(v), 6) for v in p[0]]
    [0.731059, 0.268941, 0.0]
    >>> layer.temperature = 1.0
    >>> p = layer(np.array([[2.0, 0.0, -2.0]]), mask=np.array([[1, 1, 0]]))
    >>> [round(float(v), 6) for v in p[0]]
    [0.880797, 0.119203, 0.0]
    """

    def __init__(
        self,
        axis: int | tuple[int, ...] | None = -1,
        temperature: float | keras.Variable = 1.0,
        trainable_temperature: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.axis = _arguments.check_axis_spec(axis)
        self.trainable_temperature = _arguments.check_flag(
            "trainable_temperature", trainable_temperature
        )
        # The temperature lives in a variable whatever the input, so the
        # layer is built here, as Keras' own Softmax is.
        if isinstance(temperature, keras.Variable):
            if trainable_temperature:
                raise ValueError(
                    "`trainable_temperature=True` makes a temperature weight "
                    "of its own: pass the initial value as a number. Received: "
                    f"temperature={temperature!r}"
                )
            self._temperature_variable = temperature
        else:
            value = _temperature.check_temperature_value(temperature)
            if trainable_temperature:
                self.log_temperature = self.add_weight(
                    shape=(),
                    initializer=keras.initializers.Constant(math.log(value)),
                    name="log_temperature",
                )
            else:
                self._temperature_variable = self.add_weight(
                    shape=(),
                    initializer=keras.initializers.Constant(value),
                    trainable=False,
                    name="temperature",
                )
        self.supports_masking = True
        self._warned_mask_dropped = False
        self._build_at_init()

    @property
    def temperature(self) -> float:
        """The temperature in use, as a Python float; settable at any time."""
        # The shortest decimal that the variable's dtype reads back as the
        # same value: 0.7, not 0.699999988079071.
        return float(str(_backend.read(self.current_temperature())))

    @temperature.setter
    def temperature(self, value):
        value = _temperature.check_temperature_value(value)
        if self.trainable_temperature:
            self.log_temperature.assign(math.log(value))
        else:
            self._temperature_variable.assign(value)

    def current_temperature(self):
        """The temperature in use as a tensor: the learned one when trainable."""
        if self.trainable_temperature:
            return ops.exp(self.log_temperature)
        return ops.convert_to_tensor(self._temperature_variable)

    def __call__(self, inputs, *args, **kwargs):
        mask_given = args or kwargs.get("mask") is not None
        if not (
            self._warned_mask_dropped or mask_given
        ) and _keras_internals.outer_call_is_masked(self):
            self._warned_mask_dropped = True
            warnings.warn(
                f"{self.__class__.__name__}(axis={self.axis!r}) runs as the "
                "activation of a layer whose input has a Keras mask, and Keras "
                "passes no mask to activations: padded positions are not "
                "excluded. Apply it as a layer after that one instead, e.g. "
                "`StableSoftmax(axis=1)(Dense(1)(x))`.",
                UserWarning,
                stacklevel=2,
            )
        return super().__call__(inputs, *args, **kwargs)

    def call(self, inputs, mask=None):
        mask = _masks.to_keep_mask(mask, _backend.static_shape(inputs), "leading")
        return stable_softmax(
            inputs,
            axis=self.axis,
            mask=mask,
            temperature=self.current_temperature(),
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def load_own_variables(self, store):
        # Files saved before the fixed temperature became a variable hold no
        # weight for it: the value in the config stands.
        if not store.keys() and not self.trainable_temperature:
            return
        super().load_own_variables(store)

    @classmethod
    def from_config(cls, config):
        # Keras would wrap the constructor's ValueError in a TypeError.
        _arguments.check_axis_spec(config.get("axis", -1))
        _temperature.check_temperature_value(config.get("temperature", 1.0))
        _arguments.check_flag(
            "trainable_temperature", config.get("trainable_temperature", False)
        )
        return super().from_config(config)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "axis": self.axis,
                "temperature": self.temperature,
                "trainable_temperature": self.trainable_temperature,
            }
        )
        return config
