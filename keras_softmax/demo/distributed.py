"""The demo classifier trained data-parallel over several devices.

On TensorFlow it trains under `tf.distribute.MirroredStrategy` over logical
CPU devices; on JAX under `keras.distribution.DataParallel`, which needs
the host split into devices before JAX starts:

    python -m keras_softmax.demo.distributed --devices 2
    XLA_FLAGS=--xla_force_host_platform_device_count=2 KERAS_BACKEND=jax \\
        python -m keras_softmax.demo.distributed --devices 2

It trains the same network on one device first and reports both test
accuracies; it exits with 1 if the data-parallel one falls more than 0.01
below, or under 0.95.
"""

import argparse
import contextlib
import sys

import keras

from keras_softmax import _extras
from keras_softmax.demo import cli
from keras_softmax.demo import digits

# Each device must get a whole share of every batch of 32.
DEVICE_COUNTS = (2, 4, 8, 16, 32)


def data_parallel(devices: int):
    """A context in which models are built and trained over `devices`.

    On TensorFlow, call it before any TensorFlow op has run: logical
    devices can only be set up before the runtime starts.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        tf = _extras.require("tensorflow", "tf.distribute")
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * devices
        )
        names = [f"/cpu:{i}" for i in range(devices)]
        return tf.distribute.MirroredStrategy(names).scope()
    if backend == "jax":
        found = keras.distribution.list_devices()
        if len(found) < devices:
            raise RuntimeError(
                f"JAX sees {len(found)} device(s), not {devices}: start Python "
                f"with XLA_FLAGS=--xla_force_host_platform_device_count={devices}"
            )
        distribution = keras.distribution.DataParallel(devices=found[:devices])
        return _distribution_scope(distribution)
    raise RuntimeError(
        f"data-parallel training is set up for TensorFlow and JAX, not {backend}"
    )


@contextlib.contextmanager
def _distribution_scope(distribution):
    keras.distribution.set_distribution(distribution)
    try:
        yield
    finally:
        keras.distribution.set_distribution(None)


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)

    try:
        scope = data_parallel(args.devices)
    except RuntimeError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    # JAX shards every batch evenly, the last one included: keep a multiple
    # of the device count in each split (the batch size, 32, is one too).
    data = tuple(
        (x[: len(x) - len(x) % args.devices], y[: len(y) - len(y) % args.devices])
        for x, y in digits.load_digits(args.seed)
    )
    x_test, y_test = data[2]
    accuracies = {}
    for name, context in (("1 device", contextlib.nullcontext()), ("parallel", scope)):
        with context:
            model = digits.build_model("stable_softmax", args.seed)
            digits.train(model, data, args.epochs, args.seed, verbose=0)
        probs = model.predict(x_test, verbose=0)
        accuracies[name] = digits.scores(probs, y_test)["accuracy"]

    single, parallel = accuracies["1 device"], accuracies["parallel"]
    print(
        f"{keras.backend.backend()} backend, {args.epochs} epochs, seed "
        f"{args.seed}: test accuracy {single:.4f} on 1 device, {parallel:.4f} "
        f"data-parallel over {args.devices} devices"
    )
    return 0 if parallel >= 0.95 and parallel >= single - 0.01 else 1


def _parser():
    parser = cli.training_parser(
        prog="python -m keras_softmax.demo.distributed",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--devices",
        type=_device_count,
        default=2,
        help="how many devices to train over: 2, 4, 8, 16 or 32 (default 2)",
    )
    return parser


def _device_count(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value not in DEVICE_COUNTS:
        raise argparse.ArgumentTypeError(f"expected 2, 4, 8, 16 or 32, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
