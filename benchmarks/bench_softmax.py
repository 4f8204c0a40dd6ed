"""Times stable_softmax against TensorFlow's and Keras' own, on every TF path.

The paths Keras users run on a CPU: eager calls; a `tf.function` without
XLA (how `fit`, `predict` and `evaluate` run where there is no GPU); XLA
(`jit_compile=True`); gradients in a `tf.function`; `predict` with a large
softmax head; a loop of small eager calls (sampling); and the peak memory
of log-softmax in a `tf.function`. Each case runs its contenders side by
side in one process, in alternation, and reports the medians and their
ratio (see benchmarks/_timing.py). Run from the repository root:

    python benchmarks/bench_softmax.py               # every case, 11 rounds
    python benchmarks/bench_softmax.py --only graph  # cases whose name has "graph"
    python benchmarks/bench_softmax.py --rounds 5    # a quick look

(JAX and PyTorch: benchmarks/bench_backends.py.)
"""

import argparse
import os
import platform
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _memory import extra_peak_mib  # noqa: E402
from _memory import in_fresh_process  # noqa: E402
from _timing import TABLE_HEADER  # noqa: E402
from _timing import interleaved_medians  # noqa: E402
from _timing import logits_and_mask  # noqa: E402
from _timing import ratio_row  # noqa: E402
from _timing import small_calls_row  # noqa: E402

import keras_softmax  # noqa: E402

BIG = (2048, 8192)
WIDE = (8, 128, 50000)
SMALL = (64, 128)
MEMORY_SHAPE = (1024, 262144)


def _data(shape, seed=0):
    return tuple(tf.constant(a) for a in logits_and_mask(shape, seed))


def _sync(result):
    return [t.numpy() for t in tf.nest.flatten(result)]


def _keras_masked():
    layer = keras.layers.Softmax()
    return lambda x, m: layer(x / 0.7, mask=m)


def _ours_masked(x, m):
    return keras_softmax.stable_softmax(x, mask=m, temperature=0.7)


# A learned temperature, as StableSoftmax(trainable_temperature=True) holds.
_LEARNED_T = tf.Variable(0.7)


def _keras_learned():
    layer = keras.layers.Softmax()
    return lambda x, m: layer(x / _LEARNED_T, mask=m)


def _ours_learned(x, m):
    return keras_softmax.stable_softmax(x, mask=m, temperature=_LEARNED_T)


def _gradient_of(fn, *variables):
    """The gradient of sum(fn(x, ...) ** 2) in x, and in `variables`."""

    def gradient(*args):
        with tf.GradientTape() as tape:
            tape.watch(args[0])
            y = fn(*args)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [args[0], *variables])

    return gradient


def _floor_plain(x):
    """What the guarantees cost at least: the fused kernel and one read."""
    y = tf.nn.softmax(x)
    return y, tf.reduce_sum(y, axis=-1)


def _floor_masked(x, m):
    """The passes an exact masked, tempered softmax needs, in plain TF."""
    z = tf.where(m, x, -np.inf)
    top = tf.reduce_max(z, axis=-1, keepdims=True)
    return tf.nn.softmax((z - top) / 0.7), tf.reduce_max(x)


def timing_cases():
    """`(name, ours, baseline name, baseline, target, arguments)` per case."""
    graph = tf.function
    xla = lambda fn: tf.function(fn, jit_compile=True)  # noqa: E731
    ours, native = keras_softmax.stable_softmax, tf.nn.softmax
    big, big_mask = _data(BIG)
    wide, _ = _data(WIDE)
    small, _ = _data(SMALL)
    masked = "keras.layers.Softmax()(x / 0.7, mask)"
    return [
        ("eager, plain", ours, "tf.nn.softmax", native, 1.15, (big,)),
        (
            "eager, masked, T = 0.7",
            _ours_masked,
            masked,
            _keras_masked(),
            0.85,
            (big, big_mask),
        ),
        ("graph, plain", graph(ours), "tf.nn.softmax", graph(native), 1.15, (big,)),
        (
            "graph, plain, [8, 128, 50000]",
            graph(ours),
            "tf.nn.softmax",
            graph(native),
            1.15,
            (wide,),
        ),
        (
            "graph, plain, [64, 128]",
            graph(ours),
            "tf.nn.softmax",
            graph(native),
            1.5,
            (small,),
        ),
        (
            "graph, log-softmax",
            graph(keras_softmax.stable_log_softmax),
            "tf.nn.log_softmax",
            graph(tf.nn.log_softmax),
            1.15,
            (big,),
        ),
        (
            "graph, masked, T = 0.7",
            graph(_ours_masked),
            masked,
            graph(_keras_masked()),
            1.1,
            (big, big_mask),
        ),
        (
            "graph gradient, plain",
            graph(_gradient_of(ours)),
            "tf.nn.softmax",
            graph(_gradient_of(native)),
            1.2,
            (big,),
        ),
        (
            "graph gradient, masked, T = 0.7",
            graph(_gradient_of(_ours_masked)),
            masked,
            graph(_gradient_of(_keras_masked())),
            1.1,
            (big, big_mask),
        ),
        (
            "graph gradient, masked, learned T",
            graph(_gradient_of(_ours_learned, _LEARNED_T)),
            "keras.layers.Softmax()(x / t, mask)",
            graph(_gradient_of(_keras_learned(), _LEARNED_T)),
            1.1,
            (big, big_mask),
        ),
        (
            "graph, floor: tf.nn.softmax and one read of its output",
            graph(_floor_plain),
            "tf.nn.softmax",
            graph(native),
            None,
            (big,),
        ),
        (
            "graph, floor: where, max, subtract, divide, softmax, max of x",
            graph(_floor_masked),
            masked,
            graph(_keras_masked()),
            None,
            (big, big_mask),
        ),
        ("XLA, plain", xla(ours), "tf.nn.softmax", xla(native), 1.05, (big,)),
        (
            "XLA, masked, T = 0.7",
            xla(_ours_masked),
            masked,
            xla(_keras_masked()),
            1.05,
            (big, big_mask),
        ),
    ]


