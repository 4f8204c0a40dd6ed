"""`StableMultiHeadAttention`: Keras' layer, with fully masked queries at 0."""

import functools
import inspect

import keras
import numpy as np

from keras_softmax import _arguments
from keras_softmax import _backend
from keras_softmax import _blockwise_attention
from keras_softmax import _dtypes
from keras_softmax import _masks
from keras_softmax import _temperature
from keras_softmax import attention
from keras_softmax._blockwise_attention import BlockSizes
from keras_softmax.layer import StableSoftmax
from keras_softmax.softmax import stable_softmax


@keras.saving.register_keras_serializable(package="keras_softmax")
class StableMultiHeadAttention(keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` that never attends to padding.

    A query that may attend to no key (its `attention_mask` row is all
    `False`, or every key is padding, or the query itself is padding) gets
    attention weights of 0 and an attention output of 0, so the layer
    outputs the output projection's bias (0 without bias) there. Keras'
    layer does so only with `return_attention_scores=True`; on its default
    path it returns the average of the values. Everywhere else the outputs
    are Keras', with the same weights in the same order, so `set_weights`
    with a Keras layer's weights gives the same results.

    The body is `keras_softmax.dot_product_attention`'s, and so is the
    choice of path: fused attention when no weights are returned, there is
    no dropout and the temperature is a number of at least 1 (on a GPU the
    device's own kernel, at any length), an explicit softmax otherwise, and
    for long sequences (or `flash_attention=True`) where no fused kernel
    serves, the blocks, whose memory grows linearly in the sequence; all
    with the same results.

    Args:
        num_heads: Number of attention heads.
        key_dim: Size of each attention head for query and key.
        value_dim: Size of each attention head for value.
        dropout: Dropout rate of the attention weights.
        temperature: Positive finite number dividing the scaled scores.
            With `trainable_temperature=True` it is the initial value.
        trainable_temperature: If `True`, the temperature is a weight that
            `fit` learns, stored as its logarithm after Keras' weights.
        block_sizes: Optional `keras_softmax.BlockSizes(query, key)` for
            the blocks, where they compute the call (as
            `dot_product_attention`'s).
        **kwargs: The other arguments of `keras.layers.MultiHeadAttention`
            (`use_bias`, `output_shape`, `attention_axes`, initializers,
            ...) and base layer arguments.

    Call arguments:
        query: Query tensor of shape `(B, T, dim)`.
        value: Value tensor of shape `(B, S, dim)`.
        key: Optional key tensor of shape `(B, S, dim)`; defaults to `value`.
        query_mask, value_mask, key_mask: Optional bool masks of shape
            `(B, T)` or `(B, S)`. Keras masks (from `Embedding(mask_zero=
            True)` or `Masking`) reach them by themselves.
        attention_mask: Optional bool mask of shape `(B, T, S)`, `True`
            where a query attends to a key.
        return_attention_scores: If `True`, also return the attention
            weights, of shape `(B, num_heads, T, S)`.
        training: Whether dropout is active.
        use_causal_mask: If `True`, query `t` attends to keys `s <= t`. As
            the only mask, it reaches the kernels as their causal flag
            (the blocks then skip those above the diagonal).

    Returns:
        The attention output of shape `(B, T, E)`, and with
        `return_attention_scores=True` the attention weights too.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import keras_softmax
    >>> layer = keras_softmax.StableMultiHeadAttention(num_heads=2, key_dim=4)
    >>> x = np.ones((1, 3, 8), "float32")
    >>> mask = np.array([[[1, 1, 0], [1, 0, 0], [0, 0, 0]]], bool)
    >>> out, weights = layer(x, x, attention_mask=mask,
    ...                      return_attention_scores=True)
    >>> keras.ops.convert_to_numpy(weights)[0, 0].tolist()
    [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    >>> float(abs(keras.ops.convert_to_numpy(out)[0, 2]).max())
    0.0
    """

    def __init__(
        self,
        num_heads: int,
        key_dim: int,
        value_dim: int | None = None,
        dropout: float = 0.0,
        temperature: float = 1.0,
        trainable_temperature: bool = False,
        block_sizes: BlockSizes | None = None,
        **kwargs,
    ):
        temperature, trainable_temperature = _checked_temperature(
            temperature, trainable_temperature
        )
        block_sizes = _blockwise_attention.check_block_sizes(block_sizes)
        super().__init__(num_heads, key_dim, value_dim, dropout, **kwargs)
        self.block_sizes = block_sizes
        # A fixed temperature is a Python number, not a variable: the layer
        # then has exactly Keras' weights.
        self._fixed_temperature = temperature
        self.trainable_temperature = trainable_temperature
        self._stable_softmax = None

    def build(self, query_shape, value_shape, key_shape=None):
        super().build(query_shape, value_shape, key_shape)
        if self.trainable_temperature:
            # Built after Keras' sublayers, so the learned temperature's
            # weight comes after Keras' weights, which keep their order.
            self._stable_softmax = StableSoftmax(
                axis=self._softmax.axis,
                temperature=self._fixed_temperature,
                trainable_temperature=True,
                dtype=self.dtype_policy,
                name="stable_softmax",
            )

    @property
    def temperature(self) -> float:
        """The temperature in use, as a Python float.

        Settable when it is trainable. A fixed temperature is set at
        construction: a traced `predict` would not see a new one.
        """
        if self._stable_softmax is None:
            return self._fixed_temperature
        return self._stable_softmax.temperature

    @temperature.setter
    def temperature(self, value):
        if self._stable_softmax is None:
            raise ValueError(
                "The temperature of a StableMultiHeadAttention without "
                "`trainable_temperature=True` is fixed at construction, so "
                "that its weights are Keras' weights. Build a new layer, or "
                "build it with `trainable_temperature=True` to set it at any "
                f"time. Received: temperature={value!r}"
            )
        self._stable_softmax.temperature = value

    def current_temperature(self):
        """The temperature in use: the learned one when it is trainable."""
        if self._stable_softmax is None:
            return self._fixed_temperature
        return self._stable_softmax.current_temperature()

    def __call__(self, *args, **kwargs):
        # Here, not in `call`: Keras' layer gives symbolic calls their shape
        # without running `call`.
        _check_attention_mask(self._num_heads, *args, **kwargs)
        return super().__call__(*args, **kwargs)

    def _masked_softmax(self, attention_scores, attention_mask=None):
        # Keras' explicit path, taken for attention over several axes.
        # Keras inserts the heads' axes before the attended ones.
        attention_mask = _masks.to_keep_mask(
            attention_mask,
            _backend.static_shape(attention_scores),
            align=-len(self._attention_axes) * 2 - 1,
        )
        if self._stable_softmax is not None:
            return self._stable_softmax(attention_scores, mask=attention_mask)
        return stable_softmax(
            attention_scores,
            axis=self._softmax.axis,
            mask=attention_mask,
            temperature=self._fixed_temperature,
        )

    def _compute_attention_mask(
        self,
        query,
        value,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        use_causal_mask=False,
    ):
        # Keras 3.15's `call` hands `_compute_attention` the causal flag only
        # in a layer that keeps Keras' own; here the flag travels in the
        # mask's place where it is the only mask, so that the kernels take
        # it as their flag (and the blocks skip those above the diagonal)
        # instead of a `[T, S]` mask.
        masks = (query_mask, value_mask, key_mask, attention_mask)
        if (
            use_causal_mask
            and all(m is None for m in masks)
            and getattr(self, "_sliding_window", None) is None
            and len(query.shape) == 3  # attention over one axis
        ):
            return _CAUSAL_ONLY
        return super()._compute_attention_mask(
            query,
            value,
            query_mask=query_mask,
            value_mask=value_mask,
            key_mask=key_mask,
            attention_mask=attention_mask,
            use_causal_mask=use_causal_mask,
        )

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        use_causal_mask=False,
    ):
        if attention_mask is _CAUSAL_ONLY:
            attention_mask, use_causal_mask = None, True
        if len(query.shape) != 4:
            return super()._compute_attention(
                query,
                key,
                value,
                attention_mask,
                training,
                return_attention_scores,
                use_causal_mask,
            )
        if self._flash_attention and return_attention_scores:
            raise ValueError(
                "Returning attention scores is not supported when flash "
                "attention is enabled. Please disable flash attention to access "
                "attention scores. Received: return_attention_scores=True "
                f"with flash_attention={self._flash_attention}"
            )
        scores = (query.shape[0], query.shape[2], query.shape[1], key.shape[1])
        keep = _masks.to_keep_mask(attention_mask, scores, align=-3)
        dropout = None
        if self._dropout > 0.0:
            dropout = functools.partial(self._dropout_layer, training=training)
        return attention.attend(
            query,
            key,
            value,
            None,
            keep,
            self._inverse_sqrt_key_dim,
            _temperature.normalize_temperature(
                self.current_temperature(), _dtypes.compute_dtype(query.dtype)
            ),
            return_weights=return_attention_scores,
            dropout=dropout,
            flash_attention=self._flash_attention,
            is_causal=use_causal_mask,
            block_sizes=self.block_sizes,
        )

    @classmethod
    def from_config(cls, config):
        # Keras would wrap the constructor's ValueError in a TypeError.
        _checked_temperature(
            config.get("temperature", 1.0),
            config.get("trainable_temperature", False),
        )
        return super().from_config(config)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "temperature": self.temperature,
                "trainable_temperature": self.trainable_temperature,
                # A list in the saved JSON; `__init__` makes it `BlockSizes`.
                "block_sizes": None
                if self.block_sizes is None
                else list(self.block_sizes),
            }
        )
        return config


# `_compute_attention_mask`'s answer where the causal mask is the only one.
_CAUSAL_ONLY = object()


def _checked_temperature(temperature, trainable_temperature):
    trainable = _arguments.check_flag("trainable_temperature", trainable_temperature)
    return _temperature.check_temperature_value(temperature), trainable


def _check_attention_mask(num_heads, *args, **kwargs):
    """A ValueError naming both shapes, where Keras would fail deep inside.

    An attention mask is `(batch, queries, keys)`, or, as Keras' layer also
    takes it, one per head: `(batch, heads, queries, keys)`.
    """
    try:
        arguments = _CALL.bind(None, *args, **kwargs).arguments
    except TypeError:
        return  # Keras' own call reports what is wrong with the arguments
    query, value = arguments["query"], arguments["value"]
    attention_mask = arguments.get("attention_mask")
    if attention_mask is None or len(query.shape) != 3:
        return  # attention over several axes: Keras checks it
    expected = (query.shape[0], query.shape[1], value.shape[1])
    per_head = (query.shape[0], num_heads, *expected[1:])
    if hasattr(attention_mask, "shape"):
        shape = _backend.static_shape(attention_mask)  # None sizes while traced
    else:
        shape = np.shape(attention_mask)
    if not any(_arguments.broadcasts(shape, s) for s in (expected, per_head)):
        raise ValueError(
            "`attention_mask` must be broadcastable to (batch, queries, keys) "
            f"= {expected}, or to (batch, heads, queries, keys) = {per_head}. "
            f"Received: attention_mask.shape={shape}"
        )


_CALL = inspect.signature(keras.layers.MultiHeadAttention.call)
