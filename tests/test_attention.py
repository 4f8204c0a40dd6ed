"""`dot_product_attention`: Keras' attention, with fully masked queries at 0."""

import re
from unittest import mock

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support.backends import BACKEND
from support.backends import PLATFORM
from support.backends import compiled
from support.backends import gradient
from support.backends import jacobian
from support.backends import traced
from support.blocks import SMALL
from support.blocks import SMALL_BLOCKS
from support.paths import CPU
from support.paths import GPU_KERNEL
from support.paths import as_on_a_gpu
from support.paths import describe
from support.references import attention as reference_attention
from support.references import live_queries
from support.references import numerical_jacobian
from support.references import output_tolerance
from support.references import to_numpy

from keras_softmax import _backend
from keras_softmax import attention
from keras_softmax import dot_product_attention
from keras_softmax.attention import BlockSizes


@st.composite
def attention_inputs(draw):
    b, t, s = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    size = draw(st.integers(1, 6))
    values = st.floats(-10, 10, width=32)
    q = draw(hnp.arrays(np.float32, (b, t, heads, size), elements=values))
    k = draw(hnp.arrays(np.float32, (b, s, kv_heads, size), elements=values))
    v = draw(hnp.arrays(np.float32, (b, s, kv_heads, size), elements=values))
    mask = None
    if draw(st.booleans()):
        # Full, per-batch, per-key (padding) or shared across the batch.
        shape = draw(
            st.sampled_from([(b, heads, t, s), (b, 1, t, s), (b, 1, 1, s), (t, s)])
        )
        mask = draw(hnp.arrays(np.bool_, shape))
    bias = None
    if draw(st.booleans()):
        bias = draw(
            hnp.arrays(np.float32, (b, 1, t, s), elements=st.floats(-5, 5, width=32))
        )
    return {
        "query": q,
        "key": k,
        "value": v,
        "bias": bias,
        "mask": mask,
        "scale": draw(st.sampled_from([None, 0.3, 2.0])),
        "is_causal": draw(st.booleans()),
        "temperature": draw(st.sampled_from([1.0, 2.5, 0.5])),
    }


def _full_mask(case):
    """The case's mask with leading axes, as NumPy broadcasts it."""
    mask = case["mask"]
    return None if mask is None else mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


# The path chosen at these sizes (the full scores), and blocks of two
# queries and two keys (FlashAttention's algorithm, or on PyTorch its SDPA
# where the arguments allow).
PATHS = {"chosen": {}, "blocks": SMALL_BLOCKS}


@pytest.mark.parametrize("path", PATHS)
@given(case=attention_inputs())
def test_matches_float64_reference_and_fully_masked_queries_are_exactly_zero(
    path, case
):
    actual = to_numpy(dot_product_attention(**case, **PATHS[path]))
    expected, _ = reference_attention(**{**case, "mask": _full_mask(case)})
    q = case["query"]
    live = live_queries(
        _full_mask(case), case["is_causal"], q.shape[:3] + (case["key"].shape[1],)
    )
    np.testing.assert_array_equal(actual[~live], 0.0)
    allowed = output_tolerance(
        q, case["key"], case["value"], case["bias"], case["scale"], case["temperature"]
    )
    error = np.abs(actual.astype(np.float64) - expected)
    assert np.all(error <= allowed), f"error {error.max():.3g} > allowed"


@given(attention_inputs())
def test_same_as_keras_wherever_every_query_keeps_a_key(case):
    temperature = case.pop("temperature")
    mask = _full_mask(case)
    if mask is not None:
        # Every query keeps its first key (and causal attention keeps it too).
        mask = mask.copy()
        mask[..., 0] = True
    case["mask"] = mask
    actual = to_numpy(dot_product_attention(**case, temperature=temperature))
    if temperature == 1.0:
        keras_case = case
    else:
        # Keras has no temperature: the same thing is a scale and a bias.
        scale = case["scale"] or 1.0 / np.sqrt(case["query"].shape[-1])
        bias = case["bias"]
        keras_case = {
            **case,
            "scale": scale / temperature,
            "bias": None if bias is None else bias / np.float32(temperature),
        }
    if BACKEND == "torch" and case["bias"] is not None and mask is not None:
        # Keras' PyTorch backend takes one of the two, so give it one.
        keep = mask & np.ones(keras_case["bias"].shape, bool)
        keras_case = {
            **keras_case,
            "bias": np.where(keep, keras_case["bias"], np.float32(-3e38)),
            "mask": None,
        }
    # Keras' TensorFlow backend fails on a single key head (Keras 3.15).
    groups = case["query"].shape[2] // case["key"].shape[2]
    for name in ("key", "value"):
        keras_case = {**keras_case, name: np.repeat(case[name], groups, axis=2)}
    expected = to_numpy(keras.ops.dot_product_attention(**keras_case))
    allowed = output_tolerance(
        case["query"],
        case["key"],
        case["value"],
        case["bias"],
        case["scale"],
        temperature,
    )
    assert np.all(np.abs(actual - expected) <= allowed)


