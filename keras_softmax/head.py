"""`StableSoftmaxHead`: `Dense(V, activation="stable_softmax")` that trains fused.

A language model's output layer at a large vocabulary. Its weights are
exactly `Dense(V)`'s, and outside training it returns the same
probabilities. In training it passes its hidden states through, and the
loss from `head.loss()` charges `linear_cross_entropy` on them with the
head's kernel and bias, so the `[tokens, vocabulary]` logits are never
built.
"""

import keras
from keras import ops

from keras_softmax import _keras_internals
from keras_softmax import _temperature
from keras_softmax.linear_cross_entropy import linear_cross_entropy
from keras_softmax.softmax import stable_softmax


@keras.saving.register_keras_serializable(package="keras_softmax")
class StableSoftmaxHead(keras.layers.Dense):
    """A softmax output layer whose training loss never builds the logits.

    Use it as the last layer, and compile with its loss:

        head = keras_softmax.StableSoftmaxHead(vocabulary_size)
        model = keras.Sequential([..., head])
        model.compile(optimizer="adam", loss=head.loss())
        model.fit(hidden_inputs, labels)

    `predict`, `evaluate` and any call outside training return the
    probabilities of `Dense(units, activation=StableSoftmax(temperature))`
    with the same weights (`set_weights` swaps between the two). In
    training (`fit`, or `training=True`) it returns its input, the hidden
    states, for `head.loss()` to turn into the exact cross-entropy of
    those probabilities a chunk of tokens at a time. Metrics given to
    `compile` see those hidden states in `fit`, so measure accuracy with
    `evaluate`; `evaluate` charges the cross-entropy of the predicted
    probabilities, as `SparseCategoricalCrossentropy()` does.

    Args:
        units: The vocabulary size `V`.
        temperature: Positive finite number dividing the logits, in the
            probabilities and the loss alike.
        **kwargs: `Dense`'s arguments other than `activation`
            (`use_bias`, initializers, regularizers, constraints) and the
            base layer's.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> import keras_softmax
    >>> head = keras_softmax.StableSoftmaxHead(5, temperature=2.0)
    >>> hidden = np.ones((2, 3), "float32")
    >>> dense = keras.layers.Dense(5)
    >>> _ = dense(hidden), head(hidden)
    >>> dense.set_weights(head.get_weights())
    >>> expected = keras_softmax.stable_softmax(dense(hidden), temperature=2.0)
    >>> to_numpy = keras.ops.convert_to_numpy
    >>> bool(np.allclose(to_numpy(head(hidden)), to_numpy(expected), rtol=1e-6))
    True
    >>> loss = head.loss()(np.array([0, 4]), head(hidden, training=True))
    >>> float(loss) > 0
    True
    """

    def __init__(self, units: int, temperature: float = 1.0, **kwargs):
        activation = kwargs.pop("activation", None)
        if activation is not None:
            raise ValueError(
                "`StableSoftmaxHead` applies `stable_softmax` itself; it takes "
                f"no `activation`. Received: activation={activation!r}"
            )
        super().__init__(units, **kwargs)
        self.temperature = _temperature.check_temperature_value(temperature)

    def call(self, inputs, training=None):
        if training:
            return inputs
        return stable_softmax(super().call(inputs), temperature=self.temperature)

    def loss(
        self,
        *,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        ignore_class: int | None = None,
        reduction: str | None = "sum_over_batch_size",
        chunk_size: int | None = None,
        name: str = "stable_softmax_head_cross_entropy",
    ) -> keras.losses.Loss:
        """The loss to compile with: this head's fused sparse cross-entropy.

        Given the hidden states that the head returns in training, it
        equals `SparseCategoricalCrossentropy(from_logits=True,
        ignore_class=ignore_class, reduction=reduction)` on the head's
        logits divided by its temperature, sample weights, Keras masks and
        `tf.distribute` replicas included, without building the logits.
        Given probabilities (in `evaluate`), it is
        `SparseCategoricalCrossentropy()` of them.

        Args:
            label_smoothing: As in `linear_cross_entropy`.
            z_loss: As in `linear_cross_entropy`.
            ignore_class: As in `linear_cross_entropy`.
            chunk_size: As in `linear_cross_entropy`.
            reduction: Any reduction `keras.losses.Loss` takes, as it
                reduces: `"mean_with_sample_weight"` too.
            name: The loss's name.

        Returns:
            A `keras.losses.Loss`.
        """
        return _HeadCrossEntropy(
            self,
            options=dict(
                label_smoothing=label_smoothing,
                z_loss=z_loss,
                ignore_class=ignore_class,
                chunk_size=chunk_size,
            ),
            reduction=reduction,
            name=name,
        )

    def get_config(self):
        config = super().get_config()
        del config["activation"]
        config["temperature"] = self.temperature
        return config


