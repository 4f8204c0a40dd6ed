"""The large-vocabulary cross-entropy: exact, Keras' reductions, bounded memory.

Its derivatives in the inputs, kernel, bias and temperature are checked by
every reverse-mode transform in tests/test_derivatives.py.
"""

import pathlib
import textwrap

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.backends import BACKEND
from support.backends import compiled
from support.backends import gradient
from support.backends import traced
from support.fresh_process import check_python
from support.paths import CPU
from support.paths import GPU
from support.references import softmax
from support.references import to_numpy

from keras_softmax import _backend
from keras_softmax import linear_cross_entropy


def reference_losses(
    labels,
    inputs,
    kernel,
    bias=None,
    temperature=1.0,
    logit_soft_cap=None,
    label_smoothing=0.0,
    z_loss=0.0,
    ignore_class=None,
):
    """The per-position losses in float64, from the materialised logits."""
    h, w = np.asarray(inputs, np.float64), np.asarray(kernel, np.float64)
    logits = h @ w + (0.0 if bias is None else np.asarray(bias, np.float64))
    if logit_soft_cap is not None:
        logits = logit_soft_cap * np.tanh(logits / logit_soft_cap)
    top = logits.max(-1, keepdims=True)
    z = (logits - top) / temperature
    log_total = np.log(np.exp(z).sum(-1))
    labels = np.asarray(labels)
    valid = (
        np.ones(labels.shape, bool) if ignore_class is None else labels != ignore_class
    )
    picked = np.take_along_axis(z, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    lse = top[..., 0] / temperature + log_total
    loss = (1 - label_smoothing) * (log_total - picked)
    loss += label_smoothing * (log_total - z.mean(-1)) + z_loss * lse**2
    return np.where(valid, loss, 0.0)


def _problem(n=7, depth=5, vocabulary=11, seed=0, scale=1.0, dtype="float32"):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, vocabulary, size=n),
        (rng.normal(size=(n, depth)) * scale).astype(dtype),
        rng.normal(size=(depth, vocabulary)).astype(dtype),
        rng.normal(size=(vocabulary,)).astype(dtype),
    )


OPTIONS = {
    "plain": {},
    "T = 0.6": dict(temperature=0.6),
    "soft cap": dict(logit_soft_cap=2.5),
    "smoothing and z-loss": dict(label_smoothing=0.2, z_loss=1e-3),
    "ignored class": dict(ignore_class=3),
    "everything": dict(
        temperature=1.7, logit_soft_cap=5.0, label_smoothing=0.1, z_loss=1e-2
    ),
}


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_every_loss_is_within_2e_6_of_the_float64_reference(options, chunk_size):
    labels, h, w, b = _problem()
    labels[:2] = 3  # so that an ignored class ignores something
    kwargs = OPTIONS[options]
    actual = to_numpy(
        linear_cross_entropy(
            labels, h, w, b, reduction=None, chunk_size=chunk_size, **kwargs
        )
    )
    expected = reference_losses(labels, h, w, b, **kwargs)
    np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=1e-7)


@given(
    st.integers(1, 9),
    st.integers(1, 6),
    st.integers(2, 40),
    st.integers(1, 9),
    st.floats(0.3, 3.0),
    st.sampled_from([None, 1.5, 30.0]),
)
def test_losses_match_the_reference_for_any_shape_and_chunk(
    n, depth, vocabulary, chunk, temperature, cap
):
    labels, h, w, b = _problem(n, depth, vocabulary, seed=n * 100 + vocabulary)
    kwargs = dict(temperature=temperature, logit_soft_cap=cap)
    actual = to_numpy(
        linear_cross_entropy(
            labels, h, w, b, reduction=None, chunk_size=chunk, **kwargs
        )
    )
    np.testing.assert_allclose(
        actual, reference_losses(labels, h, w, b, **kwargs), rtol=2e-6, atol=1e-6
    )


def test_logits_in_the_hundreds_at_a_vocabulary_of_262144_stay_exact():
    labels, h, w, b = _problem(n=3, depth=4, vocabulary=262144, scale=60.0)
    actual = to_numpy(linear_cross_entropy(labels, h, w, b, reduction=None))
    expected = reference_losses(labels, h, w, b)
    assert np.max(np.abs(h @ w)) > 100
    np.testing.assert_allclose(actual, expected, rtol=2e-6)


@pytest.mark.parametrize("ignore_class", [None, 3])
def test_default_reduction_equals_keras_sparse_cross_entropy_on_the_logits(
    ignore_class,
):
    labels, h, w, b = _problem()
    labels[:2] = 3
    keras_loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=ignore_class
    )
    logits = keras.ops.matmul(h, w) + b
    expected = float(to_numpy(keras_loss(labels, logits)))
    actual = float(
        to_numpy(linear_cross_entropy(labels, h, w, b, ignore_class=ignore_class))
    )
    np.testing.assert_allclose(actual, expected, rtol=2e-6)


def test_reductions_sum_mean_and_none_keep_their_meaning():
    labels, h, w, b = _problem(n=6)
    labels = labels.reshape(2, 3)
    h3 = h.reshape(2, 3, -1)
    per_position = to_numpy(linear_cross_entropy(labels, h3, w, b, reduction=None))
    assert per_position.shape == (2, 3)
    total = to_numpy(linear_cross_entropy(labels, h3, w, b, reduction="sum"))
    mean = to_numpy(linear_cross_entropy(labels, h3, w, b, reduction="mean"))
    np.testing.assert_allclose(total, per_position.sum(), rtol=1e-6)
    np.testing.assert_allclose(mean, per_position.mean(), rtol=1e-6)


def test_ignored_positions_contribute_nothing_and_an_all_ignored_batch_is_zero():
    labels, h, w, b = _problem()
    ignored = np.full_like(labels, 4)
    loss = to_numpy(linear_cross_entropy(ignored, h, w, b, ignore_class=4))
    assert loss == 0.0
    grad = gradient(
        lambda v: linear_cross_entropy(labels, v, w, b, ignore_class=labels[0]), h
    )
    np.testing.assert_array_equal(grad[labels == labels[0]], 0.0)


