"""StableSoftmaxHead: Dense(V)'s weights and probabilities, trained fused."""

import json
import textwrap

import keras
import numpy as np
import pytest
from support.backends import BACKEND
from support.backends import exports
from support.fresh_process import check_python
from support.references import to_numpy

import keras_softmax
from keras_softmax import StableSoftmax
from keras_softmax import StableSoftmaxHead
from keras_softmax.demo import serving

DEPTH, VOCABULARY = 6, 23


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DEPTH)).astype("float32")
    # Labels that depend on the inputs, so the loss falls as it trains.
    projection = rng.normal(size=(DEPTH, VOCABULARY))
    y = np.argmax(x @ projection + rng.gumbel(size=(n, VOCABULARY)), axis=-1)
    return x, y


def _built(layer, depth=DEPTH):
    layer(np.zeros((1, depth), "float32"))
    return layer


def test_probabilities_and_weights_are_those_of_dense_with_stable_softmax():
    x, _ = _data(n=5)
    head = _built(StableSoftmaxHead(VOCABULARY, temperature=0.7))
    dense = _built(
        keras.layers.Dense(VOCABULARY, activation=StableSoftmax(temperature=0.7))
    )
    dense_weights = [w for w in dense.weights if w.trainable]
    assert [(w.path.split("/")[-1], w.shape) for w in head.weights] == [
        (w.path.split("/")[-1], w.shape) for w in dense_weights
    ]
    dense.set_weights([head.get_weights()[0], head.get_weights()[1], np.float32(0.7)])
    np.testing.assert_allclose(to_numpy(head(x)), to_numpy(dense(x)), rtol=1e-6)
    rng = np.random.default_rng(1)
    swapped = [rng.normal(size=w.shape).astype("float32") for w in head.weights]
    head.set_weights(swapped)
    dense.set_weights(swapped + [np.float32(0.7)])
    np.testing.assert_allclose(to_numpy(head(x)), to_numpy(dense(x)), rtol=1e-6)


def _keras_reference(
    head,
    x,
    y,
    sample_weight=None,
    ignore_class=None,
    reduction="sum_over_batch_size",
    keep=None,
):
    """Keras' loss on the logits, masked where `keep` is False."""
    kernel, bias = head.get_weights()
    logits = (x @ kernel + bias) / head.temperature
    if keep is not None:
        logits = keras.layers.Masking()(np.where(keep[..., None], logits, 0.0))
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=ignore_class, reduction=reduction
    )
    return to_numpy(loss(y, logits, sample_weight=sample_weight))


# Every reduction `keras.losses.Loss` accepts (Keras 3.15).
KERAS_REDUCTIONS = [
    "sum_over_batch_size",
    "mean",
    "sum",
    "mean_with_sample_weight",
    "none",
    None,
]


@pytest.mark.parametrize("reduction", KERAS_REDUCTIONS)
@pytest.mark.parametrize("ignore_class", [None, 3])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_every_keras_reduction_equals_keras_sparse_cross_entropy_on_the_logits(
    reduction, ignore_class, weighted, masked
):
    # Unweighted and unmasked, the loss is one fused pass; weighted or
    # masked, Keras reduces its per-position losses.
    x, y = _data(n=12)
    y[:4] = 3
    head = _built(StableSoftmaxHead(VOCABULARY, temperature=1.3))
    hidden, sample_weight, keep = x, None, None
    if weighted:
        sample_weight = np.linspace(0.0, 2.0, len(y)).astype("float32")
    if masked:
        keep = np.arange(len(y)) % 5 != 1
        hidden = keras.layers.Masking()(np.where(keep[:, None], x, 0.0))
    loss = head.loss(ignore_class=ignore_class, reduction=reduction, chunk_size=5)
    actual = to_numpy(loss(y, head(hidden, training=True), sample_weight))
    expected = _keras_reference(
        head, x, y, sample_weight, ignore_class, reduction, keep
    )
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("time", [4, 5], ids=["batch == time", "batch != time"])
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_a_weight_per_sequence_weighs_each_of_its_positions(time, reduction, masked):
    # With a Keras mask, Keras reduced the losses with a `[batch]` weight
    # aligned with time (and raised where batch != time).
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, time, DEPTH)).astype("float32")
    y = rng.integers(0, VOCABULARY, size=(4, time))
    weight = np.array([1.0, 0.0, 0.5, 2.0], "float32")
    keep = (rng.random((4, time)) > 0.3) if masked else None
    hidden = x if keep is None else keras.layers.Masking()(x * keep[..., None])
    head = _built(StableSoftmaxHead(VOCABULARY))
    loss = head.loss(reduction=reduction)
    actual = to_numpy(loss(y, head(hidden, training=True), weight))
    at_each_position = np.broadcast_to(weight[:, None], y.shape)
    expected = _keras_reference(
        head, x, y, at_each_position, reduction=reduction, keep=keep
    )
    np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", KERAS_REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_every_keras_reduction_of_only_ignored_positions_is_keras_zero(
    reduction, weighted
):
    x, _ = _data(n=6)
    y = np.full(len(x), 3)
    head = _built(StableSoftmaxHead(VOCABULARY))
    sample_weight = np.ones(len(y), "float32") if weighted else None
    loss = head.loss(ignore_class=3, reduction=reduction)
    actual = to_numpy(loss(y, head(x, training=True), sample_weight))
    expected = _keras_reference(head, x, y, sample_weight, 3, reduction)
    np.testing.assert_array_equal(expected, 0.0)
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_fit_with_a_mean_with_sample_weight_loss_follows_the_naive_head(weighted):
    x, y = _data(n=32)
    sample_weight = np.linspace(0.5, 2.0, len(y)) if weighted else None
    keras.utils.set_random_seed(0)
    naive = _model("functional", keras.layers.Dense(VOCABULARY))
    head = StableSoftmaxHead(VOCABULARY)
    fused = _model("functional", head)
    fused.set_weights(naive.get_weights())
    reduction = "mean_with_sample_weight"
    naive.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=reduction
        ),
    )
    fused.compile(
        optimizer=keras.optimizers.SGD(0.5), loss=head.loss(reduction=reduction)
    )
    fit = dict(batch_size=8, epochs=2, shuffle=False, verbose=0)
    expected = naive.fit(x, y, sample_weight=sample_weight, **fit).history["loss"]
    actual = fused.fit(x, y, sample_weight=sample_weight, **fit).history["loss"]
    np.testing.assert_allclose(actual, expected, rtol=1e-5)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute is TensorFlow's")