def test_keras_averages_padding_on_a_cpu_where_ours_gives_zero():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 3, 2, 4)).astype("float32") for _ in range(3))
    padding = np.array([True, True, False])  # the third query and key are padding
    mask = (padding[:, None] & padding[None, :])[None, None]
    ours = to_numpy(dot_product_attention(q, k, v, mask=mask))
    theirs = to_numpy(keras.ops.dot_product_attention(q, k, v, mask=mask))
    np.testing.assert_array_equal(ours[0, 2], 0.0)
    if PLATFORM == "cpu":
        # Keras' fused path on a CPU gives the padded query the mean of the
        # values (on a GPU, Keras on PyTorch gives 0).
        np.testing.assert_allclose(theirs[0, 2], v[0].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(ours[0, :2], theirs[0, :2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_huge_scores_give_the_reference_and_finite_gradients(path):
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, 4, 2, 3)).astype("float32") * np.float32(1e18)
    k = rng.normal(size=(2, 5, 2, 3)).astype("float32") * np.float32(1e18)
    v = rng.normal(size=(2, 5, 2, 3)).astype("float32")
    mask = rng.random((2, 1, 4, 5)) < 0.6
    mask[0, 0, 1] = False
    for temperature in (1.0, 3.0, 0.25):
        actual = to_numpy(
            dot_product_attention(
                q, k, v, mask=mask, temperature=temperature, **PATHS[path]
            )
        )
        expected, _ = reference_attention(q, k, v, mask=mask, temperature=temperature)
        # Scores of about 1e36, apart by far more than their rounding: each
        # live query takes its best key's value, exactly.
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(actual[0, 1], 0.0)
        for wrt in range(3):
            inputs = [q, k, v]

            def loss(x, wrt=wrt, inputs=inputs, temperature=temperature):
                args = list(inputs)
                args[wrt] = keras.ops.cast(x, "float32")
                return dot_product_attention(
                    *args, mask=mask, temperature=temperature, **PATHS[path]
                )

            grad = gradient(loss, inputs[wrt])
            assert np.all(np.isfinite(grad)), (wrt, temperature)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "temperature, soft_cap", [(1.0, None), (2.0, None), (0.5, None), (0.5, 1.5)]
)
def test_gradient_matches_central_differences_and_is_zero_for_dead_queries(
    temperature, soft_cap, path
):
    rng = np.random.default_rng(2)
    shapes = [(1, 3, 2, 2), (1, 4, 2, 2), (1, 4, 2, 2)]
    sizes = [int(np.prod(s)) for s in shapes]
    x0 = rng.normal(size=sum(sizes))
    mask = np.array([[[[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]]]], bool)
    bias = rng.normal(size=(1, 1, 3, 4))

    def split(x, reshape=keras.ops.reshape):
        parts, start = [], 0
        for shape, size in zip(shapes, sizes, strict=True):
            parts.append(reshape(x[start : start + size], shape))
            start += size
        return parts

    def ours(x):
        q, k, v = split(x)
        return dot_product_attention(
            q,
            k,
            v,
            bias=bias,
            mask=mask,
            temperature=temperature,
            attn_logits_soft_cap=soft_cap,
            **PATHS[path],
        )

    def reference(x):
        q, k, v = split(x, np.reshape)
        return reference_attention(
            q,
            k,
            v,
            bias=bias,
            mask=mask,
            temperature=temperature,
            attn_logits_soft_cap=soft_cap,
        )[0].ravel()

    actual = jacobian(ours, x0)
    expected = numerical_jacobian(reference, x0)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)
    # The second query keeps no key: its outputs depend on nothing.
    dead = np.zeros((1, 3, 2, 2), bool)
    dead[0, 1] = True
    np.testing.assert_array_equal(actual[dead.ravel()], 0.0)


def test_compiled_and_traced_give_the_eager_result():
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=(2, 4, 2, 3)).astype("float32") for _ in range(3))
    mask = rng.random((2, 1, 4, 4)) < 0.5
    mask[1, 0, 2] = False

    def fn(q, k, v, mask):
        return dot_product_attention(q, k, v, mask=mask, is_causal=True)

    eager = to_numpy(fn(q, k, v, mask))
    assert np.all(eager[1, 2] == 0.0)
    for wrapped in (traced(fn), compiled(fn)):
        np.testing.assert_allclose(
            to_numpy(wrapped(q, k, v, mask)), eager, rtol=1e-6, atol=1e-6
        )


