"""A bfloat16 training step of a large-vocabulary loss: fused or naive.

The step is the loss and the gradients for the hidden states and the
kernel: jitted on JAX, eager on PyTorch. Ours multiplies the bfloat16
operands as they are, into float32 logits, a chunk of tokens at a time
(PyTorch: where the device has `mm(out_dtype=float32)`, CUDA; on a CPU it
casts them). The naive step makes the whole `[tokens, vocabulary]` logits
as a bf16 model's head does: on JAX, the bf16 product into float32
(`preferred_element_type`); on PyTorch, a bf16 `linear` whose logits are
cast to float32 for `cross_entropy`. PyTorch's own chunked
`F.linear_cross_entropy` runs beside it. A last step casts the operands to
float32 first (how our loss ran before). Time: side by side in one
process, medians (benchmarks/_timing.py). Memory: on JAX the compiled
program's temporaries (`memory_analysis()`: JAX's peak counter cannot be
reset), on a CPU or a GPU alike; on PyTorch the step's extra peak,
allocated on a GPU (`max_memory_allocated`) or RSS on a CPU. Run from the
repository root:

    python benchmarks/bench_half_cross_entropy.py                 # CPU sizes
    python benchmarks/bench_half_cross_entropy.py --tokens 8192 --depth 4096 \
        --vocabulary 131072
    python benchmarks/bench_half_cross_entropy.py --backend torch
    python benchmarks/bench_half_cross_entropy.py --chunk-size 1024  # not the default
    python benchmarks/bench_half_cross_entropy.py --memory-only --tokens 8192 \
        --depth 4096 --vocabulary 131072   # JAX: compiled, not run (any device)

The issue's CPU target: at N = 2048, D = 512, V = 32768, at most 0.25x the
naive step's temporaries (JAX); on a GPU (D = 4096, V = 131072, N = 8192
and 32768): within 1.2x its time and at most 0.25x its memory, on JAX and
on PyTorch.
"""

import argparse
import os

from _memory import torch_extra_peak_mib
from _timing import step_report
from _timing import step_timings

FUSED, NAIVE, CAST = (
    "linear_cross_entropy, bf16 operands",
    "bf16 matmul into float32 logits + logsumexp",
    "linear_cross_entropy of float32 casts",
)
NAIVE_TORCH, TORCH_CHUNKED = (
    "bf16 linear, float32 cross_entropy",
    "torch F.linear_cross_entropy, chunked",
)


def _steps(tokens, depth, vocabulary, chunk_size=None, shapes_only=False):
    """`{name: jitted step}` and the arguments they take: arrays, or with
    `shapes_only` their shapes (enough to compile; nothing is allocated)."""
    import jax
    import jax.numpy as jnp

    from keras_softmax import linear_cross_entropy

    keys = jax.random.split(jax.random.key(0), 3)
    y = jax.random.randint(keys[2], (tokens,), 0, vocabulary)
    if shapes_only:
        h = jax.ShapeDtypeStruct((tokens, depth), "bfloat16")
        w = jax.ShapeDtypeStruct((depth, vocabulary), "bfloat16")
    else:
        h = jax.random.normal(keys[0], (tokens, depth), "bfloat16")
        w = (jax.random.normal(keys[1], (depth, vocabulary)) / depth**0.5).astype(
            "bfloat16"
        )

    def naive(h, w):
        logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
        picked = jnp.take_along_axis(logits, y[:, None], -1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - picked)

    losses = {
        FUSED: lambda h, w: linear_cross_entropy(y, h, w, chunk_size=chunk_size),
        NAIVE: naive,
        CAST: lambda h, w: linear_cross_entropy(
            y, h.astype("float32"), w.astype("float32"), chunk_size=chunk_size
        ),
    }
    steps = {
        name: jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        for name, loss in losses.items()
    }
    return steps, (h, w)


def _torch_steps(tokens, depth, vocabulary, chunk_size=None):
    """`{name: (step, sync)}` of eager PyTorch steps, and the device."""
    import torch
    import torch.nn.functional as F

    from keras_softmax import linear_cross_entropy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)

    def normal(*shape, scale=1.0):
        x = torch.randn(shape, generator=generator, device=device) * scale
        return x.to(torch.bfloat16).requires_grad_()

    h = normal(tokens, depth)
    w = normal(depth, vocabulary, scale=depth**-0.5)
    # PyTorch's functions take the weight as [V, D], Keras' kernel is [D, V].
    w_t = w.detach().t().contiguous().requires_grad_()
    y = torch.randint(0, vocabulary, (tokens,), generator=generator, device=device)
    losses = {
        FUSED: lambda: linear_cross_entropy(y, h, w, chunk_size=chunk_size),
        NAIVE_TORCH: lambda: F.cross_entropy(F.linear(h, w_t).float(), y),
        TORCH_CHUNKED: lambda: F.linear_cross_entropy(
            h, w_t, y, options=torch.nn.LinearCrossEntropyOptions()
        ),
        CAST: lambda: linear_cross_entropy(
            y, h.float(), w.float(), chunk_size=chunk_size
        ),
    }

    def sync(value):
        if device == "cuda":
            torch.cuda.synchronize()
        return float(value)

    def step_of(loss):
        def step():
            for t in (h, w, w_t):
                t.grad = None
            value = loss()
            value.backward()
            return value.detach()

        return step

    return {name: (step_of(loss), sync) for name, loss in losses.items()}, device


def _run_torch(args):
    import torch

    steps, device = _torch_steps(
        args.tokens, args.depth, args.vocabulary, args.chunk_size
    )
    memory = {}
    for name, (step, sync) in steps.items():
        sync(step())  # warm up: kernels, the device's product check
        memory[name] = torch_extra_peak_mib(step, sync)
    timings = step_timings(steps, args.rounds)
    print(
        f"torch {torch.__version__} on {device}: N = {args.tokens}, D = "
        f"{args.depth}, V = {args.vocabulary}, bfloat16{_chunk_note(args)} "
        f"(memory: extra peak {'allocated' if device == 'cuda' else 'RSS'}, MiB)"
    )
    for line in step_report(list(steps), timings, memory):
        print(line)


def _chunk_note(args) -> str:
    return f", chunk_size = {args.chunk_size}" if args.chunk_size else ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=512)
    parser.add_argument("--vocabulary", type=int, default=32768)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument("--backend", choices=("jax", "torch"), default="jax")
    parser.add_argument(
        "--chunk-size", type=int, help="linear_cross_entropy's (default: its own)"
    )
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="JAX: compile and read the temporaries, allocating and timing nothing",
    )
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    if args.backend == "torch":
        if args.memory_only:
            parser.error("--memory-only reads a compiled JAX program: not on torch")
        _run_torch(args)
        return
    import jax

    steps, arguments = _steps(
        args.tokens, args.depth, args.vocabulary, args.chunk_size, args.memory_only
    )
    memory = {}
    for name, step in steps.items():
        compiled = step.lower(*arguments).compile()
        memory[name] = float(compiled.memory_analysis().temp_size_in_bytes / 2**20)
    timings = None
    if not args.memory_only:
        timed = {
            name: (lambda step=step: step(*arguments), jax.block_until_ready)
            for name, step in steps.items()
        }
        timings = step_timings(timed, args.rounds)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}: N = {args.tokens}, "
        f"D = {args.depth}, V = {args.vocabulary}, bfloat16{_chunk_note(args)} "
        "(memory: compiled temporaries, MiB)"
    )
    for line in step_report(list(steps), timings, memory):
        print(line)


if __name__ == "__main__":
    main()
