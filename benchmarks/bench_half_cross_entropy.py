"""A bfloat16 training step of a large-vocabulary loss on JAX: fused or naive.

The step is the loss and the gradients for the hidden states and the
kernel, jitted. Ours multiplies the bfloat16 operands as they are, into
float32 logits, a chunk of tokens at a time; the naive step multiplies them
the same way (`preferred_element_type=float32`) into the whole
`[tokens, vocabulary]` logits, as a bf16 model's head does; a third step
casts the operands to float32 first (how our loss ran before). Time: side
by side in one process, medians (benchmarks/_timing.py); memory: the
compiled program's temporaries (`memory_analysis()`: JAX's peak counter
cannot be reset), on a CPU or a GPU alike. Run from the repository root:

    python benchmarks/bench_half_cross_entropy.py                 # CPU sizes
    python benchmarks/bench_half_cross_entropy.py --tokens 8192 --depth 4096 \
        --vocabulary 131072

The issue's CPU target: at N = 2048, D = 512, V = 32768, at most 0.25x the
naive step's temporaries; on a GPU (D = 4096, V = 131072, N = 8192 and
32768): within 1.2x its time and at most 0.25x its memory.
"""

import argparse
import os

from _timing import step_report
from _timing import step_timings

FUSED, NAIVE, CAST = (
    "linear_cross_entropy, bf16 operands",
    "bf16 matmul into float32 logits + logsumexp",
    "linear_cross_entropy of float32 casts",
)


def _steps(tokens, depth, vocabulary):
    """`{name: jitted step}` and the arguments they take."""
    import jax
    import jax.numpy as jnp

    from keras_softmax import linear_cross_entropy

    keys = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(keys[0], (tokens, depth), "bfloat16")
    w = (jax.random.normal(keys[1], (depth, vocabulary)) / depth**0.5).astype(
        "bfloat16"
    )
    y = jax.random.randint(keys[2], (tokens,), 0, vocabulary)

    def naive(h, w):
        logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
        picked = jnp.take_along_axis(logits, y[:, None], -1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - picked)

    losses = {
        FUSED: lambda h, w: linear_cross_entropy(y, h, w),
        NAIVE: naive,
        CAST: lambda h, w: linear_cross_entropy(
            y, h.astype("float32"), w.astype("float32")
        ),
    }
    steps = {
        name: jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        for name, loss in losses.items()
    }
    return steps, (h, w)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=512)
    parser.add_argument("--vocabulary", type=int, default=32768)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = "jax"
    import jax

    steps, arguments = _steps(args.tokens, args.depth, args.vocabulary)
    memory = {}
    for name, step in steps.items():
        compiled = step.lower(*arguments).compile()
        memory[name] = float(compiled.memory_analysis().temp_size_in_bytes / 2**20)
    timed = {
        name: (lambda step=step: step(*arguments), jax.block_until_ready)
        for name, step in steps.items()
    }
    timings = step_timings(timed, args.rounds)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}: N = {args.tokens}, "
        f"D = {args.depth}, V = {args.vocabulary}, bfloat16 (memory: compiled "
        "temporaries, MiB)"
    )
    for line in step_report(list(steps), timings, memory):
        print(line)


if __name__ == "__main__":
    main()
