"""`StableMultiHeadAttention`: Keras' layer, without attention to padding."""

from unittest import mock

import keras
import numpy as np
import pytest
from support.backends import BACKEND
from support.backends import PLATFORM
from support.backends import exports
from support.blocks import SMALL
from support.paths import GPU_KERNEL
from support.paths import as_on_a_gpu
from support.paths import record_paths
from support.references import FLOAT32_EPS
from support.references import attention as reference_attention
from support.references import to_numpy

import keras_softmax
from keras_softmax import StableMultiHeadAttention
from keras_softmax import _blockwise_attention
from keras_softmax.demo import serving


def _pair(seed=0, temperature=1.0, **kwargs):
    """Our layer and Keras', built on the same inputs, with the same weights."""
    kwargs = {"num_heads": 2, "key_dim": 4, "seed": seed, **kwargs}
    ours = StableMultiHeadAttention(temperature=temperature, **kwargs)
    theirs = keras.layers.MultiHeadAttention(**kwargs)
    x = np.zeros((1, 3, 8), "float32")
    ours(x, x)
    theirs(x, x)
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=w.shape).astype("float32") for w in theirs.weights]
    theirs.set_weights(weights)
    ours.set_weights(weights)
    return ours, theirs


def _inputs(seed=1, batch=3, length=5, width=8):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, length, width)).astype("float32")


def _projected_reference(layer, query, value, mask):
    """The layer's output in float64 NumPy, from its own weights."""
    w = [np.asarray(to_numpy(v), np.float64) for v in layer.weights]
    (qk, qb, kk, kb, vk, vb, ok, ob) = w
    q = np.einsum("btd,dnh->btnh", query, qk) + qb
    k = np.einsum("bsd,dnh->bsnh", value, kk) + kb
    v = np.einsum("bsd,dnh->bsnh", value, vk) + vb
    out, weights = reference_attention(
        q,
        k,
        v,
        mask=mask[:, None],
        temperature=float(to_numpy(layer.current_temperature())),
    )
    return np.einsum("btnh,nhd->btd", out, ok) + ob, weights


def test_weights_are_keras_weights_in_keras_order():
    ours, theirs = _pair()
    assert [w.path.split("/", 1)[1] for w in ours.weights] == [
        w.path.split("/", 1)[1] for w in theirs.weights
    ]
    learned = StableMultiHeadAttention(2, 4, trainable_temperature=True)
    x = _inputs()
    learned(x, x)
    names = [w.path.split("/", 1)[1] for w in learned.weights]
    assert names[:-1] == [w.path.split("/", 1)[1] for w in theirs.weights]
    assert names[-1].endswith("log_temperature")


@pytest.mark.parametrize("causal", [False, True])
def test_same_outputs_as_keras_wherever_every_query_keeps_a_key(causal):
    ours, theirs = _pair()
    x, y = _inputs(1), _inputs(2)
    mask = np.random.default_rng(3).random((3, 5, 5)) < 0.5
    mask[..., 0] = True
    for kwargs in ({}, {"attention_mask": mask}):
        kwargs = {**kwargs, "use_causal_mask": causal}
        np.testing.assert_allclose(
            to_numpy(ours(x, y, **kwargs)),
            to_numpy(theirs(x, y, **kwargs)),
            rtol=1e-5,
            atol=1e-5,
        )


def test_fully_masked_query_outputs_the_output_bias_where_keras_averages_on_a_cpu():
    ours, theirs = _pair()
    x = _inputs()
    mask = np.ones((3, 5, 5), bool)
    mask[0, 2] = False  # one query attends to nothing
    mask[1, :, 3:] = False  # keys 3 and 4 are padding
    bias = to_numpy(ours.output_dense.bias)
    out, weights = (to_numpy(t) for t in ours(x, x, attention_mask=mask, **_scores()))
    np.testing.assert_array_equal(out[0, 2], bias)
    np.testing.assert_array_equal(weights[0, :, 2], 0.0)
    np.testing.assert_array_equal(weights[1, :, :, 3:], 0.0)
    np.testing.assert_array_equal(to_numpy(ours(x, x, attention_mask=mask))[0, 2], bias)
    if PLATFORM == "cpu":
        # Keras' default path on a CPU gives the padded query the average of
        # the values (on a GPU, Keras on PyTorch gives 0).
        keras_out = to_numpy(theirs(x, x, attention_mask=mask))
        assert np.abs(keras_out[0, 2] - bias).max() > 0.1
    expected, expected_weights = _projected_reference(ours, x, x, mask)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-5, atol=1e-6)


