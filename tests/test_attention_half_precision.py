"""`dot_product_attention` on half-precision inputs: computed in float32.

bfloat16 and float16 inputs are computed with float32 scores, a float32
softmax and a float32 weighted sum, and a bias is added in its own
precision (issue 27), on every path a CPU may take. Each output is checked
against float64: within twice the error of the same attention computed in
float32 by NumPy (the inputs cast, every step in float32), plus the
rounding of the output to the inputs' dtype.
"""

import keras
import numpy as np
import pytest
from support.backends import BACKEND
from support.backends import PLATFORM
from support.paths import GPU
from support.paths import GPU_KERNEL
from support.paths import as_on_a_gpu
from support.paths import describe
from support.paths import ones
from support.paths import paths_taken
from support.paths import record_paths
from support.references import attention as reference_attention
from support.references import to_numpy

from keras_softmax import _temperature
from keras_softmax import attention
from keras_softmax import dot_product_attention
from keras_softmax._backend import AttentionDevice
from keras_softmax.attention import BlockSizes

# Half of a unit in the last place, relative: what rounding to each dtype
# may change a number by; below its normal numbers, at most half its
# smallest subnormal.
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
SUBNORMAL_ROUNDOFF = {"bfloat16": 2.0**-134, "float16": 2.0**-25}
HALF = list(UNIT_ROUNDOFF)

# The public arguments that take each path a CPU may run (which path runs
# also depends on the backend and the call; `record_paths` records it):
# - "chosen": as called (PyTorch's SDPA eagerly without a bias, else
#   Keras' fused attention, or the explicit path where it cannot keep the
#   precision);
# - "no_flash": `flash_attention=False`, neither SDPA nor the blocks;
# - "blocks": `flash_attention=True`, with several blocks (on eager
#   PyTorch without a bias, its SDPA);
# - "tempered": a temperature below 1, the explicit path (`stable_softmax`);
# - "weights": returned weights, the explicit path with Keras' formula
#   (`StableMultiHeadAttention(return_attention_scores=True)`'s call).
ROUTES = ["chosen", "no_flash", "blocks", "tempered", "weights"]


def _half(x, dtype):
    """`x` rounded to `dtype`, as float64 (exact) and as a tensor."""
    tensor = keras.ops.cast(keras.ops.convert_to_tensor(np.float32(x)), dtype)
    return to_numpy(keras.ops.cast(tensor, "float32")).astype(np.float64), tensor


def _float32_attention(query, key, value, bias=None, mask=None, temperature=1.0):
    """Attention with every step in float32: the inputs cast, as promised."""
    q, k, v = (np.asarray(t, np.float32) for t in (query, key, value))
    scale = np.float32(1.0 / np.sqrt(q.shape[-1]))
    scores = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        scores = scores + np.asarray(bias, np.float32)
    scores = scores / np.float32(temperature)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    exp = np.exp(scores - scores.max(-1, keepdims=True))
    weights = exp / exp.sum(-1, keepdims=True)
    assert weights.dtype == np.float32
    return np.einsum("bnts,bsnh->btnh", weights, v)


