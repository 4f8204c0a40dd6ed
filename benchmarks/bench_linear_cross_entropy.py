"""One training step of a large-vocabulary head: fused or through the logits.

A step is the loss and the gradients for the hidden states, the kernel and
the bias, as each backend runs a training step: a `tf.function` (how `fit`
runs on a CPU), `jax.jit`, PyTorch eagerly. The naive step builds the
`[tokens, vocabulary]` logits and applies the backend's own loss (Keras'
`SparseCategoricalCrossentropy(from_logits=True)`, or PyTorch's
`cross_entropy`); on PyTorch, its chunked `F.linear_cross_entropy` runs
too. Time: all side by side in one process, medians (benchmarks/_timing.py);
memory: the extra peak RSS of one step, each contender in a fresh process.
Run from the repository root:

    python benchmarks/bench_linear_cross_entropy.py                   # TF, N = 4096
    python benchmarks/bench_linear_cross_entropy.py --tokens 16384 --memory-only
    python benchmarks/bench_linear_cross_entropy.py --backend jax     # N = 2048
    python benchmarks/bench_linear_cross_entropy.py --backend torch

The issue's sizes: D = 512, V = 131072 on TensorFlow; D = 256, V = 65536
on JAX and PyTorch.
"""

import argparse
import os

from _memory import extra_peak_mib
from _memory import in_fresh_process
from _timing import step_report
from _timing import step_timings

SIZES = {  # backend: (tokens, depth, vocabulary)
    "tensorflow": (4096, 512, 131072),
    "jax": (2048, 256, 65536),
    "torch": (2048, 256, 65536),
}
FUSED, NAIVE, TORCH_CHUNKED = (
    "linear_cross_entropy",
    "logits + the backend's loss",
    "torch F.linear_cross_entropy, chunked",
)


def _contenders(backend):
    return (FUSED, NAIVE, TORCH_CHUNKED) if backend == "torch" else (FUSED, NAIVE)


def _step(backend, which, tokens, depth, vocabulary, chunk_size=None):
    """`(step, sync)`: one training step on a fixed problem, and its wait."""
    import keras

    import keras_softmax

    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if backend == "tensorflow":
        import tensorflow as tf

        # Made by the backend itself: no NumPy copy raises the peak beforehand.
        tf.random.set_seed(0)
        h = tf.random.normal((tokens, depth))
        w = tf.Variable(tf.random.normal((depth, vocabulary)) / depth**0.5)
        b = tf.Variable(tf.zeros((vocabulary,)))
        y = tf.random.uniform((tokens,), 0, vocabulary, dtype=tf.int32)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch(h)
                if which == FUSED:
                    value = keras_softmax.linear_cross_entropy(
                        y, h, w, b, chunk_size=chunk_size
                    )
                else:
                    value = keras_loss(y, tf.matmul(h, w) + b)
            return value, tape.gradient(value, [h, w, b])

        return step, lambda result: result[0].numpy()
    if backend == "jax":
        import jax

        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        h = jax.random.normal(keys[0], (tokens, depth))
        w = jax.random.normal(keys[1], (depth, vocabulary)) / depth**0.5
        b = jax.numpy.zeros((vocabulary,))
        y = jax.random.randint(keys[2], (tokens,), 0, vocabulary)

        def loss(h, w, b):
            if which == FUSED:
                return keras_softmax.linear_cross_entropy(
                    y, h, w, b, chunk_size=chunk_size
                )
            return keras_loss(y, h @ w + b)

        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        return (lambda: grad(h, w, b)), jax.block_until_ready
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, depth, generator=generator, requires_grad=True)
    kernel = torch.randn(depth, vocabulary, generator=generator) / depth**0.5
    w = kernel.requires_grad_()
    b = torch.zeros(vocabulary, requires_grad=True)
    y = torch.randint(0, vocabulary, (tokens,), generator=generator)
    # PyTorch's functions take the weight as [V, D], Keras' kernel is [D, V].
    w_t = kernel.detach().t().contiguous().requires_grad_()

    def step():
        for t in (h, w, b, w_t):
            t.grad = None
        if which == FUSED:
            value = keras_softmax.linear_cross_entropy(
                y, h, w, b, chunk_size=chunk_size
            )
        elif which == NAIVE:
            value = F.cross_entropy(F.linear(h, w_t, b), y)
        else:
            value = F.linear_cross_entropy(
                h, w_t, y, linear_bias=b, options=torch.nn.LinearCrossEntropyOptions()
            )
        value.backward()
        return value

    return step, lambda result: float(result.detach())


def peak_memory(backend, which, tokens, depth, vocabulary, chunk_size=None):
    """Extra peak RSS, in MiB, of one step, after a small one has warmed up.

    The problem is made before the first reading; the step's first call
    traces or compiles it, which costs little beside its tensors.
    """
    # The small step's tensors stay alive: memory they freed could
    # otherwise be reused unseen.
    small, sync = _step(backend, which, 64, depth, vocabulary, chunk_size)
    sync(small())
    step, sync = _step(backend, which, tokens, depth, vocabulary, chunk_size)
    return extra_peak_mib(step, sync)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=SIZES, default="tensorflow")
    parser.add_argument("--tokens", type=int, help="N (default: the issue's)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds")
    parser.add_argument(
        "--chunk-size", type=int, help="linear_cross_entropy's (default: its own)"
    )
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true", help="skip the timing")
    args = parser.parse_args(argv)
    tokens, depth, vocabulary = SIZES[args.backend]
    tokens = args.tokens or tokens
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.memory_of:
        print(
            peak_memory(
                args.backend, args.memory_of, tokens, depth, vocabulary, args.chunk_size
            )
        )
        return
    contenders = _contenders(args.backend)
    chunk = f", chunk_size = {args.chunk_size}" if args.chunk_size else ""
    print(
        f"{args.backend}: N = {tokens}, D = {depth}, V = {vocabulary}, float32{chunk}"
    )
    memory = {}
    for which in contenders:
        arguments = ["--backend", args.backend, "--tokens", str(tokens)]
        arguments += ["--memory-of", which]
        if args.chunk_size:
            arguments += ["--chunk-size", str(args.chunk_size)]
        memory[which] = in_fresh_process(__file__, arguments)
        if isinstance(memory[which], str):  # the naive step at N = 16384
            print(f"{which}: {memory[which]}")
    timings = None
    if not args.memory_only:
        steps = {
            w: _step(args.backend, w, tokens, depth, vocabulary, args.chunk_size)
            for w in contenders
        }
        timings = step_timings(steps, args.rounds)
    for line in step_report(contenders, timings, memory):
        print(line)


if __name__ == "__main__":
    main()
