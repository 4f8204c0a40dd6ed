"""Which path runs where, and that every path is exact and differentiable.

Where ops run one kernel at a time (TensorFlow eagerly and in a
`tf.function` without XLA, PyTorch eagerly), ordinary logits take the
backend's fused kernel and special slices the exact formula; where a
compiler fuses the formula itself (XLA, `jax.jit`, `torch.compile`), the
exact formula alone runs. Gradients match central differences on each.
(Every other derivative mode: tests/test_derivatives.py.)
"""

import textwrap

import keras
import numpy as np
import pytest
from support.backends import BACKEND
from support.backends import compiled
from support.backends import gradient
from support.backends import traced
from support.fresh_process import check_python
from support.paths import CPU
from support.paths import GPU
from support.paths import GPU_KERNEL
from support.paths import describe
from support.paths import ones
from support.references import numerical_jacobian
from support.references import to_numpy

from keras_softmax import _backend
from keras_softmax import attention
from keras_softmax import softmax as core
from keras_softmax import stable_log_softmax
from keras_softmax import stable_softmax
from keras_softmax._backend import AttentionDevice


def eager(fn):
    return fn


# The ways a user's call runs: as is, traced without compiling (TensorFlow),
# and compiled.
MODES = [eager, compiled] + ([traced] if BACKEND == "tensorflow" else [])
# Those that run the fused kernel.
FUSED_MODES = {"tensorflow": [eager, traced], "torch": [eager], "jax": []}[BACKEND]


@pytest.mark.parametrize("mode", FUSED_MODES or [eager], ids=lambda m: m.__name__)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_ordinary_logits_take_the_fused_kernel_special_slices_the_formula(
    monkeypatch, mode, log, masked
):
    if not FUSED_MODES:
        # JAX compiles every call, eager ones op by op: the formula alone.
        assert not _backend.takes_fused_path(keras.ops.zeros((2, 3)))
        return

    # The formula, marked: it answers 7 wherever it runs.
    def marked(x, *args, **kwargs):
        return core._Result(keras.ops.ones_like(x) * 7, None)

    monkeypatch.setattr(core, "_exact", marked)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(8, 33)) * 7).astype("float32")
    mask = rng.random(x.shape) > 0.3 if masked else None
    fn = mode(lambda v: (stable_log_softmax if log else stable_softmax)(v, mask=mask))
    ordinary = to_numpy(fn(keras.ops.convert_to_tensor(x)))
    assert not np.any(ordinary == 7)
    if not masked:
        native = keras.ops.log_softmax if log else keras.ops.softmax
        np.testing.assert_array_equal(ordinary, to_numpy(native(x)))
    special = x.copy()
    special[0, 3] = np.nan
    np.testing.assert_array_equal(to_numpy(fn(keras.ops.convert_to_tensor(special))), 7)


def test_compilers_take_the_formula_alone():
    seen = []

    def probe(x):
        seen.append(_backend.takes_fused_path(x))
        return stable_softmax(x)

    compiled(probe)(keras.ops.convert_to_tensor(np.zeros((2, 3), "float32")))
    assert seen and not any(seen)


def test_eager_calls_on_small_and_large_inputs_agree_bit_for_bit():
    # Large inputs run eagerly as a cached graph (on TensorFlow), small
    # ones op by op: the same kernels either way.
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(4, 1 << 15)) * 5).astype("float32")
    mask = rng.random(x.shape) > 0.3
    whole = to_numpy(stable_softmax(x, mask=mask, temperature=0.7))
    rows = [
        to_numpy(stable_softmax(x[i : i + 1], mask=mask[i : i + 1], temperature=0.7))
        for i in range(4)
    ]
    np.testing.assert_array_equal(whole, np.concatenate(rows))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="only TensorFlow traces eagerly")
def test_a_loop_over_varying_large_shapes_traces_each_graph_at_most_twice():
    import logging

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        for rows in range(3, 12):
            x = np.ones((rows, 1 << 14), "float32")
            stable_softmax(x)
            stable_softmax(x, mask=x > 0, temperature=0.5)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in messages if "retracing" in m]
    counts = [g.experimental_get_tracing_count() for g in core._fused.graphs.values()]
    assert counts and max(counts) <= 2