def _attend(route, tensors, bias, mask, lengths):
    """Our attention of half-precision `tensors` by `route`, as float64."""
    query, key, value = tensors
    if route == "weights":
        keep = None if mask is None else keras.ops.convert_to_tensor(mask)
        bias = None if bias is None else keras.ops.convert_to_tensor(bias)
        outputs, weights = attention.attend(
            query,
            key,
            value,
            bias,
            keep,
            1.0 / np.sqrt(query.shape[-1]),
            _temperature.Temperature(1.0),
            return_weights=True,
        )
        assert keras.backend.standardize_dtype(
            weights.dtype
        ) == keras.backend.standardize_dtype(value.dtype)
    else:
        arguments = {
            "chosen": {},
            "no_flash": {"flash_attention": False},
            # Two blocks of queries and two of keys.
            "blocks": {
                "flash_attention": True,
                "block_sizes": BlockSizes(*(-(-n // 2) for n in lengths)),
            },
            "tempered": {"temperature": 0.5},
        }[route]
        outputs = dot_product_attention(
            query, key, value, bias=bias, mask=mask, **arguments
        )
    dtype = keras.backend.standardize_dtype(outputs.dtype)
    assert dtype == keras.backend.standardize_dtype(value.dtype)
    return to_numpy(keras.ops.cast(outputs, "float32")).astype(np.float64)


# The fused kernels of a GPU, which round the softmax's weights to the
# inputs' dtype before the weighted sum (docs/api/attention.md).
GPU_KERNELS = ("cudnn", "sdpa_gpu", "keras_flash")


def _allowed(dtype, exact, rounded_weights=False, **case):
    """Twice float32's largest error, plus the output's rounding to `dtype`;
    with `rounded_weights`, plus `u * sum_s p_s |v_s|`.

    Ours in float32 within `e` of float64 (twice NumPy's error in float32),
    then rounded to `dtype`, is within `e + u (|expected| + e)`.
    """
    expected, weights = reference_attention(*exact, **case)
    float32_error = np.abs(_float32_attention(*exact, **case) - expected).max()
    error = 2 * float32_error
    if rounded_weights:
        spread = np.einsum("bnts,bsnh->btnh", weights, np.abs(exact[2]))
        error = error + UNIT_ROUNDOFF[dtype] * spread
    rounding = UNIT_ROUNDOFF[dtype] * (np.abs(expected) + error)
    return expected, error + rounding + SUBNORMAL_ROUNDOFF[dtype]


def _check(route, dtype, inputs, bias=None, mask=None):
    """Ours within twice float32's error plus the output's rounding (and
    the weights' rounding, on a GPU's fused kernel)."""
    exact, tensors = zip(*(_half(x, dtype) for x in inputs), strict=True)
    temperature = 0.5 if route == "tempered" else 1.0
    case = dict(bias=bias, mask=mask, temperature=temperature)
    lengths = (inputs[0].shape[1], inputs[1].shape[1])
    with paths_taken() as taken:
        actual = _attend(route, tensors, bias, mask, lengths)
    rounded = any(path in GPU_KERNELS for path in taken)
    expected, allowed = _allowed(dtype, exact, rounded_weights=rounded, **case)
    error = np.abs(actual - expected)
    worst = np.unravel_index(np.argmax(error / allowed), error.shape)
    assert np.all(error <= allowed), (
        f"error {error[worst]:.3g} > allowed {allowed[worst]:.3g} at {worst}: "
        f"ours {actual[worst]!r}, float64 {expected[worst]!r}"
    )


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", HALF)
def test_a_float32_bias_is_added_in_float32(dtype, route):
    # Biases that bfloat16 rounds by up to 0.1 (float16 by up to 0.0125):
    # enough to move each weight by as much, were they rounded (an output
    # of 0.0986 for 0.0844 in the issue).
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(1, 4, 1, 8)) for _ in range(3)]
    bias = np.array([-50.3, -50.1, -50.2, -50.4], np.float32).reshape(1, 1, 1, 4)
    _check(route, dtype, inputs, bias=bias)


def _alibi(heads, queries, keys):
    """ALiBi's bias, `-slope * |t - s|` per head, in float32."""
    slopes = 2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)
    distance = np.abs(np.arange(queries)[:, None] - np.arange(keys)[None, :])
    return (-slopes[:, None, None] * distance)[None].astype(np.float32)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", HALF)
def test_an_alibi_bias_with_padding_is_added_in_float32(dtype, route):
    # Six heads: slopes that are not powers of two, so that the bias (up to
    # 40 in size) has more bits than a half-precision number holds.
    rng = np.random.default_rng(1)
    heads, queries, keys = 6, 64, 32
    inputs = [
        rng.normal(size=(1, length, heads, 8)) for length in (queries, keys, keys)
    ]
    mask = np.ones((1, 1, 1, keys), bool)
    mask[..., -5:] = False  # padding
    _check(route, dtype, inputs, bias=_alibi(heads, queries, keys), mask=mask)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", HALF)
