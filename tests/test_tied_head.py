"""A head tied to an embedding table, its fused metrics, and `FusedHeadModel`.

The language model here is keras-hub's shape in miniature: token ids, an
embedding, a hidden layer, and the output tied to the embedding table,
trained on padded sequences with the padding mask as `sample_weight`.
tests/test_keras_hub.py runs keras-hub's own backbones.
"""

from unittest import mock

import keras
import numpy as np
import pytest
from keras.src.backend.common.symbolic_scope import in_symbolic_scope
from support.backends import BACKEND
from support.backends import gradient
from support.references import to_numpy

from keras_softmax import FusedHeadModel
from keras_softmax import StableSoftmaxHead
from keras_softmax import head as head_module
from keras_softmax import stable_softmax
from keras_softmax.linear_cross_entropy import linear_cross_entropy
from keras_softmax.linear_cross_entropy import linear_cross_entropy_and_ranks
from keras_softmax.linear_cross_entropy import linear_top_k_hits

VOCABULARY, DEPTH, BATCH, TIME = 37, 8, 6, 5


def _batch(seed=0):
    """Token ids, next-token labels and a padding mask (one sequence empty)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCABULARY, size=(BATCH, TIME + 1))
    lengths = np.array([5, 4, 3, 5, 2, 0])
    mask = (np.arange(TIME)[None, :] < lengths[:, None]).astype("float32")
    return tokens[:, :-1], tokens[:, 1:], mask


class _Layers:
    """The layers of the miniature language model, seeded."""

    def __init__(self, seed=0, cap=None, bias=False):
        keras.utils.set_random_seed(seed)
        # Logits of a few units: ranks far from ties, and a cap that binds.
        self.embedding = keras.layers.Embedding(
            VOCABULARY, DEPTH, embeddings_initializer=keras.initializers.RandomNormal()
        )
        self.hidden = keras.layers.Dense(DEPTH, activation="tanh")
        self.head = StableSoftmaxHead(
            VOCABULARY, tied_to=self.embedding, use_bias=bias, logit_soft_cap=cap
        )
        self.cap, self.bias = cap, bias


def _fused_model(layers, model_class=FusedHeadModel):
    tokens = keras.Input((None,), dtype="int32")
    hidden = layers.hidden(layers.embedding(tokens))
    return model_class(tokens, layers.head(hidden))


def _logits_model(layers):
    """The same weights, with the logits materialised, as keras-hub does."""
    tokens = keras.Input((None,), dtype="int32")
    hidden = layers.hidden(layers.embedding(tokens))
    logits = _TiedLogits(layers.embedding, layers.cap)(hidden)
    return keras.Model(tokens, logits)


class _TiedLogits(keras.layers.Layer):
    """keras-hub's `ReversibleEmbedding(reverse=True)`, soft cap included."""

    def __init__(self, embedding, cap):
        super().__init__()
        self.embedding, self.cap = embedding, cap

    def call(self, hidden):
        table = self.embedding.embeddings
        logits = keras.ops.matmul(hidden, keras.ops.transpose(table))
        if self.cap is not None:
            logits = self.cap * keras.ops.tanh(logits / self.cap)
        return logits


def _compiled(model, loss, metrics):
    model.compile(
        optimizer=keras.optimizers.SGD(0.5), loss=loss, weighted_metrics=metrics
    )
    return model


def _float64_logits(layers, x):
    table = to_numpy(layers.embedding.embeddings).astype(np.float64)
    kernel, bias = (to_numpy(w).astype(np.float64) for w in layers.hidden.weights)
    hidden = np.tanh(table[x] @ kernel + bias)
    logits = hidden @ table.T
    if layers.bias:
        logits = logits + to_numpy(layers.head.bias)
    if layers.cap is not None:
        logits = layers.cap * np.tanh(logits / layers.cap)
    return logits


