"""`StableSoftmaxHead`: `Dense(V, activation="stable_softmax")` that trains fused.

A language model's output layer at a large vocabulary. Its weights are
exactly `Dense(V)`'s, or an embedding table it is tied to, and outside
training it returns the probabilities. In training it passes its hidden
states through, and the loss from `head.loss()` charges
`linear_cross_entropy` on them with the head's weights, so the
`[tokens, vocabulary]` logits are never built; its metrics
(`head.accuracy()`) rank the logits a chunk at a time too.
`FusedHeadModel` makes `evaluate` do the same.
"""

import contextlib
import contextvars
from typing import NamedTuple

import keras
from keras import ops

from keras_softmax import _arguments
from keras_softmax import _keras_internals
from keras_softmax import _numerics
from keras_softmax import _temperature
from keras_softmax.linear_cross_entropy import LossAndRanks
from keras_softmax.linear_cross_entropy import linear_cross_entropy
from keras_softmax.linear_cross_entropy import linear_cross_entropy_and_ranks
from keras_softmax.linear_cross_entropy import linear_label_ranks
from keras_softmax.linear_cross_entropy import top_k_hits
from keras_softmax.softmax import stable_softmax

# Set while `FusedHeadModel` evaluates: heads then return hidden states.
_RETURNING_HIDDEN_STATES = contextvars.ContextVar(
    "returning_hidden_states", default=False
)


# While `FusedHeadModel` steps on JAX: the values of the model's variables,
# which JAX's trainer passes as the step's state (by variable id).
_STEP_WEIGHTS = contextvars.ContextVar("step_weights", default=None)

# While `FusedHeadModel` steps: the label ranks that each head's loss
# counted for its metrics (by head id). Keras' trainers update metrics
# after the optimizer (TensorFlow, PyTorch) or outside the gradient's
# trace (JAX), where the loss's own inputs can no longer be matched.
_STEP_RANKS = contextvars.ContextVar("step_ranks", default=None)


@contextlib.contextmanager
def _set(variable: contextvars.ContextVar, value):
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


def _step_weights(model, args):
    """The values of `model`'s variables in a JAX step's state (None on
    other backends, whose variables hold their values)."""
    if keras.backend.backend() != "jax":
        return None
    trainable, non_trainable = args[0][:2]
    pairs = zip(
        model.trainable_variables + model.non_trainable_variables,
        list(trainable) + list(non_trainable),
        strict=True,
    )
    return {id(variable): value for variable, value in pairs}


def _value_in_step(variable):
    """`variable`, or its value in the step that JAX's trainer is tracing."""
    values = _STEP_WEIGHTS.get()
    if values is not None and id(variable) in values:
        return values[id(variable)]
    if _keras_internals.is_emptied(variable):
        raise ValueError(
            "On JAX, `fit` and `evaluate` keep a model's weights in their "
            "state, where a `StableSoftmaxHead`'s metrics find them only in "
            "a `keras_softmax.FusedHeadModel`: build the model as one. "
            f"Received: a read of {variable.path!r} in a step"
        )
    return variable


class OutputWeights(NamedTuple):
    """A head's output weights, as `linear_cross_entropy` takes them."""

    kernel: object  # [D, V], or [V, D] if `transposed`
    bias: object  # [V] or None
    transposed: bool


