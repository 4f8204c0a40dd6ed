"""Causal attention on a GPU (issue 27): time and device memory, with peers.

One forward and backward step of causal attention, B = 1, 16 heads of 128,
at T = 4096 and 16384, in bfloat16 and float32: the loss is the sum of the
outputs (in float32), the step returns it with the gradients for the
queries, keys and values. On JAX the step is `jax.jit`ted; on PyTorch it
runs eagerly. Contenders, each caught on its own (an out-of-memory or a
refusal is printed as its row; the run goes on):

- ours: `keras_softmax.dot_product_attention(q, k, v, is_causal=True)`, as
  it chooses, and with `flash_attention=True` (the "path" column names the
  path it took, read from `keras_softmax.attention.choose_path`);
- Keras: `keras.ops.dot_product_attention(..., is_causal=True)`, as it
  chooses and with `flash_attention=True`;
- the framework's own: on JAX `jax.nn.dot_product_attention(...,
  is_causal=True)` with `implementation="cudnn"` (bf16/fp16 only) and
  `implementation=None`; on PyTorch `scaled_dot_product_attention(...,
  is_causal=True)` on the (B, N, T, H) transposes.

Then the padded batch: 4 sequences of 4096 (lengths 4096, 3000, 1000 and 0:
the last fully padded), bf16, causal, with a key-padding mask of shape
(B, 1, 1, S): ours against Keras' with the same mask (and the framework's
own, with the same mask, or cuDNN's `key_value_seq_lengths`). It reports
whether the fully padded sequence's outputs are exactly 0 and whether any
output or gradient is NaN or infinite.

Time: median of `--rounds` (default 5) after a warm-up, contenders in
turn (benchmarks/_timing.py), synchronised with `jax.block_until_ready` or
`torch.cuda.synchronize()`. Memory: on JAX the compiled step's temporaries
(`memory_analysis().temp_size_in_bytes`: the peak counter cannot be
reset); on PyTorch the peak allocated over the memory allocated before the
step (`torch.cuda.reset_peak_memory_stats()`, `max_memory_allocated()`),
gradients included; on a CPU (`--small`) the extra peak RSS. "max |Δ|" is
the largest difference of the outputs from the reference (the framework's
own, as it chooses), over the sequences that are not fully padded. Ratios:
ours over the best of the peers (Keras' and the framework's), in time and
in memory. Tables are printed, flushed, case by case, so that a run cut
short by a timeout keeps the cases it finished.

Run from the repository root, with Keras and this package importable (on
the GPU machine: .ci/gpu_run.sh):

    python3 benchmarks/bench_gpu_attention.py --backend jax
    python3 benchmarks/bench_gpu_attention.py --backend torch
    python3 benchmarks/bench_gpu_attention.py --backend jax --small  # CPU, < 1 min
    python3 benchmarks/bench_gpu_attention.py --backend torch --lengths 4096 \
        --dtypes bfloat16
    python3 benchmarks/bench_gpu_attention.py --backend jax --time-budget 150

KERAS_BACKEND is set from --backend before Keras is imported.
`--time-budget` skips (and says so) the cases that would start after that
many seconds; `--small` is T = 256, 2 heads of 64, and a padded batch of
4 x 256.
"""

import argparse
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time

from _timing import interleaved_timings

FULL = dict(lengths=(4096, 16384), heads=16, head_size=128, padded=(4, 4096))
SMALL = dict(lengths=(256,), heads=2, head_size=64, padded=(4, 256))
DTYPES = ("bfloat16", "float32")
OURS, OURS_FLASH = "ours", "ours, flash_attention=True"
KERAS, KERAS_FLASH = "keras.ops", "keras.ops, flash_attention=True"


class Failure(str):
    """Why a contender has no figure (its row says so)."""


def _why(error: BaseException) -> Failure:
    text = f"{type(error).__name__}: {error}"
    lowered = text.lower()
    if "out of memory" in lowered or "resource_exhausted" in lowered:
        return Failure("out of memory: " + " ".join(text.split())[:160])
    return Failure(" ".join(text.split())[:240])