def test_works_in_a_functional_model_with_unknown_lengths():
    q = keras.Input((None, 2, 4))
    k = keras.Input((None, 2, 4))
    allowed = keras.Input((None, None), dtype="bool")
    outputs = dot_product_attention(
        q, k, k, mask=keras.ops.expand_dims(allowed, 1), is_causal=True
    )
    model = keras.Model([q, k, allowed], outputs)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 3, 2, 4)).astype("float32")
    y = rng.normal(size=(2, 5, 2, 4)).astype("float32")
    mask = rng.random((2, 3, 5)) < 0.7
    mask[0, 1] = False
    actual = to_numpy(model([x, y, mask]))
    expected = to_numpy(
        dot_product_attention(x, y, y, mask=mask[:, None], is_causal=True)
    )
    np.testing.assert_array_equal(actual, expected)
    np.testing.assert_array_equal(actual[0, 1], 0.0)


def test_tensor_temperature_gives_the_float_result():
    rng = np.random.default_rng(4)
    q, k, v = (rng.normal(size=(1, 3, 2, 4)).astype("float32") for _ in range(3))
    mask = np.array([[True, False, True], [False, False, False], [True] * 3])
    for value in (0.5, 2.0):
        from_float = to_numpy(
            dot_product_attention(q, k, v, mask=mask, temperature=value)
        )
        from_tensor = to_numpy(
            dot_product_attention(
                q, k, v, mask=mask, temperature=keras.ops.convert_to_tensor(value)
            )
        )
        np.testing.assert_allclose(from_tensor, from_float, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(from_tensor[0, 1], 0.0)


def test_numeric_mask_keeps_where_above_one_half():
    rng = np.random.default_rng(5)
    q, k, v = (rng.normal(size=(1, 2, 1, 4)).astype("float32") for _ in range(3))
    numeric = np.array([[0.9, 0.2], [0.0, 0.4]], np.float32)
    np.testing.assert_array_equal(
        to_numpy(dot_product_attention(q, k, v, mask=numeric)),
        to_numpy(dot_product_attention(q, k, v, mask=numeric > 0.5)),
    )


_q = np.zeros((1, 2, 1, 4), "float32")


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"query": np.zeros((2, 1, 4), "float32")}, "query"),
        ({"key": np.zeros((1, 2, 4), "float32")}, "key"),
        ({"scale": -1.0}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"scale": "big"}, "scale"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": np.ones(2)}, "temperature"),
        ({"is_causal": "yes"}, "is_causal"),
        ({"flash_attention": "yes"}, "flash_attention"),
        ({"attn_logits_soft_cap": 0.0}, "attn_logits_soft_cap"),
        ({"attn_logits_soft_cap": "big"}, "attn_logits_soft_cap"),
        ({"mask": np.ones((1, 1, 1, 2, 2), bool)}, "mask"),
        ({"bias": np.ones((1, 1, 1, 2, 2), "float32")}, "bias"),
    ],
)
def test_bad_argument_raises_value_error_naming_it(kwargs, argument):
    arguments = {"query": _q, "key": _q, "value": _q, **kwargs}
    with pytest.raises(ValueError, match=f"`{argument}`"):
        dot_product_attention(**arguments)


@pytest.mark.parametrize("name", ["mask", "bias"])
def test_mask_or_bias_of_the_wrong_shape_names_both_shapes(name):
    q, k = np.zeros((2, 3, 2, 4), "float32"), np.zeros((2, 5, 2, 4), "float32")
    wrong = np.ones((1, 1, 2, 5), "float32")  # 2 queries, not 3
    with pytest.raises(ValueError, match=rf"`{name}`.*\(2, 2, 3, 5\).*\(1, 1, 2, 5\)"):
        dot_product_attention(q, k, k, **{name: wrong})


def _padded_causal_case(value_size=4, seed=7):
    """Queries, keys, values, a bias and a mask whose second query keeps no key."""
    rng = np.random.default_rng(seed)
    q, k = (rng.normal(size=(2, 4, 2, 4)).astype("float32") * 3 for _ in range(2))
    v = rng.normal(size=(2, 4, 2, value_size)).astype("float32")
    bias = rng.normal(size=(2, 1, 4, 4)).astype("float32")
    mask = rng.random((2, 1, 4, 4)) < 0.7
    mask[:, :, 1] = False
    return {"query": q, "key": k, "value": v, "bias": bias, "mask": mask}


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_soft_cap_caps_the_scores_before_the_temperature_and_the_masks(temperature):
    case = {**_padded_causal_case(), "is_causal": True, "temperature": temperature}
    actual = to_numpy(dot_product_attention(**case, attn_logits_soft_cap=2.0))
    expected, _ = reference_attention(**case, attn_logits_soft_cap=2.0)
    np.testing.assert_array_equal(actual[:, 1], 0.0)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    uncapped = to_numpy(dot_product_attention(**case))
    assert np.abs(uncapped - actual).max() > 0.1  # the cap changes the result