class _Tie:
    """The embedding layer whose table a head shares, held where Keras does
    not track it: the table is that layer's weight, saved once, there."""

    def __init__(self, name: str, layer=None):
        self.name, self.layer = name, layer


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

    Tied to an embedding layer (`tied_to`), the head owns no kernel: its
    logits are `inputs @ table.T + bias` with that layer's `[V, D]` table,
    read in place, as keras-hub's `ReversibleEmbedding(reverse=True)`
    computes them. `FusedHeadModel` re-ties it when a saved model loads.

    Args:
        units: The vocabulary size `V`.
        temperature: Positive finite number dividing the logits, in the
            probabilities and the loss alike.
        logit_soft_cap: Optional positive `c`: the logits are
            `c * tanh(logits / c)` (Gemma's final soft cap), in the
            probabilities, the loss and the metrics.
        tied_to: Optional embedding layer whose `embeddings` table
            (`[V, D]`: `keras.layers.Embedding`, keras-hub's
            `ReversibleEmbedding`) the head uses as its kernel.
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

    def __init__(
        self,
        units: int,
        temperature: float = 1.0,
        *,
        logit_soft_cap: float | None = None,
        tied_to: "keras.layers.Layer | str | None" = None,
        **kwargs,
    ):
        activation = kwargs.pop("activation", None)
        if activation is not None:
            raise ValueError(
                "`StableSoftmaxHead` applies `stable_softmax` itself; it takes "
                f"no `activation`. Received: activation={activation!r}"
            )
        super().__init__(units, **kwargs)
        self.temperature = _temperature.check_temperature_value(temperature)
        self.logit_soft_cap = _arguments.check_real(
            "logit_soft_cap",
            logit_soft_cap,
            minimum=0,
            open_minimum=True,
            allow_none=True,
        )
        self._tie = _checked_tie(tied_to)
        # Whether this head has metrics, and the label ranks its loss last
        # computed for them (see `_HeadCrossEntropy._rank_for_metrics`).
        self._has_metrics = False
        self._ranked = None

    def build(self, input_shape):
        if self._tie is None:
            return super().build(input_shape)
        # Tied: no kernel of its own; a bias if asked for.
        self.bias = (
            self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
            if self.use_bias
            else None
        )
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_shape[-1]})
        self.built = True

    def call(self, inputs, training=None):
        if training or _RETURNING_HIDDEN_STATES.get():
            return inputs
        if self._tie is None:
            logits = super().call(inputs)
        else:
            weights = self.output_weights()
            logits = ops.matmul(inputs, ops.transpose(weights.kernel))
            logits = logits if weights.bias is None else logits + weights.bias
        logits = _numerics.soft_cap(logits, self.logit_soft_cap)
        return stable_softmax(logits, temperature=self.temperature)

    def output_weights(self) -> OutputWeights:
        """The kernel (or tied table) and bias that make the logits."""
        if self._tie is None:
            return OutputWeights(self.kernel, self.bias, transposed=False)
        layer = self._tie.layer
        if layer is None:
            raise ValueError(
                f"This `StableSoftmaxHead` is tied to {self._tie.name!r}, which "
                "it has not found: load a saved model as a "
                "`keras_softmax.FusedHeadModel`, which ties its heads. "
                f"Received: tied_to={self._tie.name!r}"
            )
        table = layer.embeddings
        if tuple(table.shape)[0] != self.units:
            raise ValueError(
                f"The table of `tied_to` ({layer.name!r}) has "
                f"{table.shape[0]} rows, not units={self.units}. Received: "
                f"embeddings.shape={tuple(table.shape)}"
            )
        return OutputWeights(table, self.bias, transposed=True)

    def tie(self, layer) -> None:
        """Ties the head to `layer`'s table (`FusedHeadModel` does on load)."""
        self._tie = _checked_tie(layer)

    def save_own_variables(self, store):
        if self._tie is None:
            return super().save_own_variables(store)
        # The bias alone: `Dense`'s would save a kernel first.
        return keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store):
        if self._tie is None:
            return super().load_own_variables(store)
        return keras.layers.Layer.load_own_variables(self, store)

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

    def accuracy(self, *, name: str = "accuracy") -> keras.metrics.Metric:
        """`SparseCategoricalAccuracy` of this head's predictions, computed
        from the hidden states without the logits.

        Given the hidden states (`fit`, `FusedHeadModel.evaluate`), a
        position is right where its label has the largest logit, ties
        going to the lower class id as `argmax` breaks them; given
        probabilities (`evaluate` of another model), it is Keras' own.
        Sample weights and Keras masks weigh the positions as Keras'
        metrics do.

        Args:
            name: The metric's name.

        Returns:
            A `keras.metrics.Metric`.
        """
        self._has_metrics = True
        return _HeadAccuracy(self, k=1, name=name)

    def top_k_accuracy(
        self, k: int = 5, *, name: str = "top_k_accuracy"
    ) -> keras.metrics.Metric:
        """`SparseTopKCategoricalAccuracy(k)` of this head's predictions,
        computed from the hidden states without the logits.

        A position is right where fewer than `k` classes rank above its
        label: a larger logit, or an equal one at a lower class id.

        Args:
            k: How many of the largest logits count.
            name: The metric's name.

        Returns:
            A `keras.metrics.Metric`.
        """
        k = _arguments.check_positive_integer("k", k)
        self._has_metrics = True
        return _HeadAccuracy(self, k=k, name=name)

    def get_config(self):
        config = super().get_config()
        del config["activation"]
        config["temperature"] = self.temperature
        config["logit_soft_cap"] = self.logit_soft_cap
        config["tied_to"] = None if self._tie is None else self._tie.name
        return config


