"""One training step of a large-vocabulary head: fused or through the logits.

A step is the loss and the gradients for the hidden states, the kernel and
the bias, in a `tf.function` (how `fit` runs on a CPU). The naive step is
Keras' own: the `[tokens, vocabulary]` logits, then
`SparseCategoricalCrossentropy(from_logits=True)`. Time: both side by side
in one process (benchmarks/_timing.py); memory: the extra peak RSS of one
step, each contender in a fresh process. Run from the repository root:

    python benchmarks/bench_linear_cross_entropy.py                 # N = 4096
    python benchmarks/bench_linear_cross_entropy.py --tokens 16384  # memory only

The issue's sizes: D = 512, V = 131072.
"""

import argparse
import os
import resource
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from _timing import interleaved_timings  # noqa: E402

import keras_softmax  # noqa: E402

DEPTH, VOCABULARY = 512, 131072
CONTENDERS = ("linear_cross_entropy", "logits + Keras' loss")


def _problem(tokens):
    # Made by TensorFlow itself: no NumPy copy raises the peak beforehand.
    tf.random.set_seed(0)
    hidden = tf.random.normal((tokens, DEPTH))
    kernel = tf.Variable(tf.random.normal((DEPTH, VOCABULARY)) / DEPTH**0.5)
    bias = tf.Variable(tf.zeros((VOCABULARY,)))
    labels = tf.random.uniform((tokens,), 0, VOCABULARY, dtype=tf.int32)
    return hidden, kernel, bias, labels


def _step(which, kernel, bias):
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss(hidden, labels):
        if which == CONTENDERS[0]:
            return keras_softmax.linear_cross_entropy(labels, hidden, kernel, bias)
        return keras_loss(labels, tf.matmul(hidden, kernel) + bias)

    @tf.function
    def step(hidden, labels):
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            value = loss(hidden, labels)
        return value, tape.gradient(value, [hidden, kernel, bias])

    return step


def peak_memory(which, tokens):
    """Extra peak RSS, in MiB, of one step after a step that traced it."""
    hidden, kernel, bias, labels = _problem(tokens)
    step = _step(which, kernel, bias)
    step(hidden[:64], labels[:64])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    value, _ = step(hidden, labels)
    value.numpy()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="N (default 4096)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds")
    parser.add_argument("--memory-of", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true", help="skip the timing")
    args = parser.parse_args(argv)
    if args.memory_of:
        print(peak_memory(args.memory_of, args.tokens))
        return
    print(f"N = {args.tokens}, D = {DEPTH}, V = {VOCABULARY}, float32, tf.function")
    memory = {}
    for which in CONTENDERS:
        result = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-of",
                which,
                "--tokens",
                str(args.tokens),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        memory[which] = float(result.stdout.split()[-1])
    if not args.memory_only:
        hidden, kernel, bias, labels = _problem(args.tokens)
        steps = {which: _step(which, kernel, bias) for which in CONTENDERS}
        timings = interleaved_timings(
            {w: (lambda s=s: s(hidden, labels)) for w, s in steps.items()},
            sync=lambda result: result[0].numpy(),
            rounds=args.rounds,
            warmup=1,
        )
    print("| step | wall s | CPU s | extra peak MiB |")
    print("|---|---|---|---|")
    for which in CONTENDERS:
        wall = "" if args.memory_only else f"{timings.wall[which]:.2f}"
        cpu = "" if args.memory_only else f"{timings.cpu[which]:.2f}"
        print(f"| {which} | {wall} | {cpu} | {memory[which]:.0f} |")
    if not args.memory_only:
        ratio = timings.wall[CONTENDERS[0]] / timings.wall[CONTENDERS[1]]
        print(f"\ntime ratio (fused / naive): {ratio:.2f}")


if __name__ == "__main__":
    main()