def predict_case(rounds):
    """`model.predict` with a Dense(32000) head, stable against built-in."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1024, 128)).astype("float32")
    models = {}
    for activation in ("stable_softmax", "softmax"):
        keras.utils.set_random_seed(0)
        models[activation] = keras.Sequential(
            [keras.Input((128,)), keras.layers.Dense(32000, activation=activation)]
        )
    times = interleaved_medians(
        {
            name: (lambda m=m: m.predict(x, batch_size=128, verbose=0))
            for name, m in models.items()
        },
        sync=lambda out: out,
        rounds=rounds,
    )
    return ratio_row(
        "predict, Dense(32000) head, 1024 rows",
        times["stable_softmax"],
        '`"softmax"`',
        times["softmax"],
        1.05,
    )


def small_calls_case(rounds):
    x = _data((1, 32000))[0]
    return small_calls_row(
        keras_softmax.stable_softmax, tf.nn.softmax, "tf.nn.softmax", x, _sync, rounds
    )


def peak_memory(which, shape):
    """Extra peak RSS of one `tf.function` log-softmax call, ÷ the input size."""
    # Made by TensorFlow itself, so no NumPy copy raises the peak beforehand.
    x = tf.random.normal(shape)
    fn = tf.function(
        keras_softmax.stable_log_softmax if which == "ours" else tf.nn.log_softmax
    )
    fn(tf.constant(np.zeros((2, 3), "float32")))  # trace on a small input
    # (Reading one element waits for the result without copying it.)
    peak = extra_peak_mib(lambda: fn(x), lambda out: out[0, 0].numpy())
    return peak * 2**20 / (np.prod(shape) * 4)


def memory_case():
    """Each contender in a fresh process, so neither sees the other's peak."""
    ratios = {}
    for which in ("ours", "native"):
        ratios[which] = in_fresh_process(__file__, ["--memory-of", which])
        if isinstance(ratios[which], str):
            raise RuntimeError(f"measuring {which}: {ratios[which]}")
    verdict = " ✓" if ratios["ours"] <= 1.1 else " ✗"
    return (
        f"| graph log-softmax, extra peak RSS ÷ input size, {list(MEMORY_SHAPE)} "
        f"| {ratios['ours']:.2f}{verdict} | tf.nn.log_softmax | "
        f"{ratios['native']:.2f} | | ≤ 1.1 |"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=11, help="rounds per case (default 11)"
    )
    parser.add_argument(
        "--only", default="", help="run only the cases whose name contains this"
    )
    parser.add_argument(
        "--memory-of", choices=["ours", "native"], help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.memory_of:
        print(peak_memory(args.memory_of, MEMORY_SHAPE))
        return

    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"float32, median of {args.rounds} interleaved rounds"
    )
    print()
    print(TABLE_HEADER)
    for name, ours, base_name, base, target, data in timing_cases():
        if args.only not in name:
            continue
        times = interleaved_medians(
            {
                "ours": lambda ours=ours, data=data: ours(*data),
                "base": lambda base=base, data=data: base(*data),
            },
            sync=_sync,
            rounds=args.rounds,
        )
        print(ratio_row(name, times["ours"], base_name, times["base"], target))
        sys.stdout.flush()
    if args.only in "predict, Dense(32000) head":
        print(predict_case(args.rounds), flush=True)
    if args.only in "100 eager calls":
        print(small_calls_case(args.rounds), flush=True)
    if args.only in "graph log-softmax memory":
        print(memory_case(), flush=True)


if __name__ == "__main__":
    main()
