"""Times stable_softmax against each backend's native softmax.

For JAX and PyTorch, side by side in one process per backend, alternating
the two contenders in every repeat, medians of the repeats:

- JAX: `jax.nn.softmax(x)`, and `jax.nn.softmax(x / 0.7, where=mask)`, both
  under `jax.jit` (JAX compiles; an eager JAX call is a compiled call too);
- PyTorch: `torch.softmax(x, -1)`, and `torch.softmax` after
  `masked_fill(~mask, -inf)`, eagerly and under `torch.compile`.

(TensorFlow has its own benchmark, benchmarks/bench_softmax.py.) Run from
the repository root:

    python benchmarks/bench_backends.py            # both backends
    python benchmarks/bench_backends.py --backend jax --repeats 5
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

SHAPE = (2048, 8192)


def _median_ms(fn, sync, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _compare(ours, native, sync, repeats, warmup=3):
    for _ in range(warmup):
        sync(ours())
        sync(native())
    ours_t, native_t = [], []
    for _ in range(repeats):
        ours_t.append(_median_ms(ours, sync, 1))
        native_t.append(_median_ms(native, sync, 1))
    a, b = statistics.median(ours_t), statistics.median(native_t)
    return a, b, a / b


def _cases_jax(x_np, mask_np):
    import jax
    import jax.numpy as jnp

    import keras_softmax

    x, mask = jnp.asarray(x_np), jnp.asarray(mask_np)
    ours = jax.jit(lambda x: keras_softmax.stable_softmax(x))
    native = jax.jit(lambda x: jax.nn.softmax(x, axis=-1))
    ours_m = jax.jit(
        lambda x, m: keras_softmax.stable_softmax(x, mask=m, temperature=0.7)
    )
    native_m = jax.jit(lambda x, m: jax.nn.softmax(x / 0.7, axis=-1, where=m))
    sync = jax.block_until_ready
    return sync, [
        ("jax.jit, no mask, T=1", lambda: ours(x), "jax.nn.softmax", lambda: native(x)),
        (
            "jax.jit, 30% masked, T=0.7",
            lambda: ours_m(x, mask),
            "jax.nn.softmax(x / 0.7, where=mask)",
            lambda: native_m(x, mask),
        ),
    ]


def _cases_torch(x_np, mask_np):
    import torch

    import keras_softmax

    x, mask = torch.from_numpy(x_np), torch.from_numpy(mask_np)

    def native(x):
        return torch.softmax(x, dim=-1)

    def native_masked(x, m):
        return torch.softmax((x / 0.7).masked_fill(~m, float("-inf")), dim=-1)

    def ours(x):
        return keras_softmax.stable_softmax(x)

    def ours_masked(x, m):
        return keras_softmax.stable_softmax(x, mask=m, temperature=0.7)

    cases = [
        ("eager, no mask, T=1", lambda: ours(x), "torch.softmax", lambda: native(x)),
        (
            "eager, 30% masked, T=0.7",
            lambda: ours_masked(x, mask),
            "torch.softmax after masked_fill",
            lambda: native_masked(x, mask),
        ),
    ]
    try:
        c_ours, c_native = torch.compile(ours), torch.compile(native)
        c_ours_m, c_native_m = torch.compile(ours_masked), torch.compile(native_masked)
        c_ours(x), c_native(x), c_ours_m(x, mask), c_native_m(x, mask)
    except Exception as error:  # torch.compile needs a working C++ toolchain
        print(f"torch.compile unavailable: {type(error).__name__}: {error}"[:300])
    else:
        cases += [
            (
                "torch.compile, no mask, T=1",
                lambda: c_ours(x),
                "torch.softmax, compiled",
                lambda: c_native(x),
            ),
            (
                "torch.compile, 30% masked, T=0.7",
                lambda: c_ours_m(x, mask),
                "masked_fill + torch.softmax, compiled",
                lambda: c_native_m(x, mask),
            ),
        ]
    return (lambda out: out), cases


def run_backend(backend, repeats):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(scale=5.0, size=SHAPE).astype("float32")
    mask = rng.random(SHAPE) >= 0.3
    mask[:, 0] = True
    sync, cases = (_cases_jax if backend == "jax" else _cases_torch)(x, mask)
    for name, ours, base_name, base in cases:
        ours_ms, base_ms, ratio = _compare(ours, base, sync, repeats)
        print(
            f"| {backend} | {name} | {ours_ms:.1f} | {base_name} | {base_ms:.1f} | "
            f"{ratio:.2f} |",
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["jax", "torch"])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    if args.backend:
        run_backend(args.backend, args.repeats)
        return
    print(f"float32 {list(SHAPE)}, median of {args.repeats} alternating repeats")
    print()
    print("| backend | case | stable_softmax (ms) | native | native (ms) | ratio |")
    print("|---|---|---:|---|---:|---:|")
    for backend in ("jax", "torch"):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        command = [sys.executable, __file__, "--backend", backend]
        command += ["--repeats", str(args.repeats)]
        subprocess.run(command, env=env, check=True)


if __name__ == "__main__":
    main()