def _numerical_gradient(fn, x):
    """Central differences of sum(fn(x) * w) for weights w = 1, 2, ...; finite only."""
    out = to_numpy(fn(x)).ravel()
    finite = np.isfinite(out)
    weights = np.where(finite, np.arange(1, out.size + 1), 0.0)
    rows = np.where(finite[:, None], numerical_jacobian(fn, x), 0.0)
    return (weights @ rows).reshape(np.shape(x))


GRADIENT_CASES = {
    "plain": dict(),
    "masked, T = 0.5": dict(
        mask=np.array([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]], bool),
        temperature=0.5,
    ),
    "joint axes": dict(axis=(0, 1), temperature=3.0),
    "per-row T": dict(temperature=np.array([[0.5], [1.0], [2.0]])),
}


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("case", GRADIENT_CASES, ids=str)
def test_gradients_match_central_differences_on_every_path(mode, log, case):
    x = np.random.default_rng(2).normal(size=(3, 4)) * 2
    kwargs = GRADIENT_CASES[case]
    fn = stable_log_softmax if log else stable_softmax
    call = mode(lambda v: fn(v, **kwargs))
    analytic = gradient(call, x)
    assert np.all(np.isfinite(analytic))
    np.testing.assert_allclose(
        analytic, _numerical_gradient(call, x), atol=1e-7, rtol=1e-6
    )


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("log", [False, True])
def test_temperature_gradient_is_finite_and_exact_beside_minus_inf_logits(mode, log):
    x = np.array([[0.5, -np.inf, 2.0, 0.0], [1.0, 2.0, -1.0, 0.5]])
    mask = np.array([[1, 1, 1, 1], [1, 0, 1, 1]], bool)
    fn = stable_log_softmax if log else stable_softmax
    t0 = np.array([[0.8], [1.7]])

    loss_of_t = mode(lambda t: fn(x, mask=mask, temperature=t))
    analytic = gradient(loss_of_t, t0)
    assert np.all(np.isfinite(analytic))
    np.testing.assert_allclose(
        analytic, _numerical_gradient(loss_of_t, t0), atol=1e-7, rtol=1e-6
    )


def test_log_softmax_needs_at_most_one_output_of_extra_memory():
    # Peak resident memory of one call on a 256 MB input, in a fresh process
    # so that nothing else has raised the peak; the backend's own random
    # generator makes the input without a NumPy copy beside it.
    code = """
        import resource, keras
        import keras_softmax
        from keras_softmax import stable_log_softmax
        shape = (256, 262144)
        backend = keras.backend.backend()
        if backend == "tensorflow":
            import tensorflow as tf
            x = tf.random.normal(shape)
            fn = tf.function(stable_log_softmax)
        elif backend == "jax":
            import jax
            x = jax.random.normal(jax.random.key(0), shape)
            fn = jax.jit(stable_log_softmax)
        else:
            import torch
            x = torch.randn(shape)
            fn = stable_log_softmax
        small = keras.ops.zeros((2, 262144))
        keras.ops.convert_to_numpy(fn(small))  # trace and warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fn(x)
        float(keras.ops.convert_to_numpy(out[0, 0]))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024 / (256 * 262144 * 4))
    """
    extra = float(check_python("-c", textwrap.dedent(code)).split()[-1])
    # The output itself is one input's worth.
    assert extra <= 1.1, extra


