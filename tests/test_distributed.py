"""Training over several devices, and the same accuracy on every backend."""

import numpy as np
import pytest
from support.backends import BACKEND
from support.fresh_process import check_python
from support.fresh_process import run_python

from keras_softmax import demo


def test_data_parallel_training_over_two_devices_reaches_single_device_accuracy():
    # MirroredStrategy on TensorFlow, keras.distribution.DataParallel on JAX;
    # PyTorch must refuse clearly rather than train on one device silently.
    env = {"KERAS_BACKEND": BACKEND}
    if BACKEND == "jax":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    command = [
        "-m",
        "keras_softmax.demo.distributed",
        "--devices",
        "2",
        "--epochs",
        "15",
    ]
    result = run_python(*command, env=env, timeout=900)
    code, out, err = result.returncode, result.stdout, result.stderr
    if BACKEND == "torch":
        assert code == 2 and "not torch" in err
        return
    assert code == 0, err[-2000:]
    single, parallel = (float(w) for w in out.split() if w.startswith("0."))
    assert parallel >= 0.95
    assert abs(parallel - single) <= 0.01


@pytest.mark.skipif(BACKEND == "tensorflow", reason="compares with TensorFlow")
def test_classifier_accuracy_on_this_backend_is_within_001_of_tensorflows():
    data = demo.load_digits(seed=0)
    model = demo.build_model("stable_softmax", seed=0)
    demo.train(model, data, epochs=15, seed=0, verbose=0)
    x_test, y_test = data[2]
    here = demo.scores(model.predict(x_test, verbose=0), y_test)["accuracy"]
    out = check_python(
        "-c",
        "from keras_softmax import demo\n"
        "data = demo.load_digits(seed=0)\n"
        "model = demo.build_model('stable_softmax', seed=0)\n"
        "demo.train(model, data, epochs=15, seed=0, verbose=0)\n"
        "x, y = data[2]\n"
        "print(demo.scores(model.predict(x, verbose=0), y)['accuracy'])\n",
        env={"KERAS_BACKEND": "tensorflow"},
        timeout=900,
    )
    tensorflow = float(out.split()[-1])
    # NaN fails every comparison below; say so first.
    assert np.isfinite(here) and np.isfinite(tensorflow), (here, tensorflow)
    assert here >= 0.95
    assert abs(here - tensorflow) <= 0.01, (BACKEND, here, tensorflow)