@pytest.mark.parametrize("cap", [None, 2.0], ids=["plain", "soft cap"])
def test_predictions_are_the_softmax_of_the_tied_logits(cap):
    layers = _Layers(cap=cap, bias=True)
    model = _fused_model(layers)
    x, _, _ = _batch()
    logits = _float64_logits(layers, x)
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(to_numpy(model(x)), expected, rtol=2e-5, atol=1e-7)
    # No kernel of its own: the table is the embedding's, tracked once.
    assert [w.path.split("/")[-1] for w in layers.head.weights] == ["bias"]
    assert sum(w is layers.embedding.embeddings for w in model.weights) == 1


@pytest.mark.parametrize("cap", [None, 2.0], ids=["plain", "soft cap"])
def test_a_fit_step_on_padded_sequences_is_the_materialised_models_step(cap):
    # Padding mask as sample_weight: keras-hub's CausalLM loss, which
    # divides by every position, and its weighted accuracies.
    x, y, mask = _batch()
    ours, theirs = _Layers(cap=cap), _Layers(cap=cap)
    fused = _compiled(
        _fused_model(ours),
        ours.head.loss(),
        [ours.head.accuracy(), ours.head.top_k_accuracy(3)],
    )
    materialised = _compiled(
        _logits_model(theirs),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        [
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(3, name="top_k_accuracy"),
        ],
    )
    ours_history, their_history = (
        model.fit(
            x, y, sample_weight=mask, batch_size=BATCH, epochs=3, verbose=0
        ).history
        for model in (fused, materialised)
    )
    for name in ("loss", "accuracy", "top_k_accuracy"):
        np.testing.assert_allclose(
            ours_history[name], their_history[name], rtol=1e-5, err_msg=name
        )
    assert ours_history["loss"][-1] < ours_history["loss"][0]
    for a, b in zip(fused.weights, materialised.weights, strict=True):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-5, atol=1e-6)
    evaluated = [
        model.evaluate(x, y, sample_weight=mask, verbose=0, return_dict=True)
        for model in (fused, materialised)
    ]
    for name in ("loss", "accuracy", "top_k_accuracy"):
        np.testing.assert_allclose(
            evaluated[0][name], evaluated[1][name], rtol=1e-5, err_msg=name
        )


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "masked"])
def test_padding_labels_that_the_loss_ignores_are_misses_to_the_accuracy(weighted):
    # Padded positions labelled -1 and ignored by the loss. Keras' accuracy
    # on TensorFlow never matches such a label (on JAX and PyTorch it reads
    # -1 as the last class); the head's accuracy was NaN.
    x, y, mask = _batch()
    y = np.where(mask > 0, y, -1)
    layers = _Layers()
    metrics = [layers.head.accuracy(), layers.head.top_k_accuracy(3)]
    model = _compiled(_fused_model(layers), layers.head.loss(ignore_class=-1), metrics)
    weights = mask if weighted else np.ones_like(mask)
    result = model.evaluate(
        x, y, sample_weight=weights, batch_size=BATCH, verbose=0, return_dict=True
    )
    logits = _float64_logits(layers, x)
    picked = np.take_along_axis(logits, np.maximum(y, 0)[..., None], -1)
    above = (logits > picked).sum(-1)  # no ties among these logits
    for name, hits in (("accuracy", above < 1), ("top_k_accuracy", above < 3)):
        hits = hits & (y >= 0)
        expected = (weights * hits).sum() / weights.sum()
        np.testing.assert_allclose(result[name], expected, rtol=1e-6, err_msg=name)


def test_evaluate_never_builds_the_probabilities_and_predict_does():
    x, y, mask = _batch()
    layers = _Layers()
    model = _compiled(_fused_model(layers), layers.head.loss(), [])

    def softmax(*args, **kwargs):
        # Shapes inferred symbolically (JAX's trainer does) build nothing.
        if not in_symbolic_scope():
            raise AssertionError("probabilities")
        return stable_softmax(*args, **kwargs)

    with mock.patch.object(head_module, "stable_softmax", softmax):
        model.evaluate(x, y, sample_weight=mask, verbose=0)
        with pytest.raises(AssertionError, match="probabilities"):
            model.predict(x, verbose=0)


