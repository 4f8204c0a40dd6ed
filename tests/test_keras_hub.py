"""keras-hub's language models with a fused head: the same numbers, no logits.

A keras-hub user builds a causal LM from a backbone (`GPT2Backbone`,
`GemmaBackbone`) and trains it as `GPT2CausalLM` does: the logits are the
hidden states times the tied token embedding table, the loss
`SparseCategoricalCrossentropy(from_logits=True)` weighted by the padding
mask. `StableSoftmaxHead(V, tied_to=backbone.token_embedding,
use_bias=False)` in a `FusedHeadModel` on the same backbone trains the same
model: each test compares it with keras-hub's own task on padded sequences
(docs/keras_hub.md). Small backbones built from their configuration, no
preset downloaded.
"""

import pathlib
import re

import keras
import numpy as np
import pytest
from support.backends import BACKEND
from support.references import to_numpy

from keras_softmax import FusedHeadModel
from keras_softmax import StableSoftmaxHead

keras_hub = pytest.importorskip("keras_hub")

VOCABULARY, BATCH, LENGTH = 1000, 3, 16
SOFT_CAP = 5.0  # small, so that the cap bends these small models' logits


def _gpt2_backbone():
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        intermediate_dim=128,
        max_sequence_length=LENGTH,
        dropout=0.0,  # so that a training step is deterministic
    )


def _gemma_backbone():
    # Gemma 2's shape: a final-logit soft cap, post-norms, grouped queries.
    return keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=32,
        intermediate_dim=64,
        head_dim=16,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        final_logit_soft_cap=SOFT_CAP,
    )


MODELS = {
    "gpt2": (_gpt2_backbone, keras_hub.models.GPT2CausalLM),
    "gemma": (_gemma_backbone, keras_hub.models.GemmaCausalLM),
}


def _pair(name, backbone=None):
    """keras-hub's causal LM and ours on one backbone (the same variables)."""
    make_backbone, causal_lm = MODELS[name]
    if backbone is None:
        keras.utils.set_random_seed(0)
        backbone = make_backbone()
        # keras-hub initialises the table for logits below 1 in size;
        # trained models' are larger, and Gemma's cap bends them.
        table = backbone.token_embedding.embeddings
        table.assign(table * 20.0)
    theirs = causal_lm(backbone, preprocessor=None)
    cap = backbone.token_embedding.logit_soft_cap
    head = StableSoftmaxHead(
        VOCABULARY,
        tied_to=backbone.token_embedding,
        use_bias=False,
        logit_soft_cap=cap,
    )
    ours = FusedHeadModel(backbone.input, head(backbone.output))
    return theirs, ours, head


def _copy(name, model):
    """A fresh pair whose backbone starts from `model`'s backbone weights."""
    make_backbone, _ = MODELS[name]
    backbone = make_backbone()
    backbone.set_weights(model.backbone.get_weights())
    return _pair(name, backbone)


def _batch(seed=0):
    """Padded next-token batches as keras-hub's preprocessor makes them:
    `y` is `x` shifted by one, and `sample_weight` is the padding mask."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCABULARY, size=(BATCH, LENGTH + 1)).astype("int32")
    lengths = np.array([LENGTH + 1, 11, 5])[:BATCH]
    padding = np.arange(LENGTH + 1) < lengths[:, None]
    tokens = np.where(padding, tokens, 0)
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": padding[:, :-1].astype("int32"),
    }
    y = tokens[:, 1:]
    sample_weight = padding[:, 1:].astype("float32")
    return x, y, sample_weight


def _compile(theirs, ours, head):
    """keras-hub's compile (its loss, weighted accuracies), ours with the
    head's loss and metrics. Plain SGD on both: a step proportional to the
    gradient keeps the weights as close as the gradients are (Adam's first
    steps are about the gradient's sign, however small it is)."""
    theirs.compile(
        optimizer=keras.optimizers.SGD(0.5),
        weighted_metrics=[
            keras.metrics.SparseCategoricalAccuracy(),
            keras.metrics.SparseTopKCategoricalAccuracy(k=5),
        ],
    )
    ours.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=head.loss(),
        weighted_metrics=[head.accuracy(), head.top_k_accuracy(k=5)],
    )


def _loss_and_gradients(model, x, y, sample_weight):
    """The compiled loss of a training forward pass, and its gradient for
    each trainable variable (by path), from the backend's autodiff."""
    variables = model.trainable_variables

    def forward():
        y_pred = model(x, training=True)
        return model.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )

    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = forward()
        gradients = tape.gradient(loss, variables)
    elif BACKEND == "jax":
        import jax

        def loss_of(values):
            with keras.StatelessScope(
                state_mapping=list(zip(variables, values, strict=True))
            ):
                return forward()

        loss, gradients = jax.jit(jax.value_and_grad(loss_of))(
            [v.value for v in variables]
        )
    else:
        for v in variables:
            v.value.grad = None
        loss = forward()
        loss.backward()
        gradients = [v.value.grad for v in variables]
    return float(to_numpy(loss)), {
        v.path: to_numpy(g) for v, g in zip(variables, gradients, strict=True)
    }