def _checked_tie(tied_to) -> _Tie | None:
    """`tied_to` checked: None, a layer with an `embeddings` table, or the
    name of one (from a saved configuration)."""
    if tied_to is None:
        return None
    if isinstance(tied_to, str):
        return _Tie(tied_to)
    # An unbuilt `Embedding` has no table yet.
    if not isinstance(tied_to, keras.layers.Embedding) and not (
        isinstance(tied_to, keras.layers.Layer) and hasattr(tied_to, "embeddings")
    ):
        raise ValueError(
            "`tied_to` must be an embedding layer, with an `embeddings` table "
            f"[V, D]. Received: tied_to={tied_to!r}"
        )
    return _Tie(tied_to.name, tied_to)


@keras.saving.register_keras_serializable(package="keras_softmax")
class FusedHeadModel(keras.Model):
    """A functional `keras.Model` whose `evaluate` never builds the logits.

    Built as `keras.Model(inputs, outputs)` is, for a model whose output
    is a `StableSoftmaxHead`. `fit` trains as in any model; `evaluate`
    hands the heads' hidden states to their fused loss and metrics, as
    `fit` does, instead of the `[tokens, V]` probabilities; `predict` and
    calls return the probabilities. On `keras.models.load_model`, it ties
    each tied head to its embedding layer again, by name. It takes the
    arguments of `keras.Model(inputs, outputs, name=...)`.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> import keras_softmax
    >>> tokens = keras.Input((None,), dtype="int32")
    >>> embedding = keras.layers.Embedding(50, 8)
    >>> head = keras_softmax.StableSoftmaxHead(50, tied_to=embedding)
    >>> model = keras_softmax.FusedHeadModel(tokens, head(embedding(tokens)))
    >>> model.compile("adam", loss=head.loss(), metrics=[head.accuracy()])
    >>> x = np.random.default_rng(0).integers(0, 50, size=(4, 6))
    >>> _ = model.fit(x, x, epochs=1, verbose=0)
    >>> sorted(model.evaluate(x, x, verbose=0, return_dict=True))
    ['accuracy', 'loss']
    >>> model.predict(x, verbose=0).shape
    (4, 6, 50)
    """

    # `*args`: Keras saves and rebuilds a functional subclass whose
    # constructor takes what `keras.Model`'s does.
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _tie_heads(self)

    def train_step(self, *args, **kwargs):
        with _set(_STEP_WEIGHTS, _step_weights(self, args)), _set(_STEP_RANKS, {}):
            return super().train_step(*args, **kwargs)

    def test_step(self, *args, **kwargs):
        # Traced inside the contexts, so the compiled step keeps them.
        with _set(_STEP_WEIGHTS, _step_weights(self, args)), _set(_STEP_RANKS, {}):
            with _set(_RETURNING_HIDDEN_STATES, True):
                return super().test_step(*args, **kwargs)


