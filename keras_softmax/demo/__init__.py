"""The demo application: a digits classifier trained, exported and served.

It shows the library at work and is not part of it: `keras_softmax` never
imports this package.

    python -m keras_softmax.demo [--epochs N] [--seed S] [--temperature T]
                                 [--output-dir DIR] [--quiet]
    python -m keras_softmax.demo.distributed --devices 2

Modules:
    digits: the main job (train, compare, calibrate, save, export, serve).
    serving: save a model in each format and serve it back.
    distributed: the same classifier trained data-parallel.
    cli: the options every entry point shares.
    quiet: TensorFlow's and LiteRT's C++ log lines kept out of the report.
    fresh_process: Python run in a fresh interpreter.
"""

from keras_softmax.demo.digits import ACCURACY_BAR
from keras_softmax.demo.digits import NAME
from keras_softmax.demo.digits import build_model
from keras_softmax.demo.digits import load_digits
from keras_softmax.demo.digits import main
from keras_softmax.demo.digits import scores
from keras_softmax.demo.digits import train

__all__ = [
    "ACCURACY_BAR",
    "NAME",
    "build_model",
    "load_digits",
    "main",
    "scores",
    "train",
]