def test_fit_over_two_mirrored_replicas_follows_the_naive_head():
    # Keras divides each replica's mean loss by the replicas, whose
    # gradients are summed; a sum it leaves.
    code = """
        import json
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        import keras, numpy as np, keras_softmax
        rng = np.random.default_rng(0)
        x = rng.normal(size=(32, 6)).astype("float32")
        y = rng.integers(0, 23, size=32)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        histories = {}
        for reduction in ("sum_over_batch_size", "mean_with_sample_weight", "sum"):
            for fused in (False, True):
                keras.utils.set_random_seed(0)
                with strategy.scope():
                    if fused:
                        head = keras_softmax.StableSoftmaxHead(23)
                        loss = head.loss(reduction=reduction)
                    else:
                        head = keras.layers.Dense(23)
                        loss = keras.losses.SparseCategoricalCrossentropy(
                            from_logits=True, reduction=reduction
                        )
                    model = keras.Sequential([keras.Input((6,)), head])
                    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
                history = model.fit(x, y, 16, 3, verbose=0, shuffle=False)
                histories[f"{reduction} {fused}"] = history.history["loss"]
        print(json.dumps([strategy.num_replicas_in_sync, histories]))
    """
    out = check_python("-c", textwrap.dedent(code), timeout=900)
    replicas, histories = json.loads(out.splitlines()[-1])
    assert replicas == 2
    for reduction in ("sum_over_batch_size", "mean_with_sample_weight", "sum"):
        np.testing.assert_allclose(
            histories[f"{reduction} True"],
            histories[f"{reduction} False"],
            rtol=1e-5,
            err_msg=reduction,
        )


def test_loss_of_a_masked_sequence_leaves_padding_out_as_keras_does():
    rng = np.random.default_rng(2)
    tokens = rng.integers(1, 9, size=(3, 5))
    tokens[0, 3:] = 0
    y = rng.integers(0, VOCABULARY, size=(3, 5))
    embedding = keras.layers.Embedding(9, DEPTH, mask_zero=True)
    head = StableSoftmaxHead(VOCABULARY)
    hidden = embedding(tokens)
    out = head(hidden, training=True)
    actual = float(to_numpy(head.loss()(y, out)))
    kernel, bias = head.get_weights()
    logits = to_numpy(hidden) @ kernel + bias
    mask = tokens != 0
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    expected = float(to_numpy(keras_loss(y[mask], logits[mask])))
    np.testing.assert_allclose(actual, expected, rtol=2e-6)


def test_evaluate_charges_the_cross_entropy_of_the_predicted_probabilities():
    x, y = _data(n=16)
    head = _built(StableSoftmaxHead(VOCABULARY))
    probabilities = head(x)
    actual = float(to_numpy(head.loss()(y, probabilities)))
    expected = keras.losses.SparseCategoricalCrossentropy()(y, probabilities)
    np.testing.assert_allclose(actual, float(to_numpy(expected)), rtol=1e-6)


class Subclassed(keras.Model):
    def __init__(self, head, **kwargs):
        super().__init__(**kwargs)
        self.trunk = keras.layers.Dense(DEPTH, activation="tanh")
        self.head = head

    def call(self, inputs, training=None):
        return self.head(self.trunk(inputs), training=training)