def _assert_equal_but_for_float32_rounding(actual, expected):
    """Equal within a few float32 ulps of the largest output.

    The output projection sums terms as large as the largest output, so
    its rounding is relative to that, not to each (possibly small) output:
    PyTorch's CPU kernel and the explicit path differed by 2.6e-6 in an
    output of 0.054 where the largest was 32.
    """
    tolerance = 8 * FLOAT32_EPS * np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance)


def _scores():
    return {"return_attention_scores": True}


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_flash_attention_takes_blocks_with_the_reference_result(temperature):
    # (Keras' own layer refuses flash attention on a CPU.)
    ours = StableMultiHeadAttention(
        2, 4, temperature=temperature, flash_attention=True, seed=0, block_sizes=SMALL
    )
    x = _inputs(length=9)
    mask = np.random.default_rng(5).random((3, 9, 9)) < 0.7
    mask[1, 4] = False
    causal = np.tril(np.ones((9, 9), bool))
    rule = _blockwise_attention._rule
    with mock.patch.object(_blockwise_attention, "_rule", wraps=rule) as blocks:
        out = to_numpy(ours(x, x, attention_mask=mask, use_causal_mask=True))
    if BACKEND != "torch" or temperature < 1.0:  # else PyTorch's own SDPA
        assert blocks.call_count == 1
        spec = blocks.call_args.args[0]
        assert (spec.block_queries, spec.block_keys) == SMALL
    expected, _ = _projected_reference(ours, x, x, mask & causal)
    bias = to_numpy(ours.output_dense.bias)
    np.testing.assert_array_equal(out[1, 4], bias)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="flash attention"):
        ours(x, x, **_scores())


@pytest.mark.parametrize("causal", [False, True])
def test_the_layer_takes_the_functions_decision_on_a_gpu(monkeypatch, causal):
    # `StableMultiHeadAttention` computes through `attend`, which asks
    # `choose_path`: as on a GPU here (PyTorch's SDPA kernels run on this
    # CPU, cuDNN's call on XLA; TensorFlow has no kernel of its own).
    ours, _ = _pair()
    taken = as_on_a_gpu(monkeypatch) if GPU_KERNEL else record_paths(monkeypatch)
    x = _inputs(length=6)  # even: cuDNN takes a mask of even lengths only
    mask = np.random.default_rng(6).random((3, 6, 6)) < 0.6
    mask[0, 2] = False  # a query that keeps no key
    mask[2] = False  # a sequence of padding only
    out = to_numpy(ours(x, x, attention_mask=mask, use_causal_mask=causal))
    assert taken == [GPU_KERNEL or "keras_fused"]
    keep = mask & np.tril(np.ones((6, 6), bool)) if causal else mask
    expected, _ = _projected_reference(ours, x, x, keep)
    bias = to_numpy(ours.output_dense.bias)
    np.testing.assert_array_equal(out[0, 2], bias)
    np.testing.assert_array_equal(out[2], np.broadcast_to(bias, (6, 8)))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    # Without a mask: a causal mask alone reaches the kernel as its flag.
    del taken[:]
    plain = to_numpy(ours(x, x, use_causal_mask=causal))
    assert taken == [GPU_KERNEL or "keras_fused"]
    full = np.ones((3, 6, 6), bool)
    expected, _ = _projected_reference(ours, x, x, np.tril(full) if causal else full)
    np.testing.assert_allclose(plain, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scores", [False, True], ids=["outputs", "with scores"])
def test_a_causal_mask_alone_reaches_attention_as_the_causal_flag(scores):
    # Not as a [T, S] mask, which kernels (and the blocks, which then skip
    # nothing) would read in full.
    ours, theirs = _pair()
    x = _inputs()
    calls = []
    attend = keras_softmax.attention.attend

    def spy(*args, **kwargs):
        calls.append((args[4] is None, kwargs["is_causal"]))
        return attend(*args, **kwargs)

    kwargs = {"use_causal_mask": True, "return_attention_scores": scores}
    with mock.patch.object(keras_softmax.attention, "attend", spy):
        out = ours(x, x, **kwargs)
        padded = ours(x, x, attention_mask=np.ones((3, 5, 5), bool), **kwargs)
    assert calls == [(True, True), (False, False)]
    expected = keras.tree.flatten(theirs(x, x, **kwargs))
    for actual in (out, padded):
        for a, b in zip(keras.tree.flatten(actual), expected, strict=True):
            np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 3.0, 0.5])