def test_scores_and_the_weighted_sum_are_computed_in_float32(monkeypatch, dtype, route):
    # Eight queries against 16 keys, no bias: Keras' TensorFlow attention
    # computed the scores and the weighted sum in float16 here (an error of
    # 8.0e-4, where float32 rounded to float16 errs 2.0e-4), and PyTorch's
    # SDPA rounds the weights to half precision on a CPU.
    seen = record_paths(monkeypatch)
    rng = np.random.default_rng(2)
    inputs = [rng.normal(size=(1, length, 1, 16)) for length in (8, 16, 16)]
    _check(route, dtype, inputs)
    if BACKEND == "torch" and route in ("chosen", "blocks"):
        # Eager, without a bias: SDPA, on a CPU on float32 copies, on a GPU
        # its fused kernels, which accumulate in float32.
        assert seen == ["sdpa" if PLATFORM == "cpu" else "sdpa_gpu"]


@pytest.mark.skipif(BACKEND != "torch", reason="SDPA's kernels run on a CPU")
@pytest.mark.parametrize("dtype", HALF)
def test_a_gpu_kernel_is_within_the_weights_rounding(monkeypatch, dtype):
    # As on a GPU: SDPA, which rounds the weights to half precision before
    # the weighted sum (here its CPU kernel, standing in for the GPU's).
    taken = as_on_a_gpu(monkeypatch)
    rng = np.random.default_rng(2)
    inputs = [rng.normal(size=(1, length, 1, 16)) for length in (8, 16, 16)]
    _check("chosen", dtype, inputs)
    assert taken == ["sdpa_gpu"]


@pytest.mark.parametrize("dtype", HALF)
def test_a_half_precision_bias_is_taken_as_given(dtype):
    # The bias is not rounded further (float16 to bfloat16, say) on the way.
    other = {"bfloat16": "float16", "float16": "bfloat16"}[dtype]
    rng = np.random.default_rng(3)
    inputs = [rng.normal(size=(1, 4, 2, 8)) for _ in range(3)]
    exact_bias, bias = _half(rng.normal(size=(1, 2, 4, 4)) * 20, other)
    exact, tensors = zip(*(_half(x, dtype) for x in inputs), strict=True)
    expected, allowed = _allowed(dtype, exact, bias=exact_bias)
    for arguments in ({}, {"flash_attention": False}, {"flash_attention": True}):
        actual = dot_product_attention(*tensors, bias=bias, **arguments)
        error = np.abs(to_numpy(keras.ops.cast(actual, "float32")) - expected)
        assert np.all(error <= allowed), (arguments, error.max())


# A GPU where the device's own kernel does not serve, and Keras' may.
KERAS_ONLY_GPU = {
    "jax": AttentionDevice("gpu"),  # no compute capability: no cuDNN
    "torch": GPU._replace(eager=False),  # traced: no SDPA of ours
}.get(BACKEND, GPU)


@pytest.mark.parametrize("own", [True, False], ids=["own kernel", "Keras' kernel"])
@pytest.mark.parametrize(
    "flash, kernel, instead",
    [(True, "keras_flash", "blocks"), (None, "keras_fused", "explicit")],
)
def test_a_gpu_kernel_never_rounds_a_wider_bias(flash, kernel, instead, own):
    # On a GPU the fused kernels (the device's own and Keras' flash kernel)
    # take half-precision inputs as they are, and cast the bias to their
    # dtype: a float32 bias takes a path that keeps it. (Keras' other
    # attention rounds the weights to half precision, XLA's on a GPU too,
    # and TensorFlow's is half precision anywhere: never taken for half
    # inputs.)
    if own and GPU_KERNEL:
        kernel = GPU_KERNEL
    if BACKEND == "tensorflow" or kernel == "keras_fused":
        kernel = instead
    query = ones((1, 8, 2, 8), "bfloat16")

    def path(bias_dtype):
        bias = ones((1, 1, 8, 8), bias_dtype)
        device = GPU if own else KERAS_ONLY_GPU
        return describe(query, bias=bias, flash=flash, device=device)

    assert path("bfloat16") == kernel
    assert path("float32") == instead