def _padding_lengths(batch: int, length: int) -> list[int]:
    """Lengths of the padded batch: full, about 3/4, 1/4, ..., the last 0."""
    fractions = [1.0, 0.73, 0.25, 0.5, 0.9, 0.1, 0.6]
    lengths = [int(length * fractions[i % len(fractions)]) for i in range(batch)]
    lengths[-1] = 0
    return lengths


# ----------------------------------------------------------------- backends


class _Jax:
    memory_kind = "compiled temporaries MiB"

    def __init__(self):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp

    def device(self) -> str:
        d = self.jax.devices()[0]
        return f"{d.platform}: {d.device_kind}"

    def versions(self) -> str:
        import jaxlib

        return f"jax {self.jax.__version__}, jaxlib {jaxlib.__version__}"

    def inputs(self, shape, dtype, seed=0):
        keys = self.jax.random.split(self.jax.random.key(seed), 3)
        return tuple(self.jax.random.normal(k, shape, dtype) for k in keys)

    def mask(self, lengths, length):
        positions = self.jnp.arange(length)[None, :]
        keep = positions < self.jnp.asarray(lengths)[:, None]
        return keep[:, None, None, :]  # (B, 1, 1, S)

    def prepare(self, attention, q, k, v):
        """`(call, sync, memory MiB, outputs, gradients)` of one step."""
        jax, jnp = self.jax, self.jnp

        def loss(q, k, v):
            out = attention(q, k, v)
            return jnp.sum(out.astype(jnp.float32)), out

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        compiled = step.lower(q, k, v).compile()
        analysis = compiled.memory_analysis()
        memory = (
            Failure("n/a") if analysis is None else analysis.temp_size_in_bytes / 2**20
        )

        def call():
            return compiled(q, k, v)

        (_, out), grads = jax.block_until_ready(call())
        return call, jax.block_until_ready, memory, out, grads

    def finite(self, x) -> bool:
        return bool(self.jnp.all(self.jnp.isfinite(x)))

    def all_zero(self, x) -> bool:
        return bool(self.jnp.all(x == 0))

    def max_abs(self, x) -> float:
        return float(self.jnp.max(self.jnp.abs(x.astype(self.jnp.float32))))

    def diff(self, a, b) -> float:
        f32 = self.jnp.float32
        return float(self.jnp.max(self.jnp.abs(a.astype(f32) - b.astype(f32))))

    def release(self):
        gc.collect()

    def own(self, padded):
        """The framework's own attention: `[(name, fn(q, k, v, mask))]`."""
        jax = self.jax

        def cudnn(q, k, v, mask):
            if mask is None:
                return jax.nn.dot_product_attention(
                    q, k, v, is_causal=True, implementation="cudnn"
                )
            # cuDNN takes padding as lengths, not as a mask.
            return jax.nn.dot_product_attention(
                q,
                k,
                v,
                is_causal=True,
                key_value_seq_lengths=self._lengths,
                implementation="cudnn",
            )

        def default(q, k, v, mask):
            return jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=True, implementation=None
            )

        cudnn_name = "jax.nn cudnn" + (", key_value_seq_lengths" if padded else "")
        return [
            ("jax.nn implementation=None", default),
            (cudnn_name, cudnn),
        ]


