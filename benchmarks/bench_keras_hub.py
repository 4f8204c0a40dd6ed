"""One training step of a keras-hub GPT-2 at a large vocabulary: fused or not.

keras-hub's `GPT2CausalLM`, compiled as keras-hub compiles it (Adam,
`SparseCategoricalCrossentropy(from_logits=True)`, weighted
`SparseCategoricalAccuracy`), against the same backbone under a tied
`StableSoftmaxHead` in a `FusedHeadModel`, compiled with the head's loss
and accuracy (docs/keras_hub.md). A step is `train_on_batch` on one padded
batch, the padding mask as `sample_weight`, as keras-hub's preprocessor
makes it. Both models start from the same weights (one seed). Time: both
side by side in one process, medians (benchmarks/_timing.py). Memory: the
extra peak RSS of one step, each model in a fresh process
(benchmarks/_memory.py), in the steady state of training: after a first
step of the same shape has compiled the step and made the optimizer's
variables, and after glibc has handed its free memory back
(`malloc_trim`), so that buffers the first step freed cannot be reused
unseen. On TensorFlow the memory runs set
`TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1`: oneDNN's default allocator keeps a
pool, which a step after the first reuses without RSS seeing it. Run
from the repository root, with the `keras-hub` extra:

    python benchmarks/bench_keras_hub.py                  # TensorFlow
    python benchmarks/bench_keras_hub.py --backend jax
    python benchmarks/bench_keras_hub.py --backend torch  # eager
    python benchmarks/bench_keras_hub.py --optimizer sgd  # no Adam buffers

The issue's sizes: V = 128000 (Llama 3's order), 4 sequences of 128
tokens, a 2-layer GPT-2 of width 256: the `[512, 128000]` float32 logits
are 250 MiB, the tied table 125 MiB. Adam's update of that table makes
temporaries of its size in both models alike; `--optimizer sgd` leaves
them out.
"""

import argparse
import os

from _memory import extra_peak_mib
from _memory import in_fresh_process
from _timing import step_report
from _timing import step_timings

FUSED, KERAS_HUB = "FusedHeadModel + tied StableSoftmaxHead", "keras-hub GPT2CausalLM"
CONTENDERS = (FUSED, KERAS_HUB)
BACKBONE = dict(num_layers=2, num_heads=4, hidden_dim=256, intermediate_dim=1024)


def _optimizer(name):
    import keras

    # keras-hub's default, Adam(2e-5), or plain SGD at the same rate.
    return keras.optimizers.get({"class_name": name, "config": {"learning_rate": 2e-5}})


def _model(which, vocabulary, length, optimizer="adam", chunk_size=None):
    import keras
    import keras_hub

    import keras_softmax

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary, max_sequence_length=length, **BACKBONE
    )
    if which == KERAS_HUB:
        model = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
        # keras-hub's loss and weighted accuracy.
        model.compile(optimizer=_optimizer(optimizer))
        return model
    head = keras_softmax.StableSoftmaxHead(
        vocabulary, tied_to=backbone.token_embedding, use_bias=False
    )
    model = keras_softmax.FusedHeadModel(backbone.input, head(backbone.output))
    model.compile(
        optimizer=_optimizer(optimizer),
        loss=head.loss(chunk_size=chunk_size),
        weighted_metrics=[head.accuracy()],
    )
    return model


def _batch(batch, length, vocabulary, seed=0):
    """Token ids padded at the end of each sequence but the first, labels
    shifted by one, the padding mask as sample weights."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocabulary, size=(batch, length + 1)).astype("int32")
    lengths = np.linspace(length + 1, (length + 1) // 2, batch).astype(int)
    padding = np.arange(length + 1) < lengths[:, None]
    tokens = np.where(padding, tokens, 0)
    x = {"token_ids": tokens[:, :-1], "padding_mask": padding[:, :-1].astype("int32")}
    return x, tokens[:, 1:], padding[:, 1:].astype("float32")


def _step(which, batch, length, vocabulary, optimizer, chunk_size):
    """`(step, sync)`: one `train_on_batch`, whose result is already on the host."""
    model = _model(which, vocabulary, length, optimizer, chunk_size)
    x, y, sample_weight = _batch(batch, length, vocabulary)

    def step():
        return model.train_on_batch(x, y, sample_weight=sample_weight)

    return step, lambda result: result


def peak_memory(which, batch, length, vocabulary, optimizer, chunk_size):
    """Extra peak RSS, in MiB, of one step after a first one of its shape."""
    step, sync = _step(which, batch, length, vocabulary, optimizer, chunk_size)
    sync(step())
    _return_free_memory()
    return extra_peak_mib(step, sync)


def _return_free_memory():
    """glibc's `malloc_trim(0)`, where there is glibc: free heap pages go back."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend", choices=("tensorflow", "jax", "torch"), default="tensorflow"
    )
    parser.add_argument("--vocabulary", type=int, default=128000, help="V")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument(
        "--chunk-size", type=int, help="the head loss's (default: its own)"
    )
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true", help="skip the timing")
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sizes = (args.batch, args.length, args.vocabulary, args.optimizer, args.chunk_size)
    if args.memory_of:
        os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "1")
        print(peak_memory(args.memory_of, *sizes))
        return
    print(
        f"{args.backend}: GPT-2 {BACKBONE}, V = {args.vocabulary}, "
        f"{args.batch} x {args.length} tokens, float32, one train_on_batch, "
        f"{args.optimizer}"
        + (f", chunk_size = {args.chunk_size}" if args.chunk_size else "")
    )
    memory = {}
    for which in CONTENDERS:
        arguments = ["--backend", args.backend, "--vocabulary", str(args.vocabulary)]
        arguments += ["--batch", str(args.batch), "--length", str(args.length)]
        arguments += ["--optimizer", args.optimizer]
        if args.chunk_size:
            arguments += ["--chunk-size", str(args.chunk_size)]
        memory[which] = in_fresh_process(__file__, arguments + ["--memory-of", which])
        if isinstance(memory[which], str):
            print(f"{which}: {memory[which]}")
    timings = None
    if not args.memory_only:
        import keras

        steps = {which: _step(which, *sizes) for which in CONTENDERS}
        # The same weights, the same batch: the first steps' losses agree.
        # Keras' PyTorch draws unseeded dropout from torch's global generator:
        # each first step starts from the seed, as its model did.
        first = {}
        for which, (step, _) in steps.items():
            keras.utils.set_random_seed(0)
            first[which] = step()
        print(
            "first step's [loss, accuracy]: "
            + "; ".join(
                f"{which} {[round(float(v), 6) for v in values]}"
                for which, values in first.items()
            )
        )
        timings = step_timings(steps, args.rounds)
    for line in step_report(CONTENDERS, timings, memory):
        print(line)


if __name__ == "__main__":
    main()