def test_value_head_size_may_differ_from_the_keys():
    case = {**_padded_causal_case(value_size=6), "is_causal": True}
    actual = to_numpy(dot_product_attention(**case))
    expected, _ = reference_attention(**case)
    assert actual.shape == (2, 4, 2, 6)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    symbolic = dot_product_attention(
        keras.Input((4, 2, 4)), keras.Input((4, 2, 4)), keras.Input((4, 2, 6))
    )
    assert tuple(symbolic.shape) == (None, 4, 2, 6)


def test_symbolic_output_dtype_is_the_eager_one_for_mixed_dtypes():
    q = keras.ops.ones((1, 2, 1, 4), "float16")
    kv = keras.ops.ones((1, 2, 1, 4), "float32")
    eager = dot_product_attention(q, kv, kv)
    symbolic = dot_product_attention(
        keras.Input((2, 1, 4), dtype="float16"),
        keras.Input((2, 1, 4), dtype="float32"),
        keras.Input((2, 1, 4), dtype="float32"),
    )
    promoted = keras.backend.result_type("float16", "float32")
    assert keras.backend.standardize_dtype(eager.dtype) == promoted
    assert keras.backend.standardize_dtype(symbolic.dtype) == promoted


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_flash_attention_true_takes_a_kernel_that_gives_the_reference(temperature):
    case = {**_padded_causal_case(), "is_causal": True, "temperature": temperature}
    actual = to_numpy(dot_product_attention(**case, flash_attention=True))
    expected, _ = reference_attention(**case)
    np.testing.assert_array_equal(actual[:, 1], 0.0)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        to_numpy(dot_product_attention(**case, flash_attention=False)),
        to_numpy(dot_product_attention(**case)),
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="unknown lengths need a graph")
def test_flash_attention_true_raises_naming_it_where_lengths_are_unknown():
    import tensorflow as tf

    spec = tf.TensorSpec((1, None, 1, 4))

    @tf.function(input_signature=[spec, spec])
    def attend(q, k):
        return dot_product_attention(q, k, k, flash_attention=True)

    with pytest.raises(ValueError, match="flash_attention=True"):
        attend.get_concrete_function()


@pytest.mark.skipif(BACKEND != "tensorflow", reason="unknown sizes need a graph")
@pytest.mark.parametrize("is_causal", [False, True])
def test_a_head_size_unknown_while_tracing_still_scales_by_its_root(is_causal):
    # The default scale, 1 / sqrt(head size), was 1.0 where the size was
    # unknown (a `tf.function` with an input signature).
    import tensorflow as tf

    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 5, 3, 16)).astype("float32") for _ in range(3))
    keep = rng.random((2, 1, 5, 5)) < 0.7
    spec = tf.TensorSpec((None, None, None, None))

    @tf.function(input_signature=[spec] * 3 + [tf.TensorSpec((None,) * 4, tf.bool)])
    def attend(q, k, v, keep):
        return dot_product_attention(q, k, v, mask=keep, is_causal=is_causal)

    expected, _ = reference_attention(q, k, v, mask=keep, is_causal=is_causal)
    actual = to_numpy(attend(q, k, v, keep))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def _spy_on_the_blocks():
    """A spy on the blocks' kernel: each call's first argument fixes its blocks."""
    from keras_softmax import _blockwise_attention

    return mock.patch.object(
        _blockwise_attention, "_rule", wraps=_blockwise_attention._rule
    )


def _blocks_of(spy):
    """The (query, key) block sizes of the spied kernel's only call."""
    assert spy.call_count == 1
    spec = spy.call_args.args[0]
    return spec.block_queries, spec.block_keys


def test_blocks_are_chosen_from_large_scores_at_their_default_sizes():
    from keras_softmax import _blockwise_attention

    # The threshold is a policy, not a block size: reached for real here.
    # (A temperature below 1 keeps eager PyTorch off its SDPA.)
    batch, length, heads = 1, 2048, 4
    assert batch * heads * length * length == _blockwise_attention.LARGE_SCORES
    below = np.ones((batch, length - 1, heads, 4), "float32")
    assert describe(below, temperature=0.7) == "explicit"
    rng = np.random.default_rng(8)
    q, k, v = (
        rng.normal(size=(batch, length, heads, 4)).astype("float32") for _ in range(3)
    )
    mask = rng.random((batch, 1, 1, length)) < 0.8
    mask[..., 0] = False  # causal: the first query keeps no key
    case = dict(mask=mask, is_causal=True, temperature=0.7)
    with _spy_on_the_blocks() as spy:
        chosen = to_numpy(dot_product_attention(q, k, v, **case))
    default = _blockwise_attention.default_block_sizes(batch, heads, length, length)
    assert _blocks_of(spy) == default == (512, 512)
    np.testing.assert_array_equal(chosen[0, 0], 0.0)
    # The first 640 queries (two blocks) attend to the first 640 keys only.
    n = 640
    expected, _ = reference_attention(
        q[:, :n], k[:, :n], v[:, :n], **{**case, "mask": mask[..., :n]}
    )
    allowed = output_tolerance(q[:, :n], k[:, :n], v[:, :n], temperature=0.7)
    assert np.all(np.abs(chosen[:, :n] - expected) <= allowed)