@keras.saving.register_keras_serializable(package="keras_softmax")
class _HeadCrossEntropy(keras.losses.Loss):
    """`StableSoftmaxHead.loss()`. A saved model's compile configuration
    names it, but it holds the layer, so it cannot be rebuilt from that."""

    def __init__(self, head, options, reduction, name):
        super().__init__(reduction=reduction, name=name)
        self.head = head
        self.options = options

    def __call__(self, y_true, y_pred, sample_weight=None):
        mask = _keras_internals.get_keras_mask(y_pred)
        if (
            sample_weight is None
            and mask is None
            and not self._on_probabilities(y_pred)
        ):
            return self._fused(y_true, y_pred)
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def _fused(self, y_true, y_pred):
        """Keras' reduction of the unweighted, unmasked losses, in one pass
        whose gradients are computed with the loss."""
        if self.reduction in (None, "none", "sum"):
            return self._cross_entropy(y_true, y_pred, self.reduction)
        # Unweighted, Keras' every mean divides by the positions that
        # `ignore_class` leaves, "mean_with_sample_weight" too.
        loss = self._cross_entropy(y_true, y_pred, "sum_over_batch_size")
        # A mean over tf.distribute's replicas, whose gradients add up, as
        # Keras scales its own mean reductions.
        return _keras_internals.scale_loss_for_distribution(loss)

    def call(self, y_true, y_pred):
        ignore_class = self.options["ignore_class"]
        if self._on_probabilities(y_pred):
            return keras.losses.sparse_categorical_crossentropy(
                y_true, y_pred, ignore_class=ignore_class
            )
        losses = self._cross_entropy(y_true, y_pred, None)
        if ignore_class is not None:
            # As Keras' sparse cross-entropy: ignored positions are masked
            # out of the reduction, not only zero.
            labels = ops.cast(_labels(y_true, y_pred), "int32")
            _keras_internals.set_keras_mask(losses, labels != ignore_class)
        return losses

    def _cross_entropy(self, y_true, y_pred, reduction):
        return linear_cross_entropy(
            _labels(y_true, y_pred),
            y_pred,
            self.head.kernel,
            self.head.bias,
            temperature=self.head.temperature,
            reduction=reduction,
            **self.options,
        )

    def _on_probabilities(self, y_pred):
        depth, units = self.head.kernel.shape
        if depth == units:
            raise ValueError(
                "A `StableSoftmaxHead` whose input size equals its vocabulary "
                "cannot tell hidden states from probabilities. Received: "
                f"input size {depth}, units={units}"
            )
        return y_pred.shape[-1] == units

    @classmethod
    def from_config(cls, config):
        raise ValueError(
            "A `StableSoftmaxHead`'s loss holds the head: load the model with "
            "`compile=False`, then compile it again with `loss=head.loss()`."
        )


def _labels(y_true, y_pred):
    """Class ids of the hidden states' leading shape (Keras may add an axis)."""
    labels = ops.convert_to_tensor(y_true)
    if len(labels.shape) == len(y_pred.shape):
        labels = ops.squeeze(labels, axis=-1)
    return labels