# Attention's choice of path: `attention.choose_path`, the one decision,
# asked on this CPU for a described device. Each case is a call and the
# path it takes on a GPU on each backend: the device's own fused kernel
# (`GPU_KERNEL`: cuDNN on JAX, SDPA's fused kernels on PyTorch; TensorFlow
# has none) wherever it gives our result, else the choice a CPU makes.
LONG = (1, 2048, 4, 8)  # 4 * 2048**2 = 2**24 scores: the blocks' threshold
SHORT = (1, 8, 2, 8)
OLD_GPU = AttentionDevice("gpu", compute_capability=(7, 5))  # before Ampere
TRACED_GPU = GPU._replace(eager=False)  # a PyTorch trace, `torch.func`
K = GPU_KERNEL
ALL = ("jax", "torch", "tensorflow")
ON_A_GPU = {
    # case: (describe's arguments, {backend: path}); bfloat16 and LONG
    # unless they say otherwise.
    "no mask": ({}, {"jax": K, "torch": K, "tensorflow": "blocks"}),
    "short, no mask": (
        {"shape": SHORT},
        {"jax": K, "torch": K, "tensorflow": "explicit"},
    ),
    "key padding": (
        {"mask": np.ones((1, 1, 1, 2048), bool)},
        {"jax": K, "torch": K, "tensorflow": "blocks"},
    ),
    "any mask": (
        {"mask": np.ones((1, 4, 2048, 2048), bool)},
        {"jax": K, "torch": K, "tensorflow": "blocks"},
    ),
    "more queries than keys": (
        {"shape": (1, 4096, 4, 8), "key_length": 2048},
        {"jax": K, "torch": K, "tensorflow": "blocks"},
    ),
    "bfloat16 bias": (
        {"bias": ("bfloat16", (1, 1, 2048, 2048))},
        {"jax": K, "torch": K, "tensorflow": "blocks"},
    ),
    "float32 bias": (  # which the kernel would round to bfloat16
        {"bias": ("float32", (1, 1, 2048, 2048))},
        {"jax": "blocks", "torch": "blocks", "tensorflow": "blocks"},
    ),
    "soft cap": ({"soft_cap": 30.0}, dict.fromkeys(ALL, "blocks")),
    "temperature 0.5": ({"temperature": 0.5}, dict.fromkeys(ALL, "blocks")),
    "temperature in a tensor": (
        {"temperature": "tensor"},
        dict.fromkeys(ALL, "blocks"),
    ),
    "temperature 2, folded": (
        {"temperature": 2.0},
        {"jax": K, "torch": K, "tensorflow": "blocks"},
    ),
    "float32": (  # no cuDNN kernel for float32
        {"dtype": "float32"},
        {"jax": "blocks", "torch": K, "tensorflow": "blocks"},
    ),
    "float32, short": (
        {"dtype": "float32", "shape": SHORT},
        {"jax": "keras_fused", "torch": K, "tensorflow": "keras_fused"},
    ),
    "float64": ({"dtype": "float64"}, dict.fromkeys(ALL, "blocks")),
    "float16": ({"dtype": "float16"}, {"jax": K, "torch": K, "tensorflow": "blocks"}),
    "float16, key padding": (  # the fill, -65504, is not exact in a kernel
        {"dtype": "float16", "mask": np.ones((1, 1, 1, 2048), bool)},
        dict.fromkeys(ALL, "blocks"),
    ),
    "short, a mask of even lengths": (
        {"shape": SHORT, "mask": np.ones((1, 1, 8, 8), bool)},
        {"jax": K, "torch": K, "tensorflow": "explicit"},
    ),
    "short, a mask of odd lengths": (  # which JAX's cuDNN rule refuses
        {"shape": (1, 7, 2, 8), "mask": np.ones((1, 1, 7, 7), bool)},
        {"jax": "explicit", "torch": K, "tensorflow": "explicit"},
    ),
    "short, head size 12": (  # Keras' XLA attention rounds half weights
        {"shape": (1, 8, 2, 12)},
        {"jax": "explicit", "torch": K, "tensorflow": "explicit"},
    ),
    "head size 12": (  # cuDNN's are multiples of 8
        {"shape": (1, 2048, 4, 12)},
        {"jax": "blocks", "torch": K, "tensorflow": "blocks"},
    ),
    "flash_attention=False": (  # Keras' other attention rounds half weights
        {"flash": False},
        dict.fromkeys(ALL, "explicit"),
    ),
    "flash_attention=False, float32": (
        {"flash": False, "dtype": "float32"},
        {"jax": "keras_fused", "torch": "keras_fused", "tensorflow": "keras_fused"},
    ),
    "flash_attention=True": (
        {"flash": True},
        {"jax": K, "torch": K, "tensorflow": "blocks"},
    ),
    "flash_attention=True, float32": (
        {"flash": True, "dtype": "float32"},
        {"jax": "keras_flash", "torch": K, "tensorflow": "blocks"},
    ),
    "returned weights": ({"weights": True}, dict.fromkeys(ALL, "explicit")),
    "the kernel refused the call": (
        {"refused": (K,)},
        dict.fromkeys(ALL, "blocks"),
    ),
    "flash_attention=True, the kernel refused": (
        {"flash": True, "refused": (K,)},
        {"jax": "keras_flash", "torch": "keras_flash", "tensorflow": "blocks"},
    ),
    "a GPU before Ampere": (
        {"device": OLD_GPU},
        {"jax": "blocks", "torch": K, "tensorflow": "blocks"},
    ),
    "traced": (
        {"device": TRACED_GPU},
        {"jax": K, "torch": "blocks", "tensorflow": "blocks"},
    ),
    "on a CPU": (
        {"device": CPU},
        {"jax": "blocks", "torch": "sdpa", "tensorflow": "blocks"},
    ),
    "on a CPU, float32, short": (
        {"device": CPU, "dtype": "float32", "shape": SHORT},
        {"jax": "keras_fused", "torch": "sdpa", "tensorflow": "keras_fused"},
    ),
}