def test_same_outputs_with_and_without_the_attention_scores(temperature):
    ours, _ = _pair(temperature=temperature)
    x = _inputs()
    mask = np.random.default_rng(4).random((3, 5, 5)) < 0.5
    mask[2, 1] = False
    plain = to_numpy(ours(x, x, attention_mask=mask))
    with_scores, _ = ours(x, x, attention_mask=mask, **_scores())
    with_scores = to_numpy(with_scores)
    if BACKEND == "torch" and temperature >= 1.0:
        # PyTorch's fused kernel rounds differently from the explicit path.
        _assert_equal_but_for_float32_rounding(plain, with_scores)
    else:
        np.testing.assert_array_equal(plain, with_scores)


def test_keras_masks_from_embedding_reach_the_layer():
    tokens = keras.Input((6,), dtype="int32")
    embedded = keras.layers.Embedding(10, 8, mask_zero=True)(tokens)
    attended = StableMultiHeadAttention(2, 4, name="mha")(embedded, embedded)
    model = keras.Model(tokens, attended)
    ids = np.array([[3, 4, 5, 0, 0, 0], [0, 0, 0, 0, 0, 0]], "int32")
    out = to_numpy(model(ids))
    layer = model.get_layer("mha")
    bias = to_numpy(layer.output_dense.bias)
    # Padded queries, and every query of an all-padding sequence, get the bias.
    np.testing.assert_array_equal(out[0, 3:], np.broadcast_to(bias, (3, 8)))
    np.testing.assert_array_equal(out[1], np.broadcast_to(bias, (6, 8)))
    # Changing what sits in the padding changes nothing else.
    embedding = to_numpy(model.layers[1].embeddings)
    other = ids.copy()
    other[0, 3:] = [7, 8, 9]
    x = embedding[ids]
    x_other = embedding[other]
    mask = np.array([[1, 1, 1, 0, 0, 0]], bool)
    first = to_numpy(layer(x[:1], x[:1], query_mask=mask, value_mask=mask))
    second = to_numpy(layer(x_other[:1], x_other[:1], query_mask=mask, value_mask=mask))
    np.testing.assert_allclose(first[0, :3], second[0, :3], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(first[0, :3], out[0, :3], rtol=1e-5, atol=1e-6)


def test_a_masking_layer_mask_reaches_the_layer():
    features = keras.Input((4, 8))
    masked = keras.layers.Masking(0.0)(features)
    layer = StableMultiHeadAttention(2, 4, name="mha")
    model = keras.Model(features, layer(masked, masked))
    x = _inputs(batch=2, length=4)
    x[0, 2:] = 0.0  # two padded steps
    x[1] = 0.0  # padding only
    out = to_numpy(model(x))
    bias = to_numpy(layer.output_dense.bias)
    np.testing.assert_array_equal(out[0, 2:], np.broadcast_to(bias, (2, 8)))
    np.testing.assert_array_equal(out[1], np.broadcast_to(bias, (4, 8)))
    real = np.array([[True, True, False, False]])
    pairs = real[:, :, None] & real[:, None, :]
    np.testing.assert_allclose(
        out[0, :2],
        to_numpy(layer(x[:1], x[:1], attention_mask=pairs))[0, :2],
        rtol=1e-6,
        atol=1e-6,
    )


def test_temperature_divides_the_scores_and_trains():
    x = _inputs()
    mask = np.random.default_rng(5).random((3, 5, 5)) < 0.6
    mask[1, 4] = False
    for temperature in (0.5, 2.0):
        layer, _ = _pair(temperature=temperature)
        out = to_numpy(layer(x, x, attention_mask=mask))
        expected, _ = _projected_reference(layer, x, x, mask)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    learned = StableMultiHeadAttention(
        2, 4, temperature=2.0, trainable_temperature=True
    )
    learned(x, x)
    np.testing.assert_allclose(
        float(to_numpy(learned.current_temperature())), 2.0, rtol=1e-6
    )


def test_learned_temperature_moves_in_fit():
    x = _inputs(batch=16)
    inputs = keras.Input((5, 8))
    layer = StableMultiHeadAttention(2, 4, trainable_temperature=True)
    model = keras.Model(inputs, layer(inputs, inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    target = np.roll(x, 1, axis=1)
    history = model.fit(x, target, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert float(to_numpy(layer.current_temperature())) != 1.0


def test_dropout_drops_weights_in_training_only_and_keeps_dead_queries_at_bias():
    ours, _ = _pair(dropout=0.5)
    plain, _ = _pair(dropout=0.0)
    x = _inputs()
    mask = np.ones((3, 5, 5), bool)
    mask[0, 1] = False
    bias = to_numpy(ours.output_dense.bias)
    inference = to_numpy(ours(x, x, attention_mask=mask, training=False))
    # (Without dropout, a fused kernel may compute the plain layer.)
    _assert_equal_but_for_float32_rounding(
        inference, to_numpy(plain(x, x, attention_mask=mask))
    )
    trained = to_numpy(ours(x, x, attention_mask=mask, training=True))
    assert np.abs(trained - inference).max() > 1e-3
    np.testing.assert_array_equal(trained[0, 1], bias)
    np.testing.assert_array_equal(inference[0, 1], bias)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_fully_masked_queries_at_the_bias(policy):
    layer = StableMultiHeadAttention(2, 4, dtype=policy)
    x = _inputs()
    mask = np.ones((3, 5, 5), bool)
    mask[0, 1] = False
    mask[1, :, 3:] = False
    plain = to_numpy(layer(x, x, attention_mask=mask)).astype(np.float32)
    with_scores, weights = layer(x, x, attention_mask=mask, **_scores())
    with_scores = to_numpy(with_scores).astype(np.float32)
    bias = to_numpy(layer.output_dense.bias).astype(np.float32)
    assert np.all(np.isfinite(plain))
    for out in (plain, with_scores):
        np.testing.assert_array_equal(out[0, 1], bias)
    np.testing.assert_array_equal(to_numpy(weights)[1, :, :, 3:], 0)
    # The two paths round differently in half precision, by a few of its ulps.
    half_eps = 2.0**-10 if policy == "mixed_float16" else 2.0**-7
    scale = np.abs(plain).max()
    np.testing.assert_allclose(with_scores, plain, atol=8 * half_eps * scale)


def test_attention_over_two_axes_zeroes_fully_masked_queries():
    layer = StableMultiHeadAttention(2, 4, attention_axes=(1, 2))
    x = _inputs().reshape(1, 3, 5, 8)
    mask = np.ones((1, 3, 5, 3, 5), bool)
    mask[0, 1, 2] = False
    out, weights = layer(x, x, attention_mask=mask, **_scores())
    np.testing.assert_array_equal(to_numpy(weights)[0, :, 1, 2], 0.0)
    np.testing.assert_array_equal(
        to_numpy(out)[0, 1, 2], to_numpy(layer.output_dense.bias)
    )


def test_config_round_trip_keeps_temperature():
    layer = StableMultiHeadAttention(
        3, 5, temperature=0.7, trainable_temperature=True, dropout=0.1
    )
    config = layer.get_config()
    assert config["temperature"] == 0.7 and config["trainable_temperature"] is True
    again = StableMultiHeadAttention.from_config(config)
    assert again.get_config() == config


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -2.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "warm"}, "temperature"),
        ({"trainable_temperature": "yes"}, "trainable_temperature"),
    ],
)
def test_bad_argument_raises_value_error_naming_it(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        StableMultiHeadAttention(2, 4, **kwargs)
    config = StableMultiHeadAttention(2, 4).get_config()
    with pytest.raises(ValueError, match=f"`{argument}`"):
        StableMultiHeadAttention.from_config({**config, **kwargs})


@pytest.mark.parametrize("symbolic", [False, True])
def test_attention_mask_of_the_wrong_shape_names_both_shapes(symbolic):
    layer = StableMultiHeadAttention(2, 4)
    x = np.ones((2, 3, 8), "float32")
    wrong = np.ones((1, 2, 5), bool)  # 2 queries and 5 keys, not 3 and 3
    if symbolic:
        x, wrong = keras.Input((3, 8)), keras.Input((2, 5), dtype="bool")
    expected = r"\((2|None), 3, 3\).*attention_mask.shape=\((1|None), 2, 5\)"
    with pytest.raises(ValueError, match=expected):
        layer(x, x, attention_mask=wrong)


def test_keras_layer_test_harness():
    from keras.src import testing

    case = testing.TestCase()
    for kwargs, weights, seeds in (
        ({"num_heads": 2, "key_dim": 2}, 8, 0),
        ({"num_heads": 2, "key_dim": 2, "dropout": 0.5, "use_bias": False}, 4, 1),
        ({"num_heads": 2, "key_dim": 2, "trainable_temperature": True}, 9, 0),
    ):
        case.run_layer_test(
            StableMultiHeadAttention,
            init_kwargs=kwargs,
            input_shape={"query_shape": (2, 8, 16), "value_shape": (2, 4, 16)},
            expected_output_shape=(2, 8, 16),
            expected_num_trainable_weights=weights,
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=seeds,
            expected_num_losses=0,
            supports_masking=True,
            run_training_check=False,
        )


def _masked_model(seed=0, temperature=2.0, trainable_temperature=False):
    """A model on our layer, with a padded batch that has a fully masked query."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    allowed = keras.Input((6, 6), dtype="bool", name="allowed")
    x = keras.layers.Embedding(20, 8, mask_zero=True)(tokens)
    x = StableMultiHeadAttention(
        2, 4, temperature=temperature, trainable_temperature=trainable_temperature
    )(x, x, attention_mask=allowed)
    model = keras.Model([tokens, allowed], keras.layers.Dense(3)(x))
    ids = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9]], "int32")
    mask = np.ones((2, 6, 6), bool)
    mask[1, 2] = False
    return model, {"tokens": ids, "allowed": mask}


def test_keras_file_loads_in_a_fresh_process_with_safe_mode(tmp_path):
    model, inputs = _masked_model(trainable_temperature=True)
    layer = [lay for lay in model.layers if isinstance(lay, StableMultiHeadAttention)]
    # A learned temperature other than the initial one must come back.
    layer[0].weights[-1].assign(np.log(0.3))
    expected = to_numpy(model.predict(list(inputs.values()), verbose=0))
    path = serving.save(model, tmp_path, "attention", formats=("keras",))["keras"]
    np.testing.assert_allclose(
        serving.predict_keras_fresh(path, inputs), expected, rtol=1e-6, atol=1e-6
    )
    loaded = keras.saving.load_model(path, safe_mode=True)
    again = [lay for lay in loaded.layers if isinstance(lay, StableMultiHeadAttention)]
    # The config reports the learned value, as StableSoftmax's does.
    assert again[0].temperature == pytest.approx(0.3, rel=1e-6)
    assert again[0].trainable_temperature
    np.testing.assert_allclose(float(to_numpy(again[0].current_temperature())), 0.3)


def test_fixed_temperature_cannot_be_set_after_construction_but_learned_can():
    fixed = StableMultiHeadAttention(2, 4, temperature=2.0)
    with pytest.raises(ValueError, match="fixed at construction.*temperature=0.5"):
        fixed.temperature = 0.5
    model, _ = _masked_model(trainable_temperature=True)
    layer = [lay for lay in model.layers if isinstance(lay, StableMultiHeadAttention)]
    layer[0].temperature = 0.5
    np.testing.assert_allclose(float(to_numpy(layer[0].current_temperature())), 0.5)


@exports
@pytest.mark.parametrize("fmt", ["saved_model", "onnx", "litert"])
@pytest.mark.parametrize("temperature", [2.0, 0.5])  # the fused path, the explicit
def test_exports_serve_the_keras_result_fully_masked_rows_included(
    tmp_path, fmt, temperature
):
    model, inputs = _masked_model(temperature=temperature)
    expected = to_numpy(model.predict(list(inputs.values()), verbose=0))
    path = serving.save(model, tmp_path, "attention", formats=(fmt,))[fmt]
    actual = serving.predict_export(fmt, path, inputs)
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    # Padded queries and the fully masked one give the final layer's output
    # for an attention output of 0: the same vector for all of them.
    dead = np.stack([actual[0, 3], actual[0, 4], actual[0, 5], actual[1, 2]])
    np.testing.assert_allclose(dead, np.broadcast_to(dead[0], dead.shape), atol=1e-6)


def test_package_exports_the_layer_and_function():
    assert keras_softmax.StableMultiHeadAttention is StableMultiHeadAttention
    assert "dot_product_attention" in keras_softmax.__all__
    assert "StableMultiHeadAttention" in keras_softmax.__all__


def test_block_sizes_are_checked_and_saved_with_the_layer():
    layer = StableMultiHeadAttention(2, 4, block_sizes=(2, 3))
    assert layer.block_sizes == (2, 3)
    rebuilt = StableMultiHeadAttention.from_config(layer.get_config())
    assert rebuilt.block_sizes == keras_softmax.BlockSizes(2, 3)
    with pytest.raises(ValueError, match="block_sizes"):
        StableMultiHeadAttention(2, 4, block_sizes=(0, 2))
