"""Times stable_softmax against JAX's and PyTorch's own softmax.

The paths Keras users run there: JAX always compiles (`jax.jit`); Keras on
PyTorch runs eagerly, and `torch.compile` compiles. Each case runs its
contenders side by side in one process per backend, in alternation, and
reports the medians and their ratio (see benchmarks/_timing.py):

- JAX: `jax.nn.softmax(x)`, and `jax.nn.softmax(x / 0.7, where=mask)`;
- PyTorch: `torch.softmax(x, -1)`, and `torch.softmax` after
  `(x / 0.7).masked_fill(~mask, -inf)`, eagerly and under `torch.compile`,
  plus a loop of small eager calls.

(TensorFlow: benchmarks/bench_softmax.py.) Run from the repository root:

    python benchmarks/bench_backends.py                 # both backends
    python benchmarks/bench_backends.py --backend jax --rounds 5
"""

import argparse
import os
import subprocess
import sys

from _memory import extra_peak_mib
from _memory import in_fresh_process
from _timing import TABLE_HEADER
from _timing import interleaved_medians
from _timing import logits_and_mask
from _timing import ratio_row
from _timing import small_calls_row

SHAPES = [(2048, 8192), (8, 128, 50000), (64, 128)]
MASKED_SHAPE = (2048, 8192)


def _ours(x):
    import keras_softmax

    return keras_softmax.stable_softmax(x)


def _ours_masked(x, m):
    import keras_softmax

    return keras_softmax.stable_softmax(x, mask=m, temperature=0.7)


def _handled(x):
    import jax
    import jax.numpy as jnp

    top = jnp.max(jax.lax.stop_gradient(x), -1, keepdims=True)
    exps = jnp.exp(x - top)
    total = jnp.sum(exps, -1, keepdims=True)
    special = jnp.where(top == -jnp.inf, 0.0, jnp.nan)
    return jnp.where(jnp.isfinite(top), exps / total, special)


def jax_cases():
    import jax
    import jax.numpy as jnp

    ours, ours_masked = jax.jit(_ours), jax.jit(_ours_masked)
    native = jax.jit(lambda x: jax.nn.softmax(x, axis=-1))
    native_masked = jax.jit(lambda x, m: jax.nn.softmax(x / 0.7, axis=-1, where=m))
    cases = []
    for shape in SHAPES:
        x = jnp.asarray(logits_and_mask(shape)[0])
        cases.append((f"jax.jit, plain, {list(shape)}", ours, native, (x,), 1.05))
    x, mask = map(jnp.asarray, logits_and_mask(MASKED_SHAPE))
    cases.append(
        ("jax.jit, masked, T = 0.7", ours_masked, native_masked, (x, mask), 1.0)
    )
    # What the exact handling of special slices costs under XLA: the plain
    # formula with it (NaN and +inf slices NaN, empty slices 0; XLA's exp
    # does not carry a NaN, so it is added), against jax.nn.softmax.
    cases.append(
        (
            "jax.jit, floor: the formula with special slices handled",
            jax.jit(_handled),
            native,
            (x,),
            None,
        )
    )
    names = ("jax.nn.softmax", "jax.nn.softmax(x / 0.7, where=mask)")
    return jax.block_until_ready, cases, names


def _floor_plain(x):
    """What the guarantees cost at least: the fused kernel and one read."""
    import torch

    y = torch.softmax(x, dim=-1)
    return y, y.sum(dim=-1)


def _floor_masked(x, m):
    """The passes an exact masked, tempered softmax needs, in plain PyTorch."""
    import torch

    z = x.masked_fill(~m, float("-inf"))
    top = z.amax(dim=-1, keepdim=True)
    return torch.softmax((z - top) / 0.7, dim=-1), x.amax()


def torch_cases():
    import torch

    def native(x):
        return torch.softmax(x, dim=-1)

    def native_masked(x, m):
        return torch.softmax((x / 0.7).masked_fill(~m, float("-inf")), dim=-1)

    cases = []
    for shape in SHAPES:
        x = torch.from_numpy(logits_and_mask(shape)[0])
        cases.append((f"eager, plain, {list(shape)}", _ours, native, (x,), 1.1))
    x, mask = map(torch.from_numpy, logits_and_mask(MASKED_SHAPE))
    cases.append(
        ("eager, masked, T = 0.7", _ours_masked, native_masked, (x, mask), 1.0)
    )
    cases += [
        (
            "eager, floor: softmax and one read of its output",
            _floor_plain,
            native,
            (x,),
            None,
        ),
        (
            "eager, floor: where, max, subtract, divide, softmax, max of x",
            _floor_masked,
            native_masked,
            (x, mask),
            None,
        ),
    ]
    try:
        compiled = [
            torch.compile(f) for f in (_ours, native, _ours_masked, native_masked)
        ]
        compiled[0](x), compiled[1](x), compiled[2](x, mask), compiled[3](x, mask)
    except Exception as error:  # torch.compile needs a working C++ toolchain
        print(f"torch.compile unavailable: {type(error).__name__}: {error}"[:300])
    else:
        cases += [
            ("torch.compile, plain", compiled[0], compiled[1], (x,), 1.1),
            (
                "torch.compile, masked, T = 0.7",
                compiled[2],
                compiled[3],
                (x, mask),
                1.1,
            ),
        ]
    names = ("torch.softmax", "masked_fill + torch.softmax")
    return (lambda out: out), cases, names