EVERYTHING = OPTIONS["everything"]


def test_a_mean_has_the_gradient_of_its_per_position_losses_divided_by_the_count():
    # The mean's gradients are computed in the forward pass, the per-position
    # losses' by a reverse pass that recomputes each chunk.
    labels, h, w, b = _problem(n=9)
    count = float(np.sum(labels != 3))
    opts = dict(EVERYTHING, ignore_class=3, chunk_size=4)
    mean = gradient(lambda v: linear_cross_entropy(labels, h, v, b, **opts), w)
    per_position = gradient(
        lambda v: (
            keras.ops.sum(linear_cross_entropy(labels, h, v, b, reduction=None, **opts))
            / count
        ),
        w,
    )
    np.testing.assert_allclose(mean, per_position, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's tapes")
def test_a_function_traced_without_a_tape_still_has_exact_gradients():
    # Traced with no tape open, the forward pass keeps nothing; a tape
    # opened later differentiates through the reverse pass instead.
    import tensorflow as tf

    labels, h, w, b = _problem(n=9)
    loss = tf.function(
        lambda v: linear_cross_entropy(labels, h, v, b, chunk_size=4, **EVERYTHING)
    )
    kernel = tf.constant(w)
    loss(kernel)
    with tf.GradientTape() as tape:
        tape.watch(kernel)
        traced_loss = loss(kernel)
    later = tape.gradient(traced_loss, kernel)
    with tf.GradientTape() as tape:
        tape.watch(kernel)
        eager = linear_cross_entropy(labels, h, kernel, b, chunk_size=4, **EVERYTHING)
    np.testing.assert_allclose(
        later.numpy(), tape.gradient(eager, kernel).numpy(), rtol=1e-5, atol=1e-7
    )


def test_half_precision_inputs_are_computed_in_float32():
    labels, h, w, b = _problem()
    half = [a.astype("float16") for a in (h, w, b)]
    actual = to_numpy(linear_cross_entropy(labels, *half, reduction=None))
    expected = reference_losses(labels, *(a.astype(np.float64) for a in half))
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=2e-6)


@pytest.mark.parametrize("mode", [traced, compiled], ids=lambda m: m.__name__)
def test_traced_and_compiled_calls_give_the_eager_losses(mode):
    labels, h, w, b = _problem()
    fn = mode(
        lambda h, w, b: linear_cross_entropy(
            labels, h, w, b, reduction=None, chunk_size=3
        )
    )
    tensors = [keras.ops.convert_to_tensor(a) for a in (h, w, b)]
    np.testing.assert_allclose(
        to_numpy(fn(*tensors)), reference_losses(labels, h, w, b), rtol=2e-6
    )