def test_the_blocks_change_results_by_rounding_only():
    rng = np.random.default_rng(8)
    q, k, v = (rng.normal(size=(2, 9, 2, 4)).astype("float32") for _ in range(3))
    mask = rng.random((2, 1, 1, 9)) < 0.8
    mask[1, 0, 0, :] = False
    case = dict(query=q, key=k, value=v, mask=mask, is_causal=True, temperature=0.7)
    with _spy_on_the_blocks() as spy:
        blocks = to_numpy(dot_product_attention(**case, **SMALL_BLOCKS))
        assert _blocks_of(spy) == SMALL  # 5 blocks of queries, and of keys
        full = to_numpy(dot_product_attention(**case, flash_attention=False))
        assert spy.call_count == 1
    np.testing.assert_array_equal(blocks[1], 0.0)
    allowed = output_tolerance(q, k, v, temperature=0.7)
    assert np.all(np.abs(blocks - full) <= 2 * allowed)


@pytest.mark.parametrize(
    "block_sizes, blocks",
    [
        (None, (16, 8)),  # the default: one block of each, padded
        (BlockSizes(1, 1), (1, 1)),
        (BlockSizes(2, 3), (2, 3)),
        ((4, 2), (4, 2)),  # any pair
        (BlockSizes(64, 5), (9, 5)),  # cut to the 9 queries
    ],
)
def test_block_sizes_set_the_blocks_and_keep_the_reference_result(block_sizes, blocks):
    rng = np.random.default_rng(10)
    q = rng.normal(size=(2, 9, 2, 4)).astype("float32")
    k, v = (rng.normal(size=(2, 7, 2, 4)).astype("float32") for _ in range(2))
    bias = rng.normal(size=(2, 1, 9, 7)).astype("float32")
    mask = rng.random((2, 1, 9, 7)) < 0.7
    mask[1, :, 6] = False
    case = dict(query=q, key=k, value=v, bias=bias, mask=mask, is_causal=True)
    case["temperature"] = 0.5
    with _spy_on_the_blocks() as spy:
        actual = to_numpy(
            dot_product_attention(**case, flash_attention=True, block_sizes=block_sizes)
        )
    assert _blocks_of(spy) == blocks
    expected, _ = reference_attention(**case)
    np.testing.assert_array_equal(actual[1, 6], 0.0)
    allowed = output_tolerance(q, k, v, bias, temperature=0.5)
    assert np.all(np.abs(actual - expected) <= allowed)
    # Where the blocks do not compute the call, the sizes change nothing.
    with _spy_on_the_blocks() as spy:
        full = dot_product_attention(**case, block_sizes=block_sizes)
    assert spy.call_count == 0
    np.testing.assert_array_equal(
        to_numpy(full), to_numpy(dot_product_attention(**case))
    )


@pytest.mark.parametrize(
    "block_sizes, message",
    [
        (
            (0, 2),
            "`block_sizes.query` must be a positive integer. "
            "Received: block_sizes.query=0",
        ),
        (
            BlockSizes(2, 1.5),
            "`block_sizes.key` must be a positive integer. "
            "Received: block_sizes.key=1.5",
        ),
        ((2, True), "Received: block_sizes.key=True"),
        (
            4,
            "`block_sizes` must be a `BlockSizes(query, key)` of positive "
            "integers, or None. Received: block_sizes=4",
        ),
        ((1, 2, 3), "Received: block_sizes=(1, 2, 3)"),
    ],
)
def test_bad_block_sizes_raise_a_value_error_naming_them(block_sizes, message):
    q = np.zeros((1, 3, 1, 4), "float32")
    with pytest.raises(ValueError, match=re.escape(message)):
        dot_product_attention(q, q, q, flash_attention=True, block_sizes=block_sizes)
    symbolic = keras.Input((3, 1, 4))  # checked when the model is built
    with pytest.raises(ValueError, match=re.escape(message)):
        dot_product_attention(symbolic, symbolic, symbolic, block_sizes=block_sizes)