def test_the_fused_accuracy_breaks_ties_as_argmax_does():
    # Equal logits: the lower class id is argmax's answer.
    hidden = np.zeros((3, 2), "float32")
    kernel = np.zeros((2, 4), "float32")
    labels = np.array([0, 1, 3])
    top_1 = to_numpy(linear_top_k_hits(labels, hidden, kernel, k=1))
    top_2 = to_numpy(linear_top_k_hits(labels, hidden, kernel, k=2))
    np.testing.assert_array_equal(top_1, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(top_2, [1.0, 1.0, 0.0])
    expected = to_numpy(
        keras.metrics.sparse_categorical_accuracy(labels, hidden @ kernel)
    )
    np.testing.assert_array_equal(top_1, expected)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"ignore_class": 3, "reduction": None, "chunk_size": 4},
        {"logit_soft_cap": 2.0, "transpose_kernel": True, "temperature": 0.7},
    ],
    ids=["default", "ignored, per position, chunks", "tied, capped, tempered"],
)
def test_the_loss_and_the_ranks_of_one_pass_are_the_loss_and_the_ranks(options):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, VOCABULARY, size=(3, 7))
    labels[0, :3] = 3  # ignored, where `ignore_class` is 3: ranked all the same
    hidden = rng.normal(size=(3, 7, DEPTH))
    transposed = options.get("transpose_kernel", False)
    table = rng.normal(size=(VOCABULARY, DEPTH))
    kernel = table if transposed else table.T
    bias = rng.normal(size=VOCABULARY)
    scored = linear_cross_entropy_and_ranks(labels, hidden, kernel, bias, **options)
    np.testing.assert_allclose(
        to_numpy(scored.loss),
        to_numpy(linear_cross_entropy(labels, hidden, kernel, bias, **options)),
        rtol=1e-12,
    )
    # The ranks against float64 NumPy: classes above the label, ties to
    # the lower id.
    logits = hidden @ table.T + bias
    cap = options.get("logit_soft_cap")
    if cap is not None:
        logits = cap * np.tanh(logits / cap)
    picked = np.take_along_axis(logits, labels[..., None], axis=-1)
    lower = np.arange(VOCABULARY) < labels[..., None]
    expected = ((logits > picked) | ((logits == picked) & lower)).sum(-1)
    np.testing.assert_array_equal(to_numpy(scored.ranks), expected)

    # The ranks take no part in the derivative.
    def loss_of(scored_fn):
        def loss(h):
            out = scored_fn(labels, h, kernel, bias, **options)
            return keras.ops.reshape(getattr(out, "loss", out), (-1,))

        return loss

    np.testing.assert_allclose(
        gradient(loss_of(linear_cross_entropy_and_ranks), hidden),
        gradient(loss_of(linear_cross_entropy), hidden),
        rtol=1e-12,
        atol=1e-15,
    )


@pytest.mark.parametrize(
    "model_class",
    [
        FusedHeadModel,
        pytest.param(
            keras.Model,
            marks=pytest.mark.skipif(
                BACKEND == "jax", reason="on JAX, a FusedHeadModel's metrics only"
            ),
        ),
    ],
    ids=["FusedHeadModel", "keras.Model"],
)
def test_the_metrics_count_no_ranks_of_their_own(model_class):
    # The loss's pass over the logits counts the ranks that every metric
    # of the head thresholds: no second matrix product for the metrics.
    x, y, mask = _batch()
    layers = _Layers()
    model = _compiled(
        _fused_model(layers, model_class),
        layers.head.loss(),
        [layers.head.accuracy(), layers.head.top_k_accuracy(3)],
    )

    def no_second_pass(*args, **kwargs):
        raise AssertionError("a metric ranked the labels again")

    with mock.patch.object(head_module, "linear_label_ranks", no_second_pass):
        history = model.fit(x, y, sample_weight=mask, epochs=2, verbose=0).history
        if model_class is FusedHeadModel:
            model.evaluate(x, y, sample_weight=mask, verbose=0)
    assert 0 < history["top_k_accuracy"][-1] <= 1