class _Torch:
    def __init__(self):
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.device_type = "cuda" if self.cuda else "cpu"
        self.memory_kind = (
            "extra peak allocated MiB" if self.cuda else "extra peak RSS MiB"
        )

    def device(self) -> str:
        if self.cuda:
            return f"cuda: {self.torch.cuda.get_device_name()}"
        return f"cpu: {platform.processor() or platform.machine()}"

    def versions(self) -> str:
        t = self.torch
        extra = (
            f", CUDA {t.version.cuda}, cuDNN {t.backends.cudnn.version()}"
            if self.cuda
            else ""
        )
        return f"torch {t.__version__}{extra}"

    def inputs(self, shape, dtype, seed=0):
        t = self.torch
        generator = t.Generator(device=self.device_type).manual_seed(seed)
        return tuple(
            t.randn(
                shape,
                generator=generator,
                device=self.device_type,
                dtype=getattr(t, dtype),
            ).requires_grad_()
            for _ in range(3)
        )

    def mask(self, lengths, length):
        t = self.torch
        positions = t.arange(length, device=self.device_type)[None, :]
        keep = positions < t.tensor(lengths, device=self.device_type)[:, None]
        return keep[:, None, None, :]  # (B, 1, 1, S)

    def _sync(self, _=None):
        if self.cuda:
            self.torch.cuda.synchronize()

    def prepare(self, attention, q, k, v):
        """`(call, sync, memory MiB, outputs, gradients)` of one step."""

        def call():
            for x in (q, k, v):
                x.grad = None
            out = attention(q, k, v)
            out.float().sum().backward()
            return out.detach(), (q.grad, k.grad, v.grad)

        for x in (q, k, v):
            x.grad = None
        gc.collect()
        from _memory import torch_extra_peak_mib

        results = []
        memory = torch_extra_peak_mib(lambda: results.append(call()), self._sync)
        out, grads = results[0]
        return call, self._sync, memory, out, grads

    def finite(self, x) -> bool:
        return bool(self.torch.isfinite(x).all())

    def all_zero(self, x) -> bool:
        return bool((x == 0).all())

    def max_abs(self, x) -> float:
        return float(x.float().abs().max())

    def diff(self, a, b) -> float:
        return float((a.float() - b.float()).abs().max())

    def release(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def own(self, padded):
        t = self.torch

        def sdpa(q, k, v, mask):
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
            if mask is None:
                out = t.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True
                )
            else:
                # SDPA takes a mask or `is_causal`, not both: the two joined.
                length = q.shape[2]
                causal = t.ones((length, length), dtype=t.bool, device=q.device).tril()
                out = t.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask & causal
                )
            return out.transpose(1, 2)

        return [("torch scaled_dot_product_attention", sdpa)]


# ---------------------------------------------------------------- the cases


def _record_paths():
    """A list that receives each path `keras_softmax`'s attention takes.

    Introspection only: `choose_path` is wrapped, its answer unchanged.
    """
    from keras_softmax import attention

    seen = []
    original = attention.choose_path

    def recording(*args, **kwargs):
        path = original(*args, **kwargs)
        seen.append(path)
        return path

    attention.choose_path = recording
    return seen


def _contenders(runner, padded):
    """`[(name, is_ours, fn(q, k, v, mask))]`, the reference (own) first."""
    import keras

    import keras_softmax

    def ours(flash):
        def fn(q, k, v, mask):
            return keras_softmax.dot_product_attention(
                q, k, v, mask=mask, is_causal=True, flash_attention=flash
            )

        return fn

    def keras_attention(flash):
        def fn(q, k, v, mask):
            return keras.ops.dot_product_attention(
                q, k, v, mask=mask, is_causal=True, flash_attention=flash
            )

        return fn

    own = [(name, False, fn) for name, fn in runner.own(padded)]
    return [
        own[0],
        (OURS, True, ours(None)),
        (OURS_FLASH, True, ours(True)),
        (KERAS, False, keras_attention(None)),
        (KERAS_FLASH, False, keras_attention(True)),
        *own[1:],
    ]


def run_case(runner, paths, title, shape, dtype, lengths, rounds):
    """Measures every contender on one case; prints its table; returns rows."""
    length = shape[1]
    q, k, v = runner.inputs(shape, dtype)
    mask = None if lengths is None else runner.mask(lengths, length)
    runner._lengths = None if lengths is None else _int32(runner, lengths)
    dead = None if lengths is None else [i for i, n in enumerate(lengths) if n == 0]
    live = None if lengths is None else [i for i, n in enumerate(lengths) if n > 0]
    rows, steps, reference = {}, {}, None
    for name, is_ours, fn in _contenders(runner, lengths is not None):
        row = {"ours": is_ours, "path": "", "memory": None, "time": None}
        rows[name] = row
        del paths[:]
        try:
            call, sync, memory, out, grads = runner.prepare(
                lambda q, k, v, fn=fn, mask=mask: fn(q, k, v, mask), q, k, v
            )
        except Exception as error:  # noqa: BLE001 (each contender its own row)
            row["failure"] = _why(error)
            runner.release()
            continue
        row["path"] = "→".join(dict.fromkeys(paths)) if is_ours else ""
        row["memory"] = memory
        row["finite"] = runner.finite(out) and all(map(runner.finite, grads))
        kept = out if live is None else out[live[0] : live[-1] + 1]
        if reference is None:
            reference = kept
            row["diff"] = "reference"
        else:
            row["diff"] = f"{runner.diff(kept, reference):.2e}"
        if dead:
            row["dead"] = all(runner.all_zero(out[i]) for i in dead)
            row["dead_max"] = max(runner.max_abs(out[i]) for i in dead)
        del out, grads, kept
        steps[name] = (call, sync)
        runner.release()
    _time(steps, rows, rounds, runner)
    del steps, reference
    runner.release()
    _print_case(title, rows, runner, padded=lengths is not None)
    return rows