def _tie_heads(model):
    """Ties each head of `model` that knows only its table's layer's name."""
    layers = {layer.name: layer for layer in model._flatten_layers()}  # noqa: SLF001
    for layer in layers.values():
        tie = getattr(layer, "_tie", None)
        if isinstance(layer, StableSoftmaxHead) and tie and tie.layer is None:
            if tie.name not in layers:
                raise ValueError(
                    f"A `StableSoftmaxHead` is tied to {tie.name!r}, a layer this "
                    f"model does not hold. Received: tied_to={tie.name!r}"
                )
            layer.tie(layers[tie.name])


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
        if mask is None and not _on_probabilities(self.head, y_pred):
            return self._fused(y_true, y_pred, sample_weight)
        sample_weight = _per_sequence_weight_at_each_position(sample_weight, y_pred)
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def _fused(self, y_true, y_pred, sample_weight):
        """Keras' reduction of the weighted losses, in one pass whose
        gradients are computed with the loss, and where the head has
        metrics, the labels' ranks they need."""
        ranked = self.head._has_metrics
        loss, ranks = self._cross_entropy(
            y_true, y_pred, self.reduction, sample_weight, ranked=ranked
        )
        if ranked:
            _leave_for_metrics(self.head, y_pred, ranks)
        if self.reduction in (None, "none", "sum"):
            return loss
        # A mean over tf.distribute's replicas, whose gradients add up, as
        # Keras scales its own mean reductions.
        return _keras_internals.scale_loss_for_distribution(loss)

    def call(self, y_true, y_pred):
        ignore_class = self.options["ignore_class"]
        if _on_probabilities(self.head, y_pred):
            return keras.losses.sparse_categorical_crossentropy(
                y_true, y_pred, ignore_class=ignore_class
            )
        losses = self._cross_entropy(y_true, y_pred, None).loss
        if ignore_class is not None:
            # As Keras' sparse cross-entropy: ignored positions are masked
            # out of the reduction, not only zero.
            labels = ops.cast(_labels(y_true, y_pred), "int32")
            _keras_internals.set_keras_mask(losses, labels != ignore_class)
        return losses

    def _cross_entropy(
        self, y_true, y_pred, reduction, sample_weight=None, ranked=False
    ) -> LossAndRanks:
        """The loss and, if `ranked`, the labels' ranks from the same pass."""
        weights = self.head.output_weights()
        arguments = (_labels(y_true, y_pred), y_pred, weights.kernel, weights.bias)
        options = dict(
            sample_weight=sample_weight,
            transpose_kernel=weights.transposed,
            temperature=self.head.temperature,
            logit_soft_cap=self.head.logit_soft_cap,
            reduction=reduction,
            **self.options,
        )
        if ranked:
            return linear_cross_entropy_and_ranks(*arguments, **options)
        return LossAndRanks(linear_cross_entropy(*arguments, **options), None)

    @classmethod
    def from_config(cls, config):
        raise ValueError(
            "A `StableSoftmaxHead`'s loss holds the head: load the model with "
            "`compile=False`, then compile it again with `loss=head.loss()`."
        )


@keras.saving.register_keras_serializable(package="keras_softmax")
class _HeadAccuracy(keras.metrics.MeanMetricWrapper):
    """`StableSoftmaxHead.accuracy()` and `.top_k_accuracy()`."""

    def __init__(self, head, k, name, dtype=None):
        super().__init__(fn=self._hits, name=name, dtype=dtype)
        self.head, self.k = head, k
        # Keras' own accuracies are maximised (for callbacks that watch).
        self._direction = "up"

    def _hits(self, y_true, y_pred):
        if _on_probabilities(self.head, y_pred):
            if self.k == 1:
                return keras.metrics.sparse_categorical_accuracy(y_true, y_pred)
            return keras.metrics.sparse_top_k_categorical_accuracy(
                y_true, y_pred, k=self.k
            )
        ranks = _ranks_left(self.head, y_pred)
        if ranks is not None:
            return top_k_hits(ranks, self.k)
        weights = self.head.output_weights()
        bias = None if weights.bias is None else _value_in_step(weights.bias)
        weights = OutputWeights(
            _value_in_step(weights.kernel), bias, weights.transposed
        )
        return top_k_hits(_label_ranks(self.head, y_true, y_pred, weights), self.k)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype, "k": self.k}

    @classmethod
    def from_config(cls, config):
        raise ValueError(
            "A `StableSoftmaxHead`'s metric holds the head: load the model with "
            "`compile=False`, then compile it again with `head.accuracy()`."
        )