def test_block_sizes_of_a_functional_model_save_and_reload(tmp_path):
    q = keras.Input((5, 2, 4))
    out = dot_product_attention(
        q, q, q, is_causal=True, temperature=0.5, **SMALL_BLOCKS
    )
    model = keras.Model(q, out)
    path = str(tmp_path / "blocks.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    x = np.random.default_rng(3).normal(size=(2, 5, 2, 4)).astype("float32")
    with _spy_on_the_blocks() as spy:
        actual = to_numpy(reloaded(x))
    assert _blocks_of(spy) == SMALL
    np.testing.assert_array_equal(actual, to_numpy(model(x)))
    expected, _ = reference_attention(x, x, x, is_causal=True, temperature=0.5)
    np.testing.assert_allclose(actual, expected, atol=1e-5)


@pytest.mark.skipif(BACKEND != "jax", reason="reads the traced program (jaxpr)")
def test_blocks_never_build_the_scores_forward_or_backward(monkeypatch):
    import jax

    # The blocks as a CPU takes them: on a GPU, Keras' flash kernel is tried
    # first, and its refused attempt would stay in the traced program.
    monkeypatch.setattr(_backend.edge(), "attention_device", lambda tensors: CPU)

    length, heads, size = 64, 2, 4
    q = np.ones((1, length, heads, size), "float32")
    mask = np.ones((1, 1, 1, length), bool)

    def loss(q):
        out = dot_product_attention(
            q,
            q,
            q,
            mask=mask,
            is_causal=True,
            flash_attention=True,
            block_sizes=BlockSizes(8, 8),
        )
        return keras.ops.sum(out)

    program = jax.make_jaxpr(jax.grad(loss))(q)
    sizes = []

    def walk(jaxpr):
        for equation in jaxpr.eqns:
            sizes.extend(int(np.prod(v.aval.shape)) for v in equation.outvars)
            for param in equation.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    if hasattr(sub, "jaxpr"):
                        walk(getattr(sub.jaxpr, "jaxpr", sub.jaxpr))

    walk(program.jaxpr)
    # The largest tensor is one block's scores or the inputs, never T * S.
    assert max(sizes) <= max(heads * 8 * 8, length * heads * size), max(sizes)
    assert length * length not in sizes and heads * length * length not in sizes


@pytest.mark.skipif(
    BACKEND != "torch" or PLATFORM != "cpu", reason="PyTorch's own, on a CPU"
)
def test_pytorch_sdpa_agrees_with_the_blocks_formula_and_zeroes_dead_queries():
    import torch

    from keras_softmax import _blockwise_attention
    from keras_softmax import attention

    rng = np.random.default_rng(9)
    # float32: in float64 the formula runs (PyTorch's kernel has no second
    # derivative, and float64 is where derivatives are checked).
    q, k, v = (
        torch.tensor(rng.normal(size=(2, 7, 2, 4)), dtype=torch.float32)
        for _ in range(3)
    )
    keep = torch.tensor(rng.random((2, 1, 7, 7)) < 0.7)
    keep[1, 0, 3] = False
    for is_causal in (False, True):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        folded = keep & torch.ones(7, 7, dtype=torch.bool).tril() if is_causal else keep
        # PyTorch's own kernel is what the package picks here.
        device = _backend.attention_device((*inputs, folded))
        assert _backend.cpu_sdpa_serves(device, "float32")
        native = attention._sdpa_attention(*inputs, folded, 0.5, False)
        (native * torch.arange(1.0, 5.0)).sum().backward()
        blocks_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        formula = _blockwise_attention.blockwise_attention(
            *blocks_inputs, None, keep, 0.5, None, is_causal, None, SMALL
        )
        (formula * torch.arange(1.0, 5.0)).sum().backward()
        np.testing.assert_array_equal(to_numpy(native)[1, 3], 0.0)
        np.testing.assert_allclose(to_numpy(native), to_numpy(formula), atol=1e-6)
        for ours, theirs in zip(blocks_inputs, inputs, strict=True):
            np.testing.assert_allclose(
                to_numpy(theirs.grad), to_numpy(ours.grad), rtol=1e-5, atol=1e-5
            )
        np.testing.assert_array_equal(to_numpy(inputs[0].grad)[1, 3], 0.0)


def _gpu_case(queries, keys, seed=11, padded=None, mask=None, bias=False):
    """float32 inputs of 2 sequences, 2 heads of 8; `padded`: a sequence
    whose every key is padding; `mask`: a random mask that leaves query 1 of
    sequence 0 no key; `bias`: a bias of shape `(B, 1, T, S)`."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, queries, 2, 8)).astype("float32")
    k, v = (rng.normal(size=(2, keys, 2, 8)).astype("float32") for _ in range(2))
    case = {"query": q, "key": k, "value": v}
    if padded is not None:
        keep = np.ones((2, 1, 1, keys), bool)
        keep[padded] = False
        keep[1 - padded, ..., keys - 1] = False  # and one padded key
        case["mask"] = keep
    if mask is not None:
        keep = rng.random((2, 2, queries, keys)) < 0.6
        keep[0, :, 1] = False
        case["mask"] = keep
    if bias:
        case["bias"] = rng.normal(size=(2, 1, queries, keys)).astype("float32")
    return case


# Calls that the device's fused kernel takes on a GPU, each with what tests
# it: the causal flag (square, nothing else), the causal mask folded (not
# square, or beside a mask or a bias), a sequence all padding, dead queries.
GPU_CASES = {
    "causal": dict(case=_gpu_case(5, 5), is_causal=True),
    "causal, more queries than keys": dict(case=_gpu_case(6, 4), is_causal=True),
    "causal, more keys than queries": dict(case=_gpu_case(4, 6), is_causal=True),
    "causal, a sequence all padding": dict(
        case=_gpu_case(6, 6, padded=1), is_causal=True
    ),
    "a mask and a bias, causal": dict(
        case=_gpu_case(4, 6, mask=True, bias=True), is_causal=True
    ),
    "a bias, causal, temperature 2": dict(
        case=_gpu_case(6, 6, bias=True), is_causal=True, temperature=2.0
    ),
}
# (Even lengths wherever there is a mask or a bias: JAX's cuDNN rule takes
# only those, `test_cudnn_never_gets_a_mask_of_odd_lengths`.)


def _never_a_mask_beside_the_causal_flag(monkeypatch):
    """Makes the GPU's kernel refuse a mask beside `is_causal=True`, as
    PyTorch's SDPA does on a GPU (not on a CPU), failing the test."""
    if BACKEND == "torch":
        import torch

        module, name = torch.nn.functional, "scaled_dot_product_attention"
    else:
        import jax

        module, name = jax.nn, "dot_product_attention"
    kernel = getattr(module, name)

    def checked(*args, **kwargs):
        masked = kwargs.get("attn_mask", kwargs.get("bias")) is not None
        assert not (masked and kwargs.get("is_causal")), "a mask beside is_causal"
        return kernel(*args, **kwargs)

    monkeypatch.setattr(module, name, checked)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="no fused kernel of its own")
