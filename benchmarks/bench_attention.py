"""Times StableMultiHeadAttention against Keras' MultiHeadAttention.

Two copies of one model, identical but for the attention layer (and with the
same weights), run `predict` and a few steps of `fit` in graph mode on the
TensorFlow backend (no XLA): batch 32, 128 tokens, width 256, 8 heads, with
a padding mask from `Embedding(mask_zero=True)` (lengths 32 to 128, so
padded queries are fully masked). The contenders alternate in every round;
the table gives the median of each and the ratio of the medians, in wall
time and in CPU time (of all the process's threads). On a machine shared
with other work, wall times come in steps where the CPU quota throttles the
process; CPU time does not see them. Run from the repository root:

    python benchmarks/bench_attention.py                  # 15 rounds
    python benchmarks/bench_attention.py --rounds 11 --batches 2
"""

import argparse
import os
import platform

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _timing import interleaved_timings  # noqa: E402

import keras_softmax  # noqa: E402

BATCH, TOKENS, WIDTH, HEADS, VOCABULARY = 32, 128, 256, 8, 1000


def build(attention_cls):
    """Embedding (masked), attention, masked average, a 2-way softmax head."""
    tokens = keras.Input((TOKENS,), dtype="int32")
    x = keras.layers.Embedding(VOCABULARY, WIDTH, mask_zero=True)(tokens)
    x = attention_cls(num_heads=HEADS, key_dim=WIDTH // HEADS)(x, x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(tokens, keras.layers.Dense(2, activation="softmax")(x))
    model.compile(
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        jit_compile=False,
    )
    return model


def padded_tokens(count, rng):
    lengths = rng.integers(TOKENS // 4, TOKENS + 1, size=count)
    ids = rng.integers(1, VOCABULARY, size=(count, TOKENS)).astype("int32")
    ids[np.arange(TOKENS)[None, :] >= lengths[:, None]] = 0
    return ids, rng.integers(0, 2, size=count).astype("int32")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batches", type=int, default=4, help="per predict / fit")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batches < 1:
        parser.error("--rounds and --batches must be at least 1")

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = padded_tokens(BATCH * args.batches, rng)
    models = {
        "keras.layers.MultiHeadAttention": build(keras.layers.MultiHeadAttention),
        "StableMultiHeadAttention": build(keras_softmax.StableMultiHeadAttention),
    }
    keras_model, ours = models.values()
    ours.set_weights(keras_model.get_weights())

    def run_predict(model):
        model.predict(x, batch_size=BATCH, verbose=0)

    def run_fit(model):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)

    rows = []
    for name, run in (("predict", run_predict), ("fit", run_fit)):
        # Two untimed calls each trace the graphs.
        timings = interleaved_timings(
            {
                label: (lambda model=model, run=run: run(model))
                for label, model in models.items()
            },
            sync=lambda out: out,
            rounds=args.rounds,
        )
        for clock, times in (("wall", timings.wall), ("CPU", timings.cpu)):
            keras_ms, ours_ms = (t * 1e3 for t in times.values())
            rows.append((name, clock, keras_ms, ours_ms, ours_ms / keras_ms))

    print(
        f"Keras {keras.__version__}, TensorFlow backend, graph mode (no XLA), "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"{args.batches} batches of {BATCH} x {TOKENS} tokens, width {WIDTH}, "
        f"{HEADS} heads; median of {args.rounds} rounds\n"
    )
    print("| call | time | Keras MHA (ms) | StableMultiHeadAttention (ms) | ratio |")
    print("|---|---|---:|---:|---:|")
    for name, clock, keras_ms, ours_ms, ratio in rows:
        print(f"| `{name}` | {clock} | {keras_ms:.0f} | {ours_ms:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