def _per_sequence_weight_at_each_position(sample_weight, y_pred):
    """`sample_weight`, a weight per sequence (`[batch]` for `[batch, time]`
    positions) broadcast to each of its positions, as the fused loss reads
    it. (Keras' reduction would align it with the last axis: with time,
    where `batch == time`, and an error otherwise. Broadcast in full:
    Keras 3.15 multiplies it by the mask in place, which PyTorch refuses
    for a `[batch, 1]` weight.)"""
    if sample_weight is None:
        return None
    sample_weight = ops.convert_to_tensor(sample_weight)
    positions = ops.shape(y_pred)[:-1]
    if len(positions) > 1 and len(sample_weight.shape) == len(positions) - 1:
        # (A product, not `broadcast_to`: PyTorch writes into no view.)
        ones = ops.ones(positions, sample_weight.dtype)
        return ops.expand_dims(sample_weight, -1) * ones
    return sample_weight


class _Ranked(NamedTuple):
    """The label ranks a head's loss computed for its metrics, and of which
    inputs: one pass serves every `k`."""

    inputs: object
    ranks: object


def _leave_for_metrics(head, y_pred, ranks):
    """Leaves the ranks that the loss counted, with the weights that made
    it, for the head's metrics, which Keras' TensorFlow and PyTorch
    trainers update after the optimizer has updated the weights."""
    step_ranks = _STEP_RANKS.get()
    if step_ranks is not None:
        step_ranks[id(head)] = ranks
    elif keras.backend.backend() != "jax":
        # (On JAX, only a step's own record is valid: a tracer kept on the
        # head would outlive the trace.)
        head._ranked = _Ranked(y_pred, ranks)


def _ranks_left(head, y_pred):
    """The ranks the head's loss left for `y_pred` in this step, or None."""
    step_ranks = _STEP_RANKS.get()
    if step_ranks is not None:
        return step_ranks.get(id(head))
    ranked = head._ranked
    if ranked is not None and ranked.inputs is y_pred:
        return ranked.ranks
    return None


def _label_ranks(head, y_true, y_pred, weights: OutputWeights):
    return linear_label_ranks(
        _labels(y_true, y_pred),
        ops.stop_gradient(y_pred),
        ops.stop_gradient(weights.kernel),
        None if weights.bias is None else ops.stop_gradient(weights.bias),
        transpose_kernel=weights.transposed,
        logit_soft_cap=head.logit_soft_cap,
    )


def _on_probabilities(head, y_pred):
    """Whether `y_pred` holds the head's probabilities, not hidden states."""
    units = head.units
    depth = (getattr(head.input_spec, "axes", None) or {}).get(-1)
    if depth == units:
        raise ValueError(
            "A `StableSoftmaxHead` whose input size equals its vocabulary "
            "cannot tell hidden states from probabilities. Received: "
            f"input size {depth}, units={units}"
        )
    return y_pred.shape[-1] == units


def _labels(y_true, y_pred):
    """Class ids of the hidden states' leading shape (Keras may add an axis)."""
    labels = ops.convert_to_tensor(y_true)
    if len(labels.shape) == len(y_pred.shape):
        labels = ops.squeeze(labels, axis=-1)
    return labels