@pytest.mark.parametrize("name", GPU_CASES)
def test_on_a_gpu_the_default_path_takes_its_kernel_and_gives_the_reference(
    monkeypatch, name
):
    taken = as_on_a_gpu(monkeypatch)
    _never_a_mask_beside_the_causal_flag(monkeypatch)
    arguments = GPU_CASES[name]
    case, is_causal = arguments["case"], arguments["is_causal"]
    temperature = arguments.get("temperature", 1.0)
    actual = to_numpy(
        dot_product_attention(**case, is_causal=is_causal, temperature=temperature)
    )
    assert taken == [GPU_KERNEL]
    expected, _ = reference_attention(
        **case, is_causal=is_causal, temperature=temperature
    )
    q, k = case["query"], case["key"]
    live = live_queries(case.get("mask"), is_causal, q.shape[:3] + (k.shape[1],))
    np.testing.assert_array_equal(actual[~live], 0.0)
    allowed = output_tolerance(
        q, k, case["value"], case.get("bias"), temperature=temperature
    )
    error = np.abs(actual - expected)
    assert np.all(error <= allowed), f"error {error.max():.3g} > allowed"


@pytest.mark.skipif(BACKEND == "tensorflow", reason="no fused kernel of its own")
def test_on_a_gpu_a_sequence_all_padding_has_gradients_of_exactly_zero(monkeypatch):
    taken = as_on_a_gpu(monkeypatch)
    case = _gpu_case(4, 4, padded=0)
    tensors = [case.pop(name) for name in ("query", "key", "value")]
    shapes = [t.shape for t in tensors]
    sizes = [t.size for t in tensors]
    x0 = np.concatenate([t.ravel() for t in tensors]).astype(np.float64)

    def split(x, reshape):
        starts = np.cumsum([0, *sizes])
        return [
            reshape(x[a:b], shape)
            for a, b, shape in zip(starts[:-1], starts[1:], shapes, strict=True)
        ]

    def ours(x):
        parts = [keras.ops.cast(p, "float32") for p in split(x, keras.ops.reshape)]
        return dot_product_attention(*parts, **case, is_causal=True)

    def reference(x):
        return reference_attention(*split(x, np.reshape), **case, is_causal=True)[0]

    actual = jacobian(ours, x0)
    assert set(taken) == {GPU_KERNEL}
    assert np.all(np.isfinite(actual))
    # Sequence 0 is all padding: its outputs depend on nothing, and nothing
    # depends on its queries, keys and values.
    outputs = np.zeros((2, 4, 2, 8), bool)
    outputs[0] = True
    np.testing.assert_array_equal(actual[outputs.ravel()], 0.0)
    inputs = np.concatenate([np.eye(2, dtype=bool)[0].repeat(s // 2) for s in sizes])
    np.testing.assert_array_equal(actual[:, inputs], 0.0)
    expected = numerical_jacobian(reference, x0)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's SDPA kernels")
@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "a mask"])
def test_sdpa_on_a_gpu_never_takes_cudnn_with_a_mask(monkeypatch, masked):
    # cuDNN's backward gives NaN query gradients with a mask where
    # S % 128 == 64 (pytorch/pytorch#196678, from PyTorch 2.11).
    import torch
    from torch.nn import attention as torch_attention

    allowed, sdpa_kernel = [], torch_attention.sdpa_kernel

    def recorded(backends):
        allowed.extend(backends)
        return sdpa_kernel(backends)

    monkeypatch.setattr(torch_attention, "sdpa_kernel", recorded)
    case = _gpu_case(6, 6, padded=1 if masked else None)
    q, k, v = (torch.tensor(case[name]) for name in ("query", "key", "value"))
    keep = torch.tensor(case["mask"]) if masked else None
    out = attention._sdpa_gpu_attention(q, k, v, None, keep, 8**-0.5, False)
    assert out is not None
    cudnn = torch.nn.attention.SDPBackend.CUDNN_ATTENTION
    assert (cudnn in allowed) == (not masked), allowed


@pytest.mark.skipif(BACKEND == "tensorflow", reason="no fused kernel of its own")
def test_where_the_gpu_kernel_refuses_a_call_the_next_path_gives_the_reference(
    monkeypatch,
):
    taken = as_on_a_gpu(monkeypatch, refuse=True)
    case = _gpu_case(6, 6, padded=1)
    actual = to_numpy(dot_product_attention(**case, is_causal=True))
    assert taken == [GPU_KERNEL, "keras_fused"]
    expected, _ = reference_attention(**case, is_causal=True)
    np.testing.assert_array_equal(actual[1], 0.0)
    allowed = output_tolerance(case["query"], case["key"], case["value"])
    assert np.all(np.abs(actual - expected) <= allowed)


def test_a_functional_model_of_dot_product_attention_saves_and_reloads(tmp_path):
    q = keras.Input((5, 2, 4))
    mask = keras.Input((1, 1, 5), dtype="bool")
    out = dot_product_attention(q, q, q, mask=mask, is_causal=True, temperature=2.0)
    model = keras.Model([q, mask], out)
    path = str(tmp_path / "attention.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 2, 4)).astype("float32")
    keep = np.ones((2, 1, 1, 5), bool)
    keep[1, ..., 0] = False  # the first query of the second sequence: no key
    expected = to_numpy(model([x, keep]))
    np.testing.assert_array_equal(to_numpy(reloaded([x, keep])), expected)
    np.testing.assert_array_equal(expected[1, 0], 0.0)
    reference, _ = reference_attention(
        x, x, x, mask=keep, is_causal=True, temperature=2.0
    )
    np.testing.assert_allclose(expected, reference, atol=1e-5)


def test_a_functional_model_needs_a_number_for_the_temperature():
    q = keras.Input((5, 2, 4))
    with pytest.raises(ValueError, match="temperature"):
        dot_product_attention(q, q, q, temperature=keras.ops.ones(()))


@pytest.mark.parametrize("flash_attention", [None, True, False])
@pytest.mark.parametrize(
    "query_shape, key_length",
    [((0, 3, 2, 4), 3), ((2, 0, 2, 4), 3), ((2, 3, 2, 4), 0), ((2, 3, 0, 4), 3)],
)
def test_zero_sizes_give_zeros_of_the_output_shape(
    query_shape, key_length, flash_attention
):
    q = np.ones(query_shape, "float32")
    kv = np.ones((query_shape[0], key_length, query_shape[2], 5), "float32")
    k = np.ones(kv.shape[:-1] + (4,), "float32")
    out = dot_product_attention(q, k, kv, flash_attention=flash_attention)
    assert tuple(out.shape) == query_shape[:-1] + (5,)
    assert to_numpy(out).size == 0 or not to_numpy(out).any()


def test_heads_of_size_zero_and_no_scale_average_the_values():
    q = np.ones((1, 2, 1, 0), "float32")
    v = np.arange(6, dtype="float32").reshape(1, 3, 1, 2)
    out = to_numpy(dot_product_attention(q, np.ones((1, 3, 1, 0), "float32"), v))
    np.testing.assert_allclose(out[0, :, 0], [[2.0, 3.0]] * 2, rtol=1e-6)


def test_the_choice_of_path_is_one_decision_named_by_its_kernel():
    # On a CPU (tests/test_paths.py asks it of a GPU).
    short = np.ones((1, 8, 2, 4), "float32")
    mask = np.ones((1, 1, 8, 8), bool)
    eager_sdpa = BACKEND == "torch"  # PyTorch's own attention on a CPU
    assert describe(short, mask) == ("sdpa" if eager_sdpa else "keras_fused")
    assert describe(short, mask, flash=False) == "keras_fused"
    assert describe(short, mask, temperature=0.5) == "explicit"
    assert describe(short, weights=True) == "explicit"
    # No fused flash kernel on a CPU: the blocks.
    assert describe(short, mask, flash=True, temperature=0.5) == "blocks"
    long = np.ones((1, 2048, 4, 4), "float32")  # 4 * 2048**2 = 2**24 scores
    assert describe(long, temperature=0.5) == "blocks"
    with pytest.raises(ValueError, match="flash_attention=True"):
        describe(short, flash=True, weights=True)
