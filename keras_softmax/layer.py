"""The `StableSoftmax` layer: mask-aware, with a fixed or learnable temperature."""

import math

import keras
from keras import ops

from keras_softmax import _checks
from keras_softmax.softmax import stable_softmax


@keras.saving.register_keras_serializable(package="keras_softmax")
class StableSoftmax(keras.layers.Layer):
    """Softmax layer that is exact for any finite logits.

    It consumes Keras masks: a mask from `Embedding(mask_zero=True)` or
    `Masking` upstream reaches `call` and its masked positions come out as
    exactly 0. It also serves as a tempered activation:
    `Dense(10, activation=StableSoftmax(temperature=0.5))`.

    Args:
        axis: Integer, or tuple of integers to normalise jointly over.
            Defaults to `-1`.
        temperature: Positive finite number dividing the logits. With
            `trainable_temperature=True` it is the initial value.
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
    """

    def __init__(
        self,
        axis: int | tuple[int, ...] = -1,
        temperature: float = 1.0,
        trainable_temperature: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.axis, self.temperature, self.trainable_temperature = _checked(
            axis, temperature, trainable_temperature
        )
        self.supports_masking = True

    def build(self, input_shape):
        if self.trainable_temperature:
            self.log_temperature = self.add_weight(
                shape=(),
                initializer=keras.initializers.Constant(math.log(self.temperature)),
                name="log_temperature",
            )

    def current_temperature(self):
        """The temperature in use: the learned one when it is trainable."""
        if self.trainable_temperature:
            return ops.exp(self.log_temperature)
        return self.temperature

    def call(self, inputs, mask=None):
        if mask is not None:
            mask = _align_keras_mask(mask, inputs)
        return stable_softmax(
            inputs,
            axis=self.axis,
            mask=mask,
            temperature=self.current_temperature(),
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    @classmethod
    def from_config(cls, config):
        # Keras would wrap the constructor's ValueError in a TypeError.
        _checked(
            config.get("axis", -1),
            config.get("temperature", 1.0),
            config.get("trainable_temperature", False),
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


def _checked(axis, temperature, trainable_temperature):
    if not isinstance(trainable_temperature, bool):
        raise ValueError(
            "`trainable_temperature` must be True or False. "
            f"Received: trainable_temperature={trainable_temperature!r}"
        )
    return (
        _checks.axis_spec(axis),
        _checks.temperature_value(temperature),
        trainable_temperature,
    )


def _align_keras_mask(mask, inputs):
    """Gives a per-timestep Keras mask trailing axes, so it broadcasts."""
    mask_rank, rank = len(mask.shape), len(inputs.shape)
    if mask_rank < rank and tuple(mask.shape) == tuple(inputs.shape[:mask_rank]):
        return ops.reshape(mask, tuple(ops.shape(mask)) + (1,) * (rank - mask_rank))
    return mask