def _int32(runner, lengths):
    if isinstance(runner, _Jax):
        return runner.jnp.asarray(lengths, runner.jnp.int32)
    return lengths


def _time(steps, rows, rounds, runner):
    """Median seconds per step, in turn; one by one if a step fails."""
    if not steps:
        return
    sync = next(iter(steps.values()))[1]
    calls = {name: call for name, (call, _) in steps.items()}
    try:
        timings = interleaved_timings(calls, sync=sync, rounds=rounds, warmup=1)
        for name, seconds in timings.wall.items():
            rows[name]["time"] = seconds
        return
    except Exception:  # noqa: BLE001 (then each on its own, below)
        runner.release()
    for name, call in calls.items():
        try:
            sync(call())
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                sync(call())
                times.append(time.perf_counter() - start)
            rows[name]["time"] = statistics.median(times)
        except Exception as error:  # noqa: BLE001
            rows[name]["failure"] = Failure("timing: " + _why(error))
            runner.release()


def _ms(seconds):
    return "" if seconds is None else f"{seconds * 1e3:.2f}"


def _mib(memory):
    if memory is None or isinstance(memory, str):
        return ""
    return f"{memory:.1f}" if memory < 10 else f"{memory:.0f}"


def _best_peer(rows, key):
    peers = [
        (row[key], name)
        for name, row in rows.items()
        if not row["ours"] and isinstance(row.get(key), float)
    ]
    return min(peers) if peers else (None, None)


def _print_case(title, rows, runner, padded):
    print(f"\n### {title}\n", flush=True)
    head = f"| contender | path | ms | {runner.memory_kind} | max abs Δ | finite |"
    rule = "|---|---|---:|---:|---:|---|"
    if padded:
        head += " padded seq. exactly 0 |"
        rule += "---|"
    print(head + " note |")
    print(rule + "---|")
    for name, row in rows.items():
        failure = row.get("failure")
        finite = "" if "finite" not in row else ("yes" if row["finite"] else "NO")
        cells = [
            name,
            row["path"],
            _ms(row["time"]),
            _mib(row["memory"]),
            row.get("diff", ""),
            finite,
        ]
        if padded:
            if "dead" in row:
                cells.append(
                    "yes" if row["dead"] else f"no (max abs {row['dead_max']:.3g})"
                )
            else:
                cells.append("")
        cells.append("" if failure is None else f"failed: {failure}")
        print("| " + " | ".join(cells) + " |")
    time_best, time_peer = _best_peer(rows, "time")
    memory_best, memory_peer = _best_peer(rows, "memory")
    memory_floor = memory_best if (memory_best or 0) >= 1 else None
    print()
    for name in (OURS, OURS_FLASH):
        row = rows[name]
        print(
            f"{name} / best of peers: time {_ratio(row['time'], time_best)} "
            f"(vs {time_peer}), memory {_ratio(row['memory'], memory_floor)} "
            f"(vs {memory_peer})"
        )
    sys.stdout.flush()


def _ratio(value, best):
    """`value / best`, where both are figures (and `best` is not ~0 MiB)."""
    if not isinstance(value, float) or not best or best < 1e-6:
        return "n/a"
    return f"{value / best:.2f}"


