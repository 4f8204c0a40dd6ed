"""Times stable_softmax against TensorFlow's and Keras' own softmax.

Each case runs both contenders side by side in one process, alternating
them in every repeat, and reports the median time of each and the ratio of
the medians. Run from the repository root:

    python benchmarks/bench_softmax.py            # [2048, 8192], 15 repeats
    python benchmarks/bench_softmax.py --rows 256 --repeats 5   # a quick look
"""

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_softmax  # noqa: E402


def _time(fn, repeats):
    """Per-repeat wall times of `fn()`, waiting for the result each time."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn().numpy()
        times.append(time.perf_counter() - start)
    return times


def _compare(ours, baseline, repeats, warmup=3):
    for _ in range(warmup):
        ours().numpy()
        baseline().numpy()
    ours_times, base_times = [], []
    for _ in range(repeats):
        # Alternate so that drifts in machine load hit both alike.
        ours_times += _time(ours, 1)
        base_times += _time(baseline, 1)
    ours_ms = statistics.median(ours_times) * 1e3
    base_ms = statistics.median(base_times) * 1e3
    return ours_ms, base_ms, ours_ms / base_ms


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    shape = (args.rows, args.cols)
    x = tf.constant(rng.normal(scale=5.0, size=shape).astype("float32"))
    # 30% masked at random, and no row fully masked.
    mask_np = rng.random(shape) >= 0.3
    mask_np[:, 0] = True
    mask = tf.constant(mask_np)
    keras_masked = keras.layers.Softmax()

    jit_ours = tf.function(keras_softmax.stable_softmax, jit_compile=True)
    jit_tf = tf.function(tf.nn.softmax, jit_compile=True)
    jit_ours_masked = tf.function(
        lambda x, m: keras_softmax.stable_softmax(x, mask=m, temperature=0.7),
        jit_compile=True,
    )
    jit_keras_masked = tf.function(
        lambda x, m: keras_masked(x / 0.7, mask=m), jit_compile=True
    )

    cases = [
        (
            "eager, no mask, T=1",
            lambda: keras_softmax.stable_softmax(x),
            "tf.nn.softmax",
            lambda: tf.nn.softmax(x),
            1.15,
        ),
        (
            "eager, 30% masked, T=0.7",
            lambda: keras_softmax.stable_softmax(x, mask=mask, temperature=0.7),
            "keras.layers.Softmax()(x / 0.7, mask)",
            lambda: keras_masked(x / 0.7, mask=mask),
            0.85,
        ),
        (
            "XLA (jit_compile), no mask, T=1",
            lambda: jit_ours(x),
            "tf.nn.softmax, XLA",
            lambda: jit_tf(x),
            1.05,
        ),
        (
            "XLA (jit_compile), 30% masked, T=0.7",
            lambda: jit_ours_masked(x, mask),
            "keras.layers.Softmax, XLA",
            lambda: jit_keras_masked(x, mask),
            None,
        ),
    ]

    print(
        f"stable_softmax on float32 {list(shape)}, TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}, {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), "
        f"median of {args.repeats} alternating repeats"
    )
    print()
    print("| case | stable_softmax (ms) | baseline | baseline (ms) | ratio | target |")
    print("|---|---:|---|---:|---:|---:|")
    for name, ours, base_name, base, target in cases:
        ours_ms, base_ms, ratio = _compare(ours, base, args.repeats)
        goal = "" if target is None else f"≤ {target:.2f}"
        verdict = "" if target is None else (" ✓" if ratio <= target else " ✗")
        print(
            f"| {name} | {ours_ms:.1f} | {base_name} | {base_ms:.1f} | "
            f"{ratio:.2f}{verdict} | {goal} |"
        )


if __name__ == "__main__":
    main()