@pytest.mark.parametrize("mode", [traced, compiled], ids=lambda m: m.__name__)
def test_labels_listed_from_the_steps_own_tensors_give_the_eager_losses(mode):
    # A list of traced values is not NumPy's to read: it is converted first
    # (NumPy's reading raised under jax.jit and tf.function).
    labels, h, w, b = _problem(n=3)
    fn = mode(
        lambda y, h: linear_cross_entropy([y[0], y[1], y[2]], h, w, b, reduction=None)
    )
    y = keras.ops.convert_to_tensor(labels.astype("int32"))
    np.testing.assert_allclose(
        to_numpy(fn(y, keras.ops.convert_to_tensor(h))),
        reference_losses(labels, h, w, b),
        rtol=2e-6,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(labels=[0, 11]), "a label of 11"),
        (dict(labels=[0, -1]), "a label of -1"),
        # JAX without 64-bit types made these the classes 5 and -2**31 + 5.
        (dict(labels=np.array([0, 2**32 + 5])), "a label of 4294967301"),
        (dict(labels=[0, 2**31 + 5]), "a label of 2147483653"),
        (dict(labels=[0, 1, 2]), "labels.shape=\\(3,\\)"),
        (dict(kernel=np.ones((4, 11), "float32")), "kernel.shape=\\(4, 11\\)"),
        (dict(bias=np.ones(10, "float32")), "bias.shape=\\(10,\\)"),
        (dict(temperature=0.0), "temperature=0.0"),
        (dict(temperature=-2), "temperature=-2"),
        (dict(logit_soft_cap=-1.0), "logit_soft_cap=-1.0"),
        (dict(label_smoothing=1.5), "label_smoothing=1.5"),
        (dict(z_loss=-0.1), "z_loss=-0.1"),
        (dict(reduction="average"), "reduction='average'"),
        (dict(chunk_size=0), "chunk_size=0"),
        # Keras' loss truncates a float label; NaN became class 0 on JAX.
        (dict(labels=[0.0, 6.9]), "whole numbers.*a label of 6.9"),
        (dict(labels=[0.0, -0.5]), "whole numbers.*a label of -0.5"),
        (dict(labels=[0.0, np.nan]), "whole numbers.*a label of nan"),
        (dict(labels=[0.0, np.inf]), "whole numbers.*a label of inf"),
        (dict(ignore_class=1.5), "ignore_class=1.5"),
        (dict(ignore_class=True), "ignore_class=True"),
        (dict(ignore_class="pad"), "ignore_class='pad'"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_value(kwargs, message):
    _, h, w, b = _problem(n=2)
    arguments = dict(labels=[0, 1], inputs=h, kernel=w, bias=b) | kwargs
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(
            arguments.pop("labels"),
            arguments.pop("inputs"),
            arguments.pop("kernel"),
            arguments.pop("bias"),
            **arguments,
        )


def test_whole_float_labels_are_the_class_ids_they_hold():
    # As Keras' sparse cross-entropy reads them (labels from a float dataset).
    labels, h, w, b = _problem()
    floats = linear_cross_entropy(labels.astype("float32"), h, w, b, reduction=None)
    np.testing.assert_array_equal(
        to_numpy(floats),
        to_numpy(linear_cross_entropy(labels, h, w, b, reduction=None)),
    )


@pytest.mark.parametrize("mode", [traced, compiled], ids=lambda m: m.__name__)
def test_labels_held_as_a_backend_tensor_work_traced_and_compiled(mode):
    labels, h, w, b = _problem()
    tensor_labels = keras.ops.convert_to_tensor(labels)
    fn = mode(lambda h: linear_cross_entropy(tensor_labels, h, w, b, reduction=None))
    np.testing.assert_allclose(
        to_numpy(fn(keras.ops.convert_to_tensor(h))),
        reference_losses(labels, h, w, b),
        rtol=2e-6,
    )


@pytest.mark.parametrize("mode", [traced, compiled], ids=lambda m: m.__name__)
def test_boolean_labels_are_the_classes_0_and_1(mode):
    labels, h, w, b = _problem(n=4)
    flags = np.array([True, False, False, True])
    fn = mode(lambda y: linear_cross_entropy(y, h, w, b, reduction=None))
    np.testing.assert_allclose(
        to_numpy(fn(keras.ops.convert_to_tensor(flags))),
        reference_losses(flags.astype(int), h, w, b),
        rtol=2e-6,
    )


@pytest.mark.parametrize(
    "bad",
    [
        np.array([0, 11, 2], "int32"),
        # As int32, the classes 5 and 6: judged in their own dtype.
        pytest.param(
            np.array([0, 2**32 + 5, 2], "int64"),
            marks=pytest.mark.skipif(
                BACKEND == "jax", reason="JAX without 64-bit types has no int64"
            ),
        ),
        np.array([0.0, 6.5, 2.0], "float32"),
    ],
    ids=str,
)
def test_a_label_known_bad_only_at_run_time_gives_nan_not_a_loss(bad):
    labels, h, w, b = _problem(n=3)
    fn = compiled(lambda y: linear_cross_entropy(y, h, w, b, reduction=None))
    losses = to_numpy(fn(keras.ops.convert_to_tensor(bad)))
    assert np.isnan(losses[1]) and np.all(np.isfinite(losses[[0, 2]]))


def _training_step_code(chunk_size, warmup):
    """Python that makes `step(h)`, one step (loss and gradients) at 4096
    tokens by 32768 classes, as each backend trains, and traces it on
    `warmup` tokens; then `h`, `n`, `v` and `sync(grads)`."""
    return f"""
        import keras, numpy as np
        from keras_softmax import linear_cross_entropy
        backend = {BACKEND!r}
        n, d, v = 4096, 64, 32768
        rng = np.random.default_rng(0)
        h = rng.normal(size=(n, d)).astype("float32")
        w = (rng.normal(size=(d, v)) / 8).astype("float32")
        y = rng.integers(0, v, size=n)
        def loss(h, w):
            return linear_cross_entropy(y[: h.shape[0]], h, w, chunk_size={chunk_size})
        if backend == "tensorflow":
            import tensorflow as tf
            h, w = tf.constant(h), tf.Variable(w)
            @tf.function
            def step(h):
                with tf.GradientTape() as tape:
                    tape.watch(h)
                    value = loss(h, w)
                return tape.gradient(value, [h, w])
        elif backend == "jax":
            import jax
            step = jax.jit(lambda h: jax.grad(loss, argnums=(0, 1))(h, w))
        else:
            import torch
            w = torch.tensor(w, requires_grad=True)
            def step(h):
                h = torch.tensor(h, requires_grad=True)
                loss(h, w).backward()
                return h.grad, w.grad
        step(h[:{warmup}])  # trace and warm up
        def sync(grads):
            return float(keras.ops.convert_to_numpy(keras.ops.sum(grads[0])))
    """


def test_a_training_step_never_holds_the_tokens_by_vocabulary_logits():
    # In a fresh process: the logits alone would be 512 MiB.
    code = (
        _training_step_code(256, warmup=512)
        + """
        import resource
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sync(step(h))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024 / (n * v * 4))
    """
    )
    extra = float(check_python("-c", textwrap.dedent(code)).split()[-1])
    # The kernel's gradient is 1/16 of the logits' size, a chunk's
    # temporaries a few 1/16ths; the logits would be 1.0 at least.
    assert extra < 0.5, f"extra peak {extra:.2f} x the logits"


def test_a_chunk_holds_two_tensors_of_its_logits_size_at_its_peak():
    # Eager PyTorch frees each [C, V] tensor when its last name goes: a
    # step whose chunks are 128 MiB of logits (1024 x 32768) must not hold
    # five of them at once, as it did (5.25x); compiled backends plan
    # their own buffers (TensorFlow 1.5x, JAX 1.9x). The peak is reset
    # before the step (benchmarks/_memory.py), so the warm-up's cannot hide it.
    benchmarks = pathlib.Path(__file__).parents[1] / "benchmarks"
    # (Warmed up on whole chunks: the step is not traced again.)
    code = (
        _training_step_code(1024, warmup=2048)
        + f"""
        import sys
        sys.path.insert(0, {str(benchmarks)!r})
        from _memory import extra_peak_mib
        print(extra_peak_mib(lambda: step(h), sync) * 2**20 / (1024 * v * 4))
    """
    )
    extra = float(check_python("-c", textwrap.dedent(code)).split()[-1])
    assert extra < 2.5, f"extra peak {extra:.2f} x a chunk's logits"


def test_cpu_chunks_hold_64_mib_of_logits_32_on_jax_128_on_tensorflow_or_the_rows_asked(
    monkeypatch,
):
    from keras_softmax.linear_cross_entropy import _chunk

    # As on a CPU, wherever the suite runs.
    monkeypatch.setattr(_backend.edge(), "attention_device", lambda tensors: CPU)
    vocabulary = 131072
    # TensorFlow's chunks of 256 rows ran faster (0.88x the naive step
    # against 0.99x at N = 4096, D = 512). Before its kernel's gradient was
    # held in blocks, their products made 894 MiB, where 400 is the target.
    default = {"jax": 64, "tensorflow": 256}.get(BACKEND, 128)
    for positions in (512, 4096):
        hidden = np.zeros((positions // 4, 4, 8), "float32")
        assert _chunk(None, vocabulary, hidden) == default
    assert _chunk(100, vocabulary, hidden) == 100


def test_a_gpu_takes_chunks_of_2048_rows_at_least(monkeypatch):
    from keras_softmax.linear_cross_entropy import _chunk

    # Fewer rows spend longer rewriting the kernel's float32 gradient, once a
    # chunk, than multiplying (keras_softmax/_backend/base.py).
    monkeypatch.setattr(_backend.edge(), "attention_device", lambda tensors: GPU)
    hidden = keras.ops.zeros((4096, 8))
    assert _chunk(None, 131072, hidden) == 2048
    assert _chunk(None, 1024, hidden) == 16384  # 64 MiB of logits hold more
    assert _chunk(100, 131072, hidden) == 100


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's placement")
def test_a_traced_tensorflow_loss_takes_the_chunks_of_the_device_it_runs_on(
    monkeypatch,
):
    # A traced tensor names no device outside `tf.device` (""): TensorFlow
    # runs its ops on a GPU where it sees one, as in `fit`.
    import tensorflow as tf

    from keras_softmax.linear_cross_entropy import _chunk

    def rows_chosen():
        rows = []

        @tf.function
        def trace(hidden):
            rows.append(_chunk(None, 131072, hidden))
            with tf.device("/CPU:0"):
                rows.append(_chunk(None, 131072, tf.identity(hidden)))
            return hidden

        trace(tf.zeros((8, 8)))
        with tf.device("/CPU:0"):
            rows.append(_chunk(None, 131072, tf.zeros((8, 8))))
        return rows

    cpu = 256  # 2**25 logits
    here = 2048 if tf.config.list_logical_devices("GPU") else cpu
    assert rows_chosen() == [here, cpu, cpu]
    gpus = [tf.config.LogicalDevice("/device:GPU:0", "GPU")]
    monkeypatch.setattr(
        tf.config,
        "list_logical_devices",
        lambda kind=None: gpus if kind == "GPU" else [],
    )
    assert rows_chosen() == [2048, cpu, cpu]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="unknown batch sizes need a graph")
@pytest.mark.parametrize("gpu", [False, True], ids=["here", "a GPU described"])
def test_a_batch_of_unknown_size_is_chunked_to_its_own_size_not_padded(
    gpu, monkeypatch
):
    # Keras' `fit` traces its step with an unknown batch size; a GPU's
    # 2048-row chunks padded a batch of 100 twentyfold.
    import importlib

    import tensorflow as tf

    # (The package's `linear_cross_entropy` is the function.)
    module = importlib.import_module("keras_softmax.linear_cross_entropy")
    if gpu:
        monkeypatch.setattr(_backend.edge(), "attention_device", lambda t: GPU)
    padded = []
    pad = module._padded_to_chunks

    def recorded(*args):
        n, chunk, tensors = pad(*args)
        padded.append(tf.shape(tensors[0])[0])
        return n, chunk, tensors

    monkeypatch.setattr(module, "_padded_to_chunks", recorded)
    labels, h, w, b = _problem(n=100, depth=4)
    _products_of(monkeypatch, 256 * w.shape[1])  # chunks of 256 rows here
    specs = [tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, 4])]

    @tf.function(input_signature=specs)
    def step(y, h):
        with tf.GradientTape() as tape:
            tape.watch(h)
            losses = linear_cross_entropy(y, h, w, b, reduction=None)
            total = tf.reduce_sum(losses)
        return losses, tape.gradient(total, h), padded[-1]

    losses, d_inputs, rows = step(labels, h)
    assert int(rows) == 100
    np.testing.assert_allclose(
        losses.numpy(), reference_losses(labels, h, w, b), rtol=2e-6
    )
    # d sum(losses) / d h = (softmax(logits) - one_hot(labels)) @ w^T.
    logits_gradient = softmax(h.astype(np.float64) @ w + b) - np.eye(11)[labels]
    np.testing.assert_allclose(
        d_inputs.numpy(), logits_gradient @ w.T, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("wrap", [lambda fn: fn, traced], ids=["eager", "traced"])
def test_inputs_with_no_features_give_the_loss_of_the_bias_alone(wrap):
    # D = 0: the logits are the bias (a reshape's -1 failed beside the 0;
    # TensorFlow's graph fused the empty product with the bias, which
    # aborted the process or dropped the bias).
    labels, _, _, b = _problem()
    inputs, kernel = np.zeros((7, 0), "float32"), np.zeros((0, 11), "float32")
    losses = wrap(
        lambda h, w, b: linear_cross_entropy(labels, h, w, b, reduction=None)
    )(inputs, kernel, b)
    np.testing.assert_allclose(
        to_numpy(losses),
        reference_losses(labels, inputs, kernel.astype(np.float64), b),
        rtol=2e-6,
    )
    # Each loss's gradient in the bias: softmax(b) - one_hot(label).
    expected = np.arange(1, 8) @ (softmax(b) - np.eye(11)[labels])
    np.testing.assert_allclose(
        gradient(
            wrap(
                lambda v: linear_cross_entropy(
                    labels, inputs, kernel, v, reduction=None
                )
            ),
            b.astype(np.float64),
        ),
        expected,
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", None])
def test_an_empty_batch_has_a_loss_of_zero_and_zero_gradients(reduction):
    kernel = np.ones((3, 5), "float32")
    inputs = np.zeros((0, 3), "float32")
    loss = linear_cross_entropy(
        np.zeros((0,), "int32"), inputs, kernel, reduction=reduction
    )
    expected = np.zeros((0,)) if reduction is None else 0.0
    np.testing.assert_array_equal(to_numpy(loss), expected)

    def reduced(k):
        losses = linear_cross_entropy(np.zeros((0,), "int32"), inputs, k)
        return keras.ops.reshape(losses, (1,))

    np.testing.assert_array_equal(gradient(reduced, kernel), np.zeros((3, 5)))


def _sequences(seed=1):
    """A padded batch of 3 sequences of 4: labels, hidden states, a `[V, D]`
    table and a padding mask with a fully padded sequence."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 11, size=(3, 4))
    labels[0, :2] = 3  # for `ignore_class=3`
    hidden = rng.normal(size=(3, 4, 5)).astype("float32")
    table = rng.normal(size=(11, 5)).astype("float32")
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], "float32")
    return labels, hidden, table, mask


@pytest.mark.parametrize("ignore_class", [None, 3])
@pytest.mark.parametrize(
    "reduction", ["sum_over_batch_size", "mean", "mean_with_sample_weight", "sum", None]
)
def test_every_keras_reduction_of_sample_weights_equals_keras_on_the_logits(
    reduction, ignore_class
):
    labels, hidden, table, mask = _sequences()
    weights = mask * np.linspace(0.5, 2.0, 12, dtype="float32").reshape(3, 4)
    keras_loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=ignore_class, reduction=reduction
    )
    expected = to_numpy(keras_loss(labels, hidden @ table.T, sample_weight=weights))
    actual = to_numpy(
        linear_cross_entropy(
            labels,
            hidden,
            table,
            sample_weight=weights,
            transpose_kernel=True,
            ignore_class=ignore_class,
            reduction=reduction,
            chunk_size=5,
        )
    )
    np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=1e-7)
    # And the float64 reference, whose count is of the positions kept.
    losses = weights * reference_losses(
        labels, hidden, table.T, ignore_class=ignore_class
    )
    kept = labels != ignore_class
    reduced = {
        "sum_over_batch_size": losses.sum() / kept.sum(),
        "mean": losses.sum() / kept.sum(),
        "mean_with_sample_weight": losses.sum() / (weights * kept).sum(),
        "sum": losses.sum(),
        None: losses,
    }[reduction]
    np.testing.assert_allclose(actual, reduced, rtol=2e-6, atol=1e-7)


def test_a_padding_mask_as_sample_weight_divides_by_every_position_as_keras_hub():
    # keras-hub's CausalLM passes its padding mask as `sample_weight`: the
    # default divides by all positions; the masked mean is another reduction.
    labels, hidden, table, mask = _sequences()
    losses = reference_losses(labels, hidden, table.T)
    by_all = linear_cross_entropy(
        labels, hidden, table, sample_weight=mask, transpose_kernel=True
    )
    masked_mean = linear_cross_entropy(
        labels,
        hidden,
        table,
        sample_weight=mask,
        transpose_kernel=True,
        reduction="mean_with_sample_weight",
    )
    np.testing.assert_allclose(to_numpy(by_all), (losses * mask).sum() / 12, rtol=2e-6)
    np.testing.assert_allclose(
        to_numpy(masked_mean), (losses * mask).sum() / mask.sum(), rtol=2e-6
    )


def test_a_mean_with_a_broadcast_weight_divides_by_the_broadcast_weights():
    # Documented difference: Keras 3.15 divides by the weights as given, so
    # a scalar weight turns its "mean_with_sample_weight" into a sum.
    labels, hidden, table, _ = _sequences()
    losses = reference_losses(labels, hidden, table.T)
    options = dict(transpose_kernel=True, reduction="mean_with_sample_weight")
    ours = linear_cross_entropy(labels, hidden, table, sample_weight=2.0, **options)
    np.testing.assert_allclose(to_numpy(ours), losses.mean(), rtol=2e-6)
    keras_loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )
    logits = np.einsum("btd,vd->btv", hidden, table)
    theirs = keras_loss(labels, logits, sample_weight=2.0)
    np.testing.assert_allclose(to_numpy(theirs), losses.sum(), rtol=2e-5)


def test_a_weight_per_sequence_applies_to_each_of_its_positions():
    # Where Keras' own loss refuses `[batch]` weights for `[batch, time]`
    # labels, the weight of a sequence weights each of its positions.
    labels, hidden, table, _ = _sequences()
    per_sequence = np.array([0.5, 1.0, 2.0], "float32")
    options = dict(transpose_kernel=True, reduction=None)
    for weights in (per_sequence, per_sequence[:, None, None]):
        actual = linear_cross_entropy(
            labels, hidden, table, sample_weight=weights, **options
        )
        expected = per_sequence[:, None] * reference_losses(labels, hidden, table.T)
        np.testing.assert_allclose(to_numpy(actual), expected, rtol=2e-6)
    with pytest.raises(ValueError, match=r"sample_weight.shape=\(2,\)"):
        linear_cross_entropy(labels, hidden, table, sample_weight=np.ones(2), **options)


@pytest.mark.parametrize("reduction", ["mean_with_sample_weight", None])
def test_a_tied_kernel_and_sample_weights_have_the_gradients_of_the_logits(reduction):
    # Of the hidden states, the `[V, D]` table and the weights themselves,
    # against Keras' loss on the materialised logits.
    labels, hidden, table, mask = _sequences()
    weights = mask * np.linspace(0.5, 2.0, 12, dtype="float32").reshape(3, 4)
    keras_loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=3, reduction=reduction
    )

    def ours(h=hidden, w=table, s=weights):
        return linear_cross_entropy(
            labels, h, w, sample_weight=s, transpose_kernel=True,
            ignore_class=3, reduction=reduction, chunk_size=5,
        )  # fmt: skip

    def materialised(h=hidden, w=table, s=weights):
        logits = keras.ops.matmul(h, keras.ops.transpose(w))
        return keras_loss(labels, logits, sample_weight=s)

    def column(fn):
        return lambda *a: keras.ops.reshape(fn(*a), (-1,))

    for name, value in (("h", hidden), ("w", table), ("s", weights)):
        actual = gradient(column(lambda v, name=name: ours(**{name: v})), value)
        expected = gradient(
            column(lambda v, name=name: materialised(**{name: v})), value
        )
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_the_tied_kernel_is_read_in_place_never_copied():
    # A transposed copy of a `[V, D]` table would double a large
    # vocabulary's largest weight; every backend reads it as it lies.
    labels, hidden, table, mask = _sequences()
    vocabulary, depth = 4096, 5
    rng = np.random.default_rng(3)
    table = rng.normal(size=(vocabulary, depth)).astype("float32")

    def loss(h, w):
        return linear_cross_entropy(
            labels, h, w, sample_weight=mask, transpose_kernel=True
        )

    if BACKEND == "jax":
        import jax

        program = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, table)
        transposed = [
            str(e) for e in _equations(program.jaxpr)
            if e.primitive.name == "transpose"
            and any(v.aval.size >= table.size for v in e.invars)
        ]  # fmt: skip
        assert not transposed, transposed
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        graph = (
            tf.function(loss)
            .get_concrete_function(tf.constant(hidden), tf.constant(table))
            .graph
        )
        transposed = [
            op.name
            for op in _tf_ops(graph)
            if op.type == "Transpose"
            and op.inputs[0].shape.num_elements() == table.size
        ]
        assert not transposed, transposed
    else:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        kernel = torch.tensor(table)

        class CopiesOfTheKernel(TorchDispatchMode):
            copies = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if (
                        isinstance(t, torch.Tensor)
                        and t.numel() == kernel.numel()
                        and t.untyped_storage().data_ptr()
                        != kernel.untyped_storage().data_ptr()
                    ):
                        self.copies.append(str(func))
                return out

        with CopiesOfTheKernel() as watch:
            loss(torch.tensor(hidden), kernel)
        assert not watch.copies, watch.copies


def _equations(jaxpr):
    """Every equation of a jaxpr, inside scans and custom rules too."""
    for e in jaxpr.eqns:
        yield e
        for value in e.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(inner, "jaxpr", inner)  # a closed jaxpr's own
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def _tf_ops(graph):
    """Every operation of a TensorFlow graph and of the functions it calls."""
    yield from graph.get_operations()
    for function in graph._functions.values():  # noqa: SLF001
        yield from _tf_ops(function.graph)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("transposed", [False, True])
def test_half_inputs_keep_float32_losses_and_half_gradients(dtype, transposed):
    # Where the backend multiplies half operands into float32 (JAX, PyTorch
    # on a GPU), they are never copied to float32; elsewhere they are cast.
    # Chunks of 7 rows: the kernel's gradient adds up 6 of them.
    _check_half_inputs(dtype, chunk_size=7, transposed=transposed)


@pytest.mark.parametrize("wrap", [lambda fn: fn, traced], ids=["eager", "traced"])
@pytest.mark.parametrize("transposed", [False, True])
def test_the_kernels_gradient_added_a_block_of_classes_at_a_time_is_the_same(
    transposed, wrap, monkeypatch
):
    # Where a backend adds the products a block at a time (JAX always, PyTorch
    # where its device has no `addmm` into float32, TensorFlow into a total
    # held as blocks), they add up to the whole.
    labels, h, w, _ = _problem(n=40, depth=16, vocabulary=90)
    kernel = w.T if transposed else w
    options = {"chunk_size": 7, "transpose_kernel": transposed}

    def kernel_gradient():
        loss = wrap(lambda v: linear_cross_entropy(labels, h, v, **options))
        return to_numpy(gradient(loss, kernel))

    whole = kernel_gradient()
    # Blocks of 32 of the 90 classes, the last of 26.
    _products_of(monkeypatch, 16 * 32)
    np.testing.assert_allclose(kernel_gradient(), whole, rtol=1e-6, atol=1e-7)
    _check_half_inputs("bfloat16", chunk_size=7, transposed=transposed)


@pytest.mark.skipif(BACKEND != "jax", reason="XLA's buffers")
def test_jax_holds_one_float32_tensor_of_the_kernels_size_not_two(monkeypatch):
    # XLA makes a whole product before adding it to the kernel's gradient:
    # on a CPU, a second float32 tensor of its size (2 GiB at D = 4096,
    # V = 131072), but for the blocks of classes.
    import jax

    labels, h, w, _ = _problem(n=64, depth=256, vocabulary=4096)
    h, w = (jax.numpy.asarray(a, "bfloat16") for a in (h, w))
    accumulator = 4 * w.size  # the one float32 tensor of its size

    def temporaries():
        loss = lambda h, w: linear_cross_entropy(labels, h, w, chunk_size=8)  # noqa: E731
        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return step.lower(h, w).compile().memory_analysis().temp_size_in_bytes

    _products_of(monkeypatch, 1 << 14)
    assert temporaries() < 1.25 * accumulator
    _products_of(monkeypatch, w.size)  # one block: the whole product
    assert temporaries() > 1.9 * accumulator


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's allocations")
def test_tensorflow_holds_the_kernels_gradient_in_blocks_not_three_whole_tensors():
    # TensorFlow adds a product into a new tensor: a chunk that adds its
    # whole `[D, V]` product holds the running total, the product and their
    # sum at once. Held as blocks of classes, one block's product and sum
    # join the total. In a fresh process, after a first step: the extra
    # peak of the second was 3.1 kernels whole, 0.2 in blocks.
    benchmarks = pathlib.Path(__file__).parents[1] / "benchmarks"
    code = f"""
        import sys
        sys.path.insert(0, {str(benchmarks)!r})
        import numpy as np, tensorflow as tf
        from _memory import extra_peak_mib
        from keras_softmax import linear_cross_entropy
        n, d, v = 256, 512, 65536
        rng = np.random.default_rng(0)
        h = tf.constant(rng.normal(size=(n, d)).astype("float32"))
        w = tf.Variable((rng.normal(size=(d, v)) / 8).astype("float32"))
        y = rng.integers(0, v, size=n)
        @tf.function
        def step(h):
            with tf.GradientTape() as tape:
                value = linear_cross_entropy(y[: h.shape[0]], h, w, chunk_size=64)
            return tape.gradient(value, w)
        step(h[:64])
        mib = extra_peak_mib(lambda: step(h), lambda g: float(tf.reduce_sum(g)))
        print(mib * 2**20 / (d * v * 4))
    """
    extra = float(check_python("-c", textwrap.dedent(code)).split()[-1])
    assert extra < 1.5, f"extra peak {extra:.2f} x the kernel"


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's running totals")
def test_tensorflow_holds_4_mib_blocks_of_classes_64_at_most(monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr(_backend.edge(), "attention_device", lambda tensors: CPU)
    blocks = {}

    @tf.function
    def trace():  # (traced only: nothing is allocated)
        for shape, axis in [
            ((512, 131072), 1),
            ((8192, 131072), 1),
            ((131072, 8192), 0),
            ((16, 90), 1),
        ]:
            total = _backend.running_total(tf.zeros(shape), "float32", axis)
            parts = total if isinstance(total, tuple) else (total,)  # one block
            blocks[shape] = sorted({tuple(block.shape) for block in parts}, key=str)
            blocks[shape].append(len(parts))
        return 0

    trace.get_concrete_function()
    assert blocks == {
        (512, 131072): [(512, 2048), 64],  # 4 MiB each
        (8192, 131072): [(8192, 2048), 64],  # 1024 of 4 MiB would be too many
        (131072, 8192): [(2048, 8192), 64],
        (16, 90): [(16, 90), 1],
    }


def _products_of(monkeypatch, elements):
    """Makes the running edge add products `elements` at a time where it
    cannot add them whole in place (its chunks too, where no size is asked),
    and TensorFlow hold its running totals in blocks of `elements`."""
    monkeypatch.setattr(_backend.edge(), "chunk_elements", lambda device: elements)
    if BACKEND == "tensorflow":
        from keras_softmax._backend import tensorflow

        monkeypatch.setattr(tensorflow, "_CPU_TOTAL_BLOCK", elements)


def _check_half_inputs(dtype, chunk_size=None, transposed=False):
    """The losses of half inputs are those of float32 logits of the half
    values, and the gradients, in the inputs' dtype, within half rounding
    of float64's (of a loss scaled by 0.3, which rounds a half gradient
    once more)."""
    labels, h, w, b = _problem(n=40, depth=16, vocabulary=90)
    half_h, half_w = (keras.ops.cast(a, dtype) for a in (h, w))
    exact = [to_numpy(keras.ops.cast(a, "float64")) for a in (half_h, half_w)]
    options = {"chunk_size": chunk_size, "transpose_kernel": transposed}
    kernel = keras.ops.transpose(half_w) if transposed else half_w
    losses = linear_cross_entropy(labels, half_h, kernel, reduction=None, **options)
    assert keras.backend.standardize_dtype(losses.dtype) == "float32"
    np.testing.assert_allclose(
        to_numpy(losses), reference_losses(labels, *exact), rtol=2e-6, atol=1e-6
    )

    def loss(h, w):
        return 0.3 * keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(
                labels, keras.ops.matmul(h, w), from_logits=True
            )
        )

    exact_h, exact_w = (keras.ops.convert_to_tensor(a) for a in exact)
    pairs = [
        (
            _gradient_as_given(
                lambda v: 0.3 * linear_cross_entropy(labels, half_h, v, **options),
                kernel,
            ),
            _gradient_as_given(lambda v: loss(exact_h, v), exact_w),
        ),
        (
            _gradient_as_given(
                lambda v: 0.3 * linear_cross_entropy(labels, v, kernel, **options),
                half_h,
            ),
            _gradient_as_given(lambda v: loss(v, exact_w), exact_h),
        ),
    ]
    for actual, expected in pairs:
        assert keras.backend.standardize_dtype(actual.dtype) == dtype
        actual, expected = (
            to_numpy(keras.ops.cast(g, "float64")) for g in (actual, expected)
        )
        if actual.shape != expected.shape:  # a transposed kernel's
            expected = expected.T
        scale = np.abs(expected).max()
        np.testing.assert_allclose(actual, expected, atol=scale * 2.0**-7, rtol=0)


def _gradient_as_given(fn, x):
    """d fn(x) / dx of a scalar `fn`, in `x`'s dtype, by the backend's autodiff."""
    if BACKEND == "jax":
        import jax

        return jax.grad(fn)(x)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(x)
            value = fn(x)
        return tape.gradient(value, x)
    x = x.detach().requires_grad_(True)
    fn(x).backward()
    return x.grad


@pytest.fixture
def emulated_float32_products():
    """PyTorch's `out_dtype` products, computed as CUDA's kernels compute
    them (float32 accumulation of half operands), on any device: 2.13 has
    no CPU kernel for them. Counts the calls of each, and every float32
    copy of a half tensor as large as `watched_size`."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from keras_softmax._backend import torch as torch_edge

    aten = torch.ops.aten

    class Float32Products(TorchDispatchMode):
        failing = ()  # overloads that raise, as a device without them would
        rounding = False  # whether mm rounds its product to the half dtype
        watched_size = None

        def __init__(self):
            super().__init__()
            self.calls, self.copies = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in self.failing:
                raise NotImplementedError(f"no kernel for {func}")
            if func is aten.mm.dtype:
                self.calls.append("mm")
                a, b, out_dtype = args
                if self.rounding:
                    return torch.mm(a, b).to(out_dtype)
                return torch.mm(a.to(out_dtype), b.to(out_dtype))
            if func is aten.addmm.dtype_out:
                self.calls.append("addmm")
                total, a, b, out_dtype = args
                a, b = a.to(out_dtype), b.to(out_dtype)
                return torch.addmm(total, a, b, **kwargs)
            out = func(*args, **kwargs)
            if func is aten._to_copy.default and self.watched_size is not None:
                given = args[0]
                if (
                    given.dtype in (torch.bfloat16, torch.float16)
                    and out.dtype == torch.float32
                    and given.numel() >= self.watched_size
                ):
                    self.copies.append(tuple(given.shape))
            return out

    torch_edge._float32_product_of_half.cache_clear()
    try:
        yield Float32Products
    finally:
        torch_edge._float32_product_of_half.cache_clear()


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's out_dtype products")
def test_pytorch_asks_its_device_how_it_multiplies_half_operands_into_float32(
    emulated_float32_products,
):
    import torch

    from keras_softmax._backend.torch import _float32_product_of_half
    from keras_softmax._backend.torch import _Float32Product

    cpu = torch.device("cpu")
    # PyTorch 2.13 has no CPU kernel: the operands are cast instead.
    assert _float32_product_of_half(cpu, torch.bfloat16) is None
    assert _float32_product_of_half(cpu, torch.float32) is None
    aten = torch.ops.aten
    cases = [
        ((), False, _Float32Product.ADDED_IN_PLACE),
        ((aten.addmm.dtype_out,), False, _Float32Product.MADE_APART),
        ((aten.mm.dtype,), False, None),
        ((), True, None),  # a float32 result that was rounded to half
    ]
    for failing, rounding, expected in cases:
        for dtype in (torch.bfloat16, torch.float16):
            _float32_product_of_half.cache_clear()
            mode = emulated_float32_products()
            mode.failing, mode.rounding = failing, rounding
            with mode:
                assert _float32_product_of_half(cpu, dtype) is expected, (
                    failing,
                    dtype,
                )


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's out_dtype products")
@pytest.mark.parametrize("kernels", ["mm and addmm", "mm", "none"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("transposed", [False, True])
def test_pytorch_half_loss_takes_float32_products_where_the_device_has_them(
    emulated_float32_products, kernels, dtype, transposed, monkeypatch
):
    import torch

    aten = torch.ops.aten
    mode = emulated_float32_products()
    mode.failing = {
        "mm and addmm": (),
        "mm": (aten.addmm.dtype_out,),
        "none": (aten.mm.dtype, aten.addmm.dtype_out),
    }[kernels]
    mode.watched_size = 16 * 90  # the kernel's, in _check_half_inputs
    # Without `addmm`, the products are added 32 classes at a time.
    _products_of(monkeypatch, 16 * 32)
    with mode:
        _check_half_inputs(dtype, chunk_size=7, transposed=transposed)
    assert set(mode.calls) == set(kernels.split(" and ")) - {"none"}
    # The kernel is copied to float32 only where the device has no such
    # products.
    assert bool(mode.copies) == (kernels == "none"), mode.copies


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's autograd engine")
def test_pytorch_reverse_pass_makes_no_zeros_of_the_kernels_size():
    # The forward pass hands the kernel's gradient to the reverse pass as an
    # output; autograd made a tensor of zeros for its unused gradient.
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    labels, h, w, _ = _problem(n=40, depth=16, vocabulary=90)
    h, w = (torch.tensor(a, requires_grad=True) for a in (h, w))

    class Made(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() == w.numel():
                self.ops.append(str(func))
            return out

    loss = linear_cross_entropy(labels, h, w)
    with Made() as made:
        loss.backward()
    assert not [op for op in made.ops if "zeros" in op or "full" in op], made.ops
    assert "aten.mul.Tensor" in made.ops  # the watch sees the scaling


@pytest.mark.skipif(BACKEND != "torch", reason="eager PyTorch's allocations")
@pytest.mark.parametrize(
    "options, per_chunk",
    [({}, 1), ({"label_smoothing": 0.1}, 1), ({"temperature": 0.7}, 3)],
    ids=["plain", "smoothed", "tempered"],
)
def test_pytorch_makes_one_tensor_of_a_chunks_logits_size_per_chunk(options, per_chunk):
    # Each pass over a chunk's [C, V] logits writes over its input: a new
    # tensor per pass held two at a time, and took a CPU a third of the
    # step. (A temperature's gradient reads the shifted logits beside their
    # exponential, and their product; a soft cap's formula makes its own.)
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    labels, h, w, b = _problem(n=40, depth=16, vocabulary=90)
    h, w, b = (torch.tensor(a, requires_grad=True) for a in (h, w, b))
    temperature = options.get("temperature")
    if temperature is not None:
        options = options | {
            "temperature": torch.tensor(temperature, requires_grad=True)
        }

    class Made(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            new = not func._schema.is_mutable and not func.is_view
            if new and isinstance(out, torch.Tensor) and out.shape == (8, 90):
                self.ops.append(str(func))
            return out

    with Made() as made:
        loss = linear_cross_entropy(labels, h, w, b, chunk_size=8, **options)
        loss.backward()
    assert len(made.ops) == 5 * per_chunk, made.ops  # 5 chunks of 8
    np.testing.assert_allclose(
        to_numpy(loss),
        np.mean(
            reference_losses(
                labels,
                to_numpy(h),
                to_numpy(w),
                to_numpy(b),
                **{k: float(to_numpy(v)) for k, v in options.items()},
            )
        ),
        rtol=2e-6,
    )


@pytest.mark.skipif(BACKEND != "jax", reason="JAX multiplies bf16 into float32")
def test_bfloat16_training_holds_no_float32_copy_of_the_kernel():
    import jax

    labels, h, w, _ = _problem(n=64, depth=16, vocabulary=4096)
    h, w = (jax.numpy.asarray(a, "bfloat16") for a in (h, w))
    program = jax.make_jaxpr(
        jax.grad(lambda h, w: linear_cross_entropy(labels, h, w), argnums=(0, 1))
    )(h, w)
    copies = [
        str(e)
        for e in _equations(program.jaxpr)
        if e.primitive.name == "convert_element_type"
        and e.invars[0].aval.dtype == jax.numpy.bfloat16
        and e.invars[0].aval.size >= w.size
        and e.outvars[0].aval.dtype == jax.numpy.float32
    ]
    assert not copies, copies