def _summary(results):
    print("\n### Summary: ours / best of peers\n")
    print(
        "| case | ours ms | ours flash ms | fastest peer | peer ms | ours / peer "
        "| flash / peer | ours MiB | ours flash MiB | least-memory peer | peer MiB "
        "| ours / peer | flash / peer |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for title, rows in results:
        if rows is None:
            print(f"| {title} | skipped (time budget) |" + " |" * 11)
            continue
        ours, flash = rows[OURS], rows[OURS_FLASH]
        time_best, time_peer = _best_peer(rows, "time")
        memory_best, memory_peer = _best_peer(rows, "memory")
        # Below 1 MiB (a CPU's RSS at smoke sizes) a memory ratio means nothing.
        memory_floor = memory_best if (memory_best or 0) >= 1 else None
        print(
            f"| {title} | {_ms(ours['time'])} | {_ms(flash['time'])} | "
            f"{time_peer or 'none'} | {_ms(time_best)} | "
            f"{_ratio(ours['time'], time_best)} | "
            f"{_ratio(flash['time'], time_best)} | {_mib(ours['memory'])} | "
            f"{_mib(flash['memory'])} | {memory_peer or 'none'} | "
            f"{_mib(memory_best)} | {_ratio(ours['memory'], memory_floor)} | "
            f"{_ratio(flash['memory'], memory_floor)} |"
        )


def _project_version():
    try:
        import importlib.metadata

        version = importlib.metadata.version("keras-softmax")
    except Exception:  # noqa: BLE001
        version = "?"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = ""
    return version + (f" (checkout at {commit})" if commit else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("jax", "torch"), required=True)
    parser.add_argument("--small", action="store_true", help="CPU smoke sizes")
    parser.add_argument("--lengths", help="comma-separated T (default 4096,16384)")
    parser.add_argument(
        "--dtypes", default=",".join(DTYPES), help="default bfloat16,float32"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (≥ 5)")
    parser.add_argument("--no-padded", action="store_true", help="skip the batch")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds: cases that would start later are skipped",
    )
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    start = time.perf_counter()
    sizes = SMALL if args.small else FULL
    lengths = (
        tuple(int(n) for n in args.lengths.split(","))
        if args.lengths
        else sizes["lengths"]
    )
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    heads, size = sizes["heads"], sizes["head_size"]

    import keras
    import numpy

    runner = _Jax() if args.backend == "jax" else _Torch()
    paths = _record_paths()
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"## Causal attention, forward and backward: {args.backend}\n")
    print(f"- device: {runner.device()}")
    print(
        f"- versions: Python {platform.python_version()}, {runner.versions()}, "
        f"Keras {keras.__version__}, NumPy {numpy.__version__}, "
        f"keras_softmax {_project_version()}"
    )
    print(f"- date: {now:%Y-%m-%d %H:%M} UTC")
    print(
        f"- B = 1, {heads} heads of {size}, causal; loss = sum of outputs; "
        f"median of {args.rounds} after a warm-up; memory: {runner.memory_kind}"
    )
    sys.stdout.flush()
    cases = []
    for length in lengths:
        for dtype in dtypes:
            title = f"T = {length}, {dtype}"
            cases.append((title, (1, length, heads, size), dtype, None))
        if not args.no_padded and length == lengths[0]:
            batch, padded_length = sizes["padded"]
            padding = _padding_lengths(batch, padded_length)
            title = (
                f"padded batch: B = {batch}, T = {padded_length}, bfloat16, "
                f"key lengths {padding}"
            )
            cases.append(
                (title, (batch, padded_length, heads, size), "bfloat16", padding)
            )
    results = []
    for title, shape, dtype, padding in cases:
        elapsed = time.perf_counter() - start
        if args.time_budget is not None and elapsed > args.time_budget:
            print(f"\n### {title}\n\nskipped: {elapsed:.0f} s > --time-budget")
            results.append((title, None))
            continue
        rows = run_case(runner, paths, title, shape, dtype, padding, args.rounds)
        results.append((title, rows))
    _summary(results)
    print(f"\n(whole run: {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