def _model(style, head):
    if style == "sequential":
        return keras.Sequential(
            [
                keras.Input((DEPTH,)),
                keras.layers.Dense(DEPTH, activation="tanh"),
                head,
            ]
        )
    if style == "functional":
        inputs = keras.Input((DEPTH,), name="hidden")
        hidden = keras.layers.Dense(DEPTH, activation="tanh")(inputs)
        return keras.Model(inputs, head(hidden))
    model = Subclassed(head)
    model(np.zeros((1, DEPTH), "float32"))
    return model


@pytest.mark.parametrize("style", ["sequential", "functional", "subclassed"])
def test_fit_follows_the_naive_heads_loss_curve_for_twenty_steps(style):
    x, y = _data(n=32)
    keras.utils.set_random_seed(0)
    naive = _model(style, keras.layers.Dense(VOCABULARY))
    head = StableSoftmaxHead(VOCABULARY)
    fused = _model(style, head)
    fused.set_weights(naive.get_weights())
    naive.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    fused.compile(optimizer=keras.optimizers.SGD(0.5), loss=head.loss(chunk_size=7))
    fit = dict(batch_size=32, epochs=20, shuffle=False, verbose=0)
    expected = naive.fit(x, y, **fit).history["loss"]
    actual = fused.fit(x, y, **fit).history["loss"]
    assert expected[-1] < 0.8 * expected[0]  # it trains
    np.testing.assert_allclose(actual, expected, rtol=1e-5)
    naive_probabilities = keras.ops.softmax(naive.predict(x, verbose=0))
    np.testing.assert_allclose(
        fused.predict(x, verbose=0), to_numpy(naive_probabilities), atol=1e-5
    )


def test_keras_file_reloads_predicts_the_same_and_trains_on(tmp_path):
    x, y = _data(n=32)
    head = StableSoftmaxHead(VOCABULARY, temperature=0.9)
    model = _model("functional", head)
    model.compile(optimizer="sgd", loss=head.loss())
    model.fit(x, y, epochs=1, verbose=0)
    path = tmp_path / "head.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )
    loaded_head = loaded.layers[-1]
    assert isinstance(loaded_head, StableSoftmaxHead)
    assert loaded_head.temperature == 0.9
    loaded.compile(optimizer="sgd", loss=loaded_head.loss())
    assert np.isfinite(loaded.fit(x, y, epochs=1, verbose=0).history["loss"][0])


def test_a_saved_head_loss_says_how_to_compile_again_after_loading():
    head = _built(StableSoftmaxHead(VOCABULARY))
    config = keras.losses.serialize(head.loss())
    with pytest.raises(ValueError, match=r"compile=False.*loss=head.loss\(\)"):
        keras.losses.deserialize(config)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(activation="relu"), "activation='relu'"),
        (dict(temperature=0.0), "temperature=0.0"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StableSoftmaxHead(VOCABULARY, **kwargs)


def test_a_head_as_wide_as_its_input_refuses_to_guess_what_it_was_given():
    head = _built(StableSoftmaxHead(DEPTH))
    with pytest.raises(ValueError, match="input size 6, units=6"):
        head.loss()(np.zeros(2), np.zeros((2, DEPTH), "float32"))


@exports
@pytest.mark.parametrize("fmt", ["saved_model", "onnx", "litert"])
def test_exports_serve_the_probabilities(tmp_path, fmt):
    x, _ = _data(n=8)
    model = _model("functional", StableSoftmaxHead(VOCABULARY, temperature=0.8))
    expected = model.predict(x, verbose=0)
    path = serving.save(model, tmp_path, "head", formats=(fmt,))[fmt]
    actual = serving.predict_export(fmt, path, {"hidden": x})
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_a_fit_step_never_holds_the_tokens_by_vocabulary_logits():
    # One `train_on_batch` at 4096 tokens by 32768 classes, in a fresh
    # process: the logits alone would be 512 MiB.
    code = f"""
        import resource, keras, numpy as np
        import keras_softmax
        n, d, v = 4096, 64, 32768
        rng = np.random.default_rng(0)
        x = rng.normal(size=(n, d)).astype("float32")
        y = rng.integers(0, v, size=n)
        head = keras_softmax.StableSoftmaxHead(v)
        model = keras.Sequential([keras.Input((d,)), head])
        model.compile(optimizer="sgd", loss=head.loss(chunk_size=256))
        model.train_on_batch(x[:512], y[:512])  # trace and warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model.train_on_batch(x, y)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print({BACKEND!r}, (after - before) * 1024 / (n * v * 4))
    """
    extra = float(check_python("-c", textwrap.dedent(code)).split()[-1])
    assert extra < 0.5, f"extra peak {extra:.2f} x the logits"


def test_package_exports_the_head():
    assert keras_softmax.StableSoftmaxHead is StableSoftmaxHead
    assert "StableSoftmaxHead" in keras_softmax.__all__