def test_a_saved_tied_model_reloads_tied(tmp_path):
    x, y, mask = _batch()
    layers = _Layers(bias=True)
    model = _compiled(_fused_model(layers), layers.head.loss(), [])
    model.fit(x, y, sample_weight=mask, verbose=0)
    path = str(tmp_path / "tied.keras")
    model.save(path)
    loaded = keras.models.load_model(path, compile=False)
    assert isinstance(loaded, FusedHeadModel)
    np.testing.assert_allclose(
        to_numpy(loaded.predict(x, verbose=0)),
        to_numpy(model.predict(x, verbose=0)),
        rtol=1e-6,
    )
    head = _layer(loaded, StableSoftmaxHead)
    embedding = _layer(loaded, keras.layers.Embedding)
    assert head.output_weights().kernel is embedding.embeddings
    # Trained on, the tie holds: the embedding is the only table.
    loaded.compile(optimizer="sgd", loss=head.loss())
    loaded.fit(x, y, sample_weight=mask, verbose=0)
    np.testing.assert_allclose(
        to_numpy(loaded(x)), _softmax(_loaded_logits(loaded, x)), rtol=2e-5, atol=1e-7
    )


def _loaded_logits(model, x):
    embedding = _layer(model, keras.layers.Embedding)
    head = _layer(model, StableSoftmaxHead)
    dense = next(layer for layer in model.layers if type(layer) is keras.layers.Dense)
    table = to_numpy(embedding.embeddings).astype(np.float64)
    kernel, bias = (to_numpy(w).astype(np.float64) for w in dense.weights)
    return np.tanh(table[x] @ kernel + bias) @ table.T + to_numpy(head.bias)


def _layer(model, kind):
    return next(layer for layer in model.layers if isinstance(layer, kind))


def _softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_a_tied_head_loaded_outside_a_fused_model_says_what_to_do(tmp_path):
    layers = _Layers()
    model = _fused_model(layers, model_class=keras.Model)
    x, _, _ = _batch()
    path = str(tmp_path / "plain.keras")
    model.save(path)
    loaded = keras.models.load_model(path, compile=False)
    with pytest.raises(ValueError, match="FusedHeadModel"):
        loaded.predict(x, verbose=0)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's trainer empties variables")
def test_on_jax_the_metrics_of_a_plain_model_say_to_build_a_fused_model():
    x, y, mask = _batch()
    layers = _Layers()
    model = _compiled(
        _fused_model(layers, model_class=keras.Model),
        layers.head.loss(),
        [layers.head.accuracy()],
    )
    with pytest.raises(ValueError, match="FusedHeadModel"):
        model.fit(x, y, sample_weight=mask, verbose=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tied_to=keras.layers.Dense(3)), "tied_to=<Dense"),
        (dict(tied_to=3), "tied_to=3"),
        (dict(logit_soft_cap=0.0), "logit_soft_cap=0.0"),
    ],
)
def test_bad_head_arguments_raise_value_errors_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StableSoftmaxHead(VOCABULARY, **kwargs)


def test_a_table_of_another_vocabulary_and_a_bad_k_are_refused():
    embedding = keras.layers.Embedding(VOCABULARY + 1, DEPTH)
    embedding.build((None,))
    head = StableSoftmaxHead(VOCABULARY, tied_to=embedding)
    with pytest.raises(ValueError, match="units=37"):
        head(np.zeros((2, DEPTH), "float32"))
    with pytest.raises(ValueError, match="k=0"):
        head.top_k_accuracy(0)
