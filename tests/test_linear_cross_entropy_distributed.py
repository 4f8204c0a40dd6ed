"""The large-vocabulary loss over several devices, with Keras' distribution APIs.

Each check runs in a fresh process, where the devices can be set up before
the backend starts: 4 CPU devices for JAX, 2 logical CPUs for TensorFlow.
"""

import json
import textwrap

import numpy as np
import pytest
from support.backends import BACKEND
from support.fresh_process import check_python

_PROBLEM = """
    import numpy as np
    rng = np.random.default_rng(0)
    n, d, v = 64, 16, 4096
    hidden = rng.normal(size=(n, d)).astype("float32")
    kernel = (rng.normal(size=(d, v)) / 4).astype("float32")
    bias = rng.normal(size=(v,)).astype("float32")
    labels = rng.integers(0, v, size=n)
"""


def _run(body, env):
    code = textwrap.dedent(_PROBLEM) + textwrap.dedent(body)
    return json.loads(check_python("-c", code, env=env, timeout=900).splitlines()[-1])


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
@pytest.mark.parametrize("transposed", [False, True], ids=["[D, V]", "[V, D]"])
def test_model_parallel_kernel_sharded_over_4_devices_gives_one_devices_loss(
    transposed,
):
    result = _run(
        f"""
        import json, jax, keras
        from keras_softmax import _backend, linear_cross_entropy
        transposed = {transposed}
        devices = keras.distribution.list_devices("cpu")
        mesh = keras.distribution.DeviceMesh((1, 4), ["batch", "model"], devices)
        layout_map = keras.distribution.LayoutMap(mesh)
        layout_map["head/kernel"] = ("model", None) if transposed else (None, "model")
        layout_map["head/bias"] = ("model",)
        distribution = keras.distribution.ModelParallel(layout_map=layout_map)
        with distribution.scope():
            equation = "nd,vd->nv" if transposed else "nd,dv->nv"
            head = keras.layers.EinsumDense(equation, (v,), bias_axes="v", name="head")
            head.build((None, d))
        head.set_weights([kernel.T if transposed else kernel, bias])
        w, b = head.kernel.value, head.bias.value

        def loss(h, w, b):
            return linear_cross_entropy(
                labels, h, w, b, chunk_size=16, transpose_kernel=transposed
            )

        results = []
        # One block (these sizes), then blocks of 256 classes, each 64 of
        # every device's 1024.
        for elements in (None, 16 * 256):
            if elements:
                _backend.edge().chunk_elements = lambda device: elements
            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            sharded, (dh, dw, db) = step(hidden, w, b)
            single, (dh1, dw1, db1) = step(hidden, np.asarray(w), np.asarray(b))
            def compiled(*args):
                return step.lower(*args).compile()
            results.append({{
                "kernel shards": [list(s.data.shape) for s in w.addressable_shards],
                "gradient shards": [
                    list(s.data.shape) for s in dw.addressable_shards
                ],
                "gathers": compiled(hidden, w, b).as_text().count("all-gather"),
                "loss": [float(sharded), float(single)],
                "gradient error": max(
                    float(
                        np.max(np.abs(np.asarray(a) - np.asarray(e)))
                        / np.max(np.abs(e))
                    )
                    for a, e in ((dh, dh1), (dw, dw1), (db, db1))
                ),
                "temp bytes": [
                    compiled(*args).memory_analysis().temp_size_in_bytes
                    for args in ((hidden, w, b), (hidden, np.asarray(w), np.asarray(b)))
                ],
            }})
        print(json.dumps(results))
        """,
        env={
            "KERAS_BACKEND": "jax",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        },
    )
    shard = [1024, 16] if transposed else [16, 1024]
    for blocks in result:
        assert blocks["kernel shards"] == [shard] * 4
        # Each device keeps its quarter of the kernel's gradient: nothing is
        # gathered, with blocks of classes or without.
        assert blocks["gradient shards"] == [shard] * 4, blocks
        assert blocks["gathers"] == 0, blocks
        sharded, single = blocks["loss"]
        np.testing.assert_allclose(sharded, single, rtol=2e-6)
        assert blocks["gradient error"] < 2e-5
        # Per device: about a quarter of one device's working memory.
        per_device, one_device = blocks["temp bytes"]
        assert per_device < 0.35 * one_device, blocks["temp bytes"]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute is TensorFlow's")
def test_mirrored_strategy_over_2_devices_gives_one_devices_loss_and_gradients():
    result = _run(
        """
        import json
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        from keras_softmax import linear_cross_entropy
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            w, b = tf.Variable(kernel), tf.Variable(bias)

        def replica_step(h, y):
            with tf.GradientTape() as tape:
                # Keras' convention: each replica's mean, over the global batch.
                loss = linear_cross_entropy(y, h, w, b, reduction="sum", chunk_size=8)
                loss = loss / n
            return loss, tape.gradient(loss, [w, b])

        @tf.function
        def distributed(h, y):
            per = strategy.run(replica_step, args=(h, y))
            return tf.nest.map_structure(
                lambda t: strategy.reduce("SUM", t, axis=None), per
            )

        halves = strategy.experimental_distribute_values_from_function(
            lambda ctx: (
                hidden[ctx.replica_id_in_sync_group::2],
                labels[ctx.replica_id_in_sync_group::2],
            )
        )
        loss, (dw, db) = distributed(*halves)
        with tf.GradientTape() as tape:
            single = linear_cross_entropy(labels, hidden, w, b)
        dw1, db1 = tape.gradient(single, [w, b])
        print(json.dumps({
            "replicas": strategy.num_replicas_in_sync,
            "loss": [float(loss), float(single)],
            "gradient error": max(
                float(tf.reduce_max(tf.abs(a - e)) / tf.reduce_max(tf.abs(e)))
                for a, e in ((dw, dw1), (db, db1))
            ),
        }))
        """,
        env={"KERAS_BACKEND": "tensorflow"},
    )
    assert result["replicas"] == 2
    distributed, single = result["loss"]
    np.testing.assert_allclose(distributed, single, rtol=2e-6)
    assert result["gradient error"] < 2e-5
