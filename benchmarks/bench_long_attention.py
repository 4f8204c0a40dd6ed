"""Causal attention over a long sequence: one forward and backward step.

The issue's case: B = 1, 8 heads of 64, float32, causal; the step is the
outputs and the gradients of `sum(outputs ** 2) / 2` for the queries, keys
and values, as each backend runs a training step: a `tf.function` without
XLA (how `fit` runs on a CPU), `jax.jit`, PyTorch eagerly. Contenders:
`keras_softmax.dot_product_attention` as it chooses (at these lengths, its
blocks; on PyTorch, PyTorch's SDPA), Keras' `dot_product_attention`, and on
PyTorch, PyTorch's `scaled_dot_product_attention`. Time: side by side in
one process, medians (benchmarks/_timing.py); memory: the extra peak RSS
of one step, each contender in a fresh process (benchmarks/_memory.py).
Run from the repository root:

    python benchmarks/bench_long_attention.py                    # TF, T = 4096
    python benchmarks/bench_long_attention.py --length 16384 --memory-only
    python benchmarks/bench_long_attention.py --backend jax
    python benchmarks/bench_long_attention.py --backend torch
"""

import argparse
import os

from _memory import in_fresh_process
from _memory import peak_rss_mib
from _timing import step_report
from _timing import step_timings

OURS, KERAS, TORCH = (
    "keras_softmax.dot_product_attention",
    "keras.ops.dot_product_attention",
    "torch scaled_dot_product_attention",
)
# Ours at any length (notebook 05 plots its memory against Keras').
BLOCKS = "blocks"
BACKENDS = ("tensorflow", "jax", "torch")
HEADS, HEAD_SIZE = 8, 64


def _contenders(backend):
    return (OURS, KERAS, TORCH) if backend == "torch" else (OURS, KERAS)


def _attention(which):
    import keras

    import keras_softmax

    if which in (OURS, BLOCKS):
        return lambda q, k, v: keras_softmax.dot_product_attention(
            q, k, v, is_causal=True, flash_attention=True if which == BLOCKS else None
        )
    if which == KERAS:
        return lambda q, k, v: keras.ops.dot_product_attention(q, k, v, is_causal=True)
    import torch

    def sdpa(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2)

    return sdpa


def _step(backend, which, length):
    """`(step, sync)`: one forward and backward step, and its wait."""
    attention = _attention(which)
    shape = (1, length, HEADS, HEAD_SIZE)
    if backend == "tensorflow":
        import tensorflow as tf

        # Made by the backend itself: no NumPy copy raises the peak beforehand.
        tf.random.set_seed(0)
        q, k, v = (tf.random.normal(shape) for _ in range(3))

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch([q, k, v])
                loss = tf.reduce_sum(tf.square(attention(q, k, v))) / 2
            return loss, tape.gradient(loss, [q, k, v])

        return step, lambda result: result[0].numpy()
    if backend == "jax":
        import jax

        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        q, k, v = (jax.random.normal(key, shape) for key in keys)

        def loss(q, k, v):
            return (attention(q, k, v) ** 2).sum() / 2

        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        return (lambda: grad(q, k, v)), jax.block_until_ready
    import torch

    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(shape, generator=generator, requires_grad=True) for _ in range(3)
    )

    def step():
        for t in (q, k, v):
            t.grad = None
        loss = (attention(q, k, v) ** 2).sum() / 2
        loss.backward()
        return loss

    return step, lambda result: float(result.detach())


def peak_memory(backend, which, lengths):
    """Extra peak RSS, in MiB, of one step at each of the ascending `lengths`.

    Each over the peak before the first, after a short step has warmed up:
    a longer step needs more, so the peak after it is its own.
    """
    # The short step's tensors stay alive: memory they freed could
    # otherwise be reused unseen.
    short, sync = _step(backend, which, 256)
    sync(short())
    start = peak_rss_mib()
    peaks = []
    for length in lengths:
        step, sync = _step(backend, which, length)
        sync(step())
        peaks.append(peak_rss_mib() - start)
    return peaks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="tensorflow")
    parser.add_argument("--length", type=int, default=4096, help="T (default 4096)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument(
        "--lengths",
        help="with --memory-of: ascending lengths, comma-separated (one line each)",
    )
    parser.add_argument("--memory-only", action="store_true", help="skip the timing")
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.memory_of:
        lengths = [int(n) for n in (args.lengths or str(args.length)).split(",")]
        for length, peak in zip(
            lengths, peak_memory(args.backend, args.memory_of, lengths), strict=True
        ):
            print(length, peak)
        return
    contenders = _contenders(args.backend)
    print(
        f"{args.backend}: causal, B = 1, T = S = {args.length}, "
        f"{HEADS} heads of {HEAD_SIZE}, float32, forward and backward"
    )
    memory = {}
    for which in contenders:
        arguments = ["--backend", args.backend, "--length", str(args.length)]
        memory[which] = in_fresh_process(__file__, arguments + ["--memory-of", which])
        if isinstance(memory[which], str):
            print(f"{which}: {memory[which]}")
    timings = None
    if not args.memory_only:
        steps = {w: _step(args.backend, w, args.length) for w in contenders}
        timings = step_timings(steps, args.rounds)
    for line in step_report(contenders, timings, memory):
        print(line)


if __name__ == "__main__":
    main()