@pytest.mark.parametrize("case", ON_A_GPU, ids=str)
def test_the_choice_of_attention_path_on_a_gpu(case):
    arguments, paths = ON_A_GPU[case]
    arguments = {"device": GPU, **arguments}
    dtype = arguments.pop("dtype", "bfloat16")
    query = ones(arguments.pop("shape", LONG), dtype)
    if keras.backend.standardize_dtype(query.dtype) != dtype:
        pytest.skip(f"no {dtype} here")
    if "bias" in arguments:
        bias_dtype, shape = arguments["bias"]
        arguments["bias"] = ones(shape, bias_dtype)
    if arguments.get("temperature") == "tensor":
        arguments["temperature"] = keras.ops.convert_to_tensor(2.0)
    if BACKEND == "tensorflow" and "refused" in arguments:
        pytest.skip("TensorFlow has no kernel of its own to refuse a call")
    assert describe(query, **arguments) == paths[BACKEND]


def test_flash_attention_true_raises_naming_it_where_nothing_can_run_on_a_gpu():
    with pytest.raises(ValueError, match=r"flash_attention=True"):
        describe(ones(SHORT, "bfloat16"), flash=True, weights=True, device=GPU)


def _folded(path, keep=None, bias=None, queries=4, keys=4):
    """`_fold_causal`'s answer for a causal call: `(mask or None, flag)`."""
    query = ones((1, queries, 1, 8))
    key = ones((1, keys, 1, 8))
    keep = None if keep is None else keras.ops.convert_to_tensor(keep)
    bias = None if bias is None else ones((1, 1, queries, keys))
    mask, flag = attention._fold_causal(path, query, key, bias, keep, True)
    return (None if mask is None else to_numpy(mask)), flag


KERNELS = ["cudnn", "sdpa_gpu", "keras_flash", "sdpa", "keras_fused", "explicit"]


@pytest.mark.parametrize("path", KERNELS)
def test_a_kernel_takes_the_causal_flag_only_alone_and_square(path):
    # PyTorch's SDPA refuses a mask beside `is_causal=True` on a GPU, and
    # kernels align a non-square causal mask differently (ours: top left).
    keep = np.array([True, False, True, True]).reshape(1, 1, 1, 4)
    cases = {
        "alone": dict(),
        "with a mask": dict(keep=keep),
        "with a bias": dict(bias=True),
        "more queries": dict(queries=6),
        "more keys": dict(keys=6),
    }
    for name, arguments in cases.items():
        mask, flag = _folded(path, **arguments)
        if name == "alone" and path in attention._NATIVE_CAUSAL:
            assert mask is None and flag
            continue
        assert not flag, name
        queries, keys = arguments.get("queries", 4), arguments.get("keys", 4)
        expected = np.tril(np.ones((queries, keys), bool)) & arguments.get("keep", True)
        np.testing.assert_array_equal(mask, np.broadcast_to(expected, mask.shape))
    q = ones((1, 4, 1, 8))
    assert attention._fold_causal(path, q, q, None, None, False) == (None, False)