def _assert_close(actual, expected, tolerance=1e-5):
    """Within `tolerance` of the largest |expected| (or of 1), elementwise.

    Relative to the largest entry, not to each: the attention key biases'
    gradients are zero up to rounding (softmax ignores a shift), 1e-10
    here, and the two models round them differently."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(float(np.max(np.abs(expected))), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * scale)


@pytest.mark.parametrize("name", MODELS)
def test_loss_and_every_gradient_equal_keras_hubs_causal_lm(name):
    theirs, ours, head = _pair(name)
    _compile(theirs, ours, head)
    # The head owns no variable: both models train the same ones.
    assert head.weights == []
    assert {v.path for v in ours.trainable_variables} == {
        v.path for v in theirs.trainable_variables
    }
    x, y, sample_weight = _batch()
    expected_loss, expected = _loss_and_gradients(theirs, x, y, sample_weight)
    loss, gradients = _loss_and_gradients(ours, x, y, sample_weight)
    # keras-hub's loss: the padding-masked losses summed, over all positions.
    logits = to_numpy(theirs(x))
    reference = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        y, logits, sample_weight=sample_weight
    )
    np.testing.assert_allclose(expected_loss, to_numpy(reference), rtol=1e-6)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    assert gradients.keys() == expected.keys()
    embedding = theirs.backbone.token_embedding.embeddings.path
    assert np.max(np.abs(expected[embedding])) > 0
    for path in expected:
        _assert_close(gradients[path], expected[path])


def test_mean_with_sample_weight_is_the_mean_over_real_tokens():
    # keras-hub's loss divides by every position, padding included; the
    # head's loss takes Keras' other reductions, such as the masked mean.
    theirs, ours, head = _pair("gpt2")
    x, y, sample_weight = _batch()
    logits = to_numpy(theirs(x))
    losses = to_numpy(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(
            y, logits
        )
    )
    hidden = ours(x, training=True)
    for reduction, expected in [
        ("sum_over_batch_size", np.sum(losses * sample_weight) / losses.size),
        ("mean_with_sample_weight", np.average(losses, weights=sample_weight)),
    ]:
        loss = head.loss(reduction=reduction)(y, hidden, sample_weight=sample_weight)
        np.testing.assert_allclose(to_numpy(loss), expected, rtol=1e-5)


def _two_batches():
    first, second = _batch(0), _batch(1)
    x = {k: np.concatenate([first[0][k], second[0][k]]) for k in first[0]}
    return (
        x,
        np.concatenate([first[1], second[1]]),
        np.concatenate([first[2], second[2]]),
    )


# Our names in a history, and keras-hub's (Keras' metric names).
HISTORY_NAMES = {
    "loss": "loss",
    "accuracy": "sparse_categorical_accuracy",
    "top_k_accuracy": "sparse_top_k_categorical_accuracy",
}


def test_fit_from_the_same_weights_gives_keras_hubs_history_and_accuracy():
    theirs, _, _ = _pair("gpt2")
    # Ours on a copy of the backbone: the two fit apart.
    copy, ours, head = _copy("gpt2", theirs)
    _compile(theirs, ours, head)
    x, y, sample_weight = _two_batches()
    fit = dict(batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    expected = theirs.fit(x, y, sample_weight=sample_weight, **fit).history
    actual = ours.fit(x, y, sample_weight=sample_weight, **fit).history
    # The loss, the weighted accuracy and top-5 accuracy, of each epoch.
    assert sorted(actual) == ["accuracy", "loss", "top_k_accuracy"]
    assert expected["loss"][-1] < 0.9 * expected["loss"][0]  # it trains
    for name, their_name in HISTORY_NAMES.items():
        np.testing.assert_allclose(
            actual[name], expected[their_name], rtol=1e-5, atol=1e-6, err_msg=name
        )
    for weight, their_weight in zip(
        copy.backbone.get_weights(), theirs.backbone.get_weights(), strict=True
    ):
        _assert_close(weight, their_weight)


class _LastAxis(keras.metrics.Metric):
    """A spy: records the last axis of each `y_pred` that it is given."""

    def __init__(self):
        super().__init__(name="last_axis")
        self.seen = set()

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.seen.add(y_pred.shape[-1])

    def result(self):
        return keras.ops.zeros(())


def test_evaluate_gives_keras_hubs_loss_and_metrics_without_the_logits():
    theirs, ours, head = _pair("gpt2")
    their_spy, spy = _LastAxis(), _LastAxis()
    theirs.compile(
        optimizer="auto",
        weighted_metrics=[
            keras.metrics.SparseCategoricalAccuracy(),
            keras.metrics.SparseTopKCategoricalAccuracy(k=5),
            their_spy,
        ],
    )
    ours.compile(
        optimizer="adam",
        loss=head.loss(),
        weighted_metrics=[head.accuracy(), head.top_k_accuracy(k=5), spy],
    )
    x, y, sample_weight = _two_batches()
    # Labels the model ranks first, fourth or anywhere: accuracies of
    # about 0.3 and 0.6 to compare.
    ranked = np.argsort(-theirs.predict(x, verbose=0), axis=-1)
    which = np.random.default_rng(2).integers(0, 3, size=y.shape)
    y = np.where(which == 0, ranked[..., 0], np.where(which == 1, ranked[..., 3], y))
    evaluate = dict(batch_size=BATCH, verbose=0, return_dict=True)
    for model, model_spy in ((theirs, their_spy), (ours, spy)):
        # The first evaluate builds the metrics on the model's symbolic
        # output, the probabilities; the second traces a test step afresh.
        model.evaluate(x, y, sample_weight=sample_weight, **evaluate)
        model.make_test_function(force=True)
        model_spy.seen.clear()
    expected = theirs.evaluate(x, y, sample_weight=sample_weight, **evaluate)
    actual = ours.evaluate(x, y, sample_weight=sample_weight, **evaluate)
    for name, their_name in HISTORY_NAMES.items():
        np.testing.assert_allclose(
            actual[name], expected[their_name], rtol=1e-5, atol=1e-6, err_msg=name
        )
    assert 0.1 < expected["sparse_categorical_accuracy"] < 0.5
    assert expected["sparse_top_k_categorical_accuracy"] > 0.5
    # What the loss and metrics are handed: keras-hub's the [3, 16, 1000]
    # logits, ours the [3, 16, 64] hidden states.
    assert their_spy.seen == {VOCABULARY}
    assert spy.seen == {64}


def test_predict_returns_the_softmax_of_keras_hubs_logits():
    theirs, ours, _ = _pair("gpt2")
    x, _, _ = _batch()
    probabilities = ours.predict(x, verbose=0)
    logits = theirs.predict(x, verbose=0)
    assert probabilities.shape == logits.shape == (BATCH, LENGTH, VOCABULARY)
    expected = to_numpy(keras.ops.softmax(logits))
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(to_numpy(ours(x)), expected, rtol=1e-5, atol=1e-7)


def test_keras_file_reloads_still_tied_and_predicts_the_same(tmp_path):
    theirs, ours, _ = _pair("gpt2")
    x, _, _ = _batch()
    path = tmp_path / "gpt2_fused.keras"
    ours.save(path)
    loaded = keras.models.load_model(path, compile=False)
    assert isinstance(loaded, FusedHeadModel)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), ours.predict(x, verbose=0), rtol=1e-6, atol=1e-8
    )
    # Tied: the head has no table of its own, and a new embedding table
    # changes the loaded model's predictions as it changes keras-hub's.
    (head,) = [layer for layer in loaded.layers if isinstance(layer, StableSoftmaxHead)]
    embedding = loaded.get_layer("token_embedding")
    assert head.weights == []
    assert head.output_weights().kernel is embedding.embeddings
    assert len(loaded.weights) == len(ours.weights)
    table = to_numpy(embedding.embeddings) * 0.5
    embedding.embeddings.assign(table)
    theirs.backbone.token_embedding.embeddings.assign(table)
    expected = to_numpy(keras.ops.softmax(theirs.predict(x, verbose=0)))
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-7
    )


DOCS_PAGE = pathlib.Path(__file__).parents[1] / "docs" / "keras_hub.md"


def test_the_docs_page_runs_as_written(tmp_path, monkeypatch):
    # docs/keras_hub.md's Python blocks, in order, in one namespace.
    blocks = re.findall(r"```python\n(.*?)```", DOCS_PAGE.read_text(), re.DOTALL)
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)  # the page saves a .keras file
    namespace = {}
    for block in blocks:
        exec(compile(block, str(DOCS_PAGE), "exec"), namespace)
    assert namespace["probabilities"].shape == (8, 32, 4000)
    assert sorted(namespace["scores"]) == ["accuracy", "loss", "top_k_accuracy"]
    restored, x = namespace["restored"], namespace["x"]
    assert isinstance(namespace["restored_head"], StableSoftmaxHead)
    np.testing.assert_allclose(
        restored.predict(x, verbose=0), namespace["probabilities"], rtol=1e-6, atol=1e-8
    )