# bfloat16 on PyTorch (issue 28): its fused kernels accumulate in float32,
# so ours runs on the bfloat16 tensor itself, with no float32 copy.
HALF_SHAPE = (4096, 16384)


def _half_data(masked):
    """bfloat16 logits of scale 5 and a mask keeping 70%, filled a block of
    rows at a time, so that no float32 copy raises the peak before a call."""
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.empty(HALF_SHAPE, dtype=torch.bfloat16)
    mask = torch.empty(HALF_SHAPE, dtype=torch.bool)
    for start in range(0, HALF_SHAPE[0], 256):
        rows = slice(start, start + 256)
        shape = (min(256, HALF_SHAPE[0] - start), HALF_SHAPE[1])
        x[rows] = torch.randn(shape, generator=generator) * 5
        mask[rows] = torch.rand(shape, generator=generator) >= 0.3
    mask[:, 0] = True
    return (x, mask) if masked else (x,)


def _half_contenders():
    import torch

    import keras_softmax

    return {
        "ours": lambda x: keras_softmax.stable_softmax(x),
        "native": lambda x: torch.softmax(x, dim=-1),
        "ours masked": lambda x, m: keras_softmax.stable_softmax(x, mask=m),
        "native masked": lambda x, m: torch.softmax(
            x.masked_fill(~m, float("-inf")), dim=-1
        ),
    }


def half_cases():
    """Time rows: bfloat16 against `torch.softmax`, plain and masked."""
    fns = _half_contenders()
    plain, masked = _half_data(False), _half_data(True)
    return [
        (
            f"eager, bfloat16, {list(HALF_SHAPE)}",
            fns["ours"],
            fns["native"],
            plain,
            1.3,
        ),
        (
            "eager, bfloat16, masked",
            fns["ours masked"],
            fns["native masked"],
            masked,
            1.3,
        ),
    ]


def half_memory_rows():
    """Extra peak RSS of one call, each contender in a fresh process."""
    rows = []
    for case in ("", " masked"):
        mib = {}
        for who in ("ours", "native"):
            mib[who] = in_fresh_process(__file__, ["--half-memory-of", who + case])
            if isinstance(mib[who], str):
                raise RuntimeError(f"measuring {who}{case}: {mib[who]}")
        ratio = mib["ours"] / mib["native"]
        verdict = " ✓" if ratio <= 1.2 else " ✗"
        baseline = "masked_fill + torch.softmax" if case else "torch.softmax"
        rows.append(
            f"| torch: eager, bfloat16{case}, extra peak RSS (MiB) "
            f"| {mib['ours']:.0f} | {baseline} | {mib['native']:.0f} "
            f"| {ratio:.2f}{verdict} | ≤ 1.2 |"
        )
    return rows


def half_peak_mib(which):
    fn = _half_contenders()[which]
    data = _half_data("masked" in which)
    return extra_peak_mib(lambda: fn(*data), lambda out: out)


def small_calls_case(rounds):
    """A sampling loop on PyTorch: eager calls on [1, 32000]."""
    import torch

    x = torch.from_numpy(logits_and_mask((1, 32000))[0])
    native = lambda v: torch.softmax(v, dim=-1)  # noqa: E731
    return small_calls_row(_ours, native, "torch.softmax", x, lambda o: o, rounds)


def run_backend(backend, rounds):
    sync, cases, (plain_name, masked_name) = (
        jax_cases() if backend == "jax" else torch_cases()
    )
    if backend == "torch":
        cases = cases + half_cases()
    for name, ours, native, data, target in cases:
        times = interleaved_medians(
            {
                "ours": lambda ours=ours, data=data: ours(*data),
                "native": lambda native=native, data=data: native(*data),
            },
            sync=sync,
            rounds=rounds,
        )
        base_name = masked_name if len(data) == 2 else plain_name
        row = ratio_row(name, times["ours"], base_name, times["native"], target)
        print(row.replace("| ", f"| {backend}: ", 1), flush=True)
    if backend == "torch":
        print(small_calls_case(rounds).replace("| ", "| torch: ", 1), flush=True)
        for row in half_memory_rows():
            print(row, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["jax", "torch"], help="one backend only")
    parser.add_argument(
        "--rounds", type=int, default=11, help="rounds per case (default 11)"
    )
    parser.add_argument("--half-memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.half_memory_of:
        print(half_peak_mib(args.half_memory_of))
        return
    if args.backend:
        # Keras reads its backend once, on import: run without
        # KERAS_BACKEND, `--backend torch` timed TensorFlow's ops on
        # PyTorch's tensors.
        os.environ["KERAS_BACKEND"] = args.backend
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        assert "keras" not in sys.modules, "keras was imported before its backend"
        run_backend(args.backend, args.rounds)
        return
    print(f"float32, median of {args.rounds} interleaved rounds")
    print()
    print(TABLE_HEADER)
    for backend in ("jax", "torch"):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        command = [sys.executable, __file__, "--backend", backend]
        command += ["--rounds", str(args.rounds)]
        subprocess.run(command, env=env, check=True)


if __name__ == "__main__":
    main()
