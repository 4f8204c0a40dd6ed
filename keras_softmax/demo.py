"""A short showcase: where the naive softmax breaks and the stable one holds.

Run it with `python -m keras_softmax.demo`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_softmax import stable_softmax  # noqa: E402


def _naive(x):
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(np.asarray(x, np.float32))
        return e / e.sum(axis=-1, keepdims=True)


def main() -> None:
    rows = [
        ("ordinary logits", [[3.0, 4.0, 1.0]], {}),
        ("large logits", [[1000.0, 1001.0, 1002.0]], {}),
        ("masked, last two kept", [[1.0, 2.0, 3.0]], {"mask": [[0, 1, 1]]}),
        ("fully masked row", [[1.0, 2.0, 3.0]], {"mask": [[0, 0, 0]]}),
        ("temperature 0.5", [[3.0, 4.0, 1.0]], {"temperature": 0.5}),
    ]
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}\n")
    for name, x, kwargs in rows:
        stable = np.asarray(stable_softmax(x, **kwargs))[0]
        line = f"{name:24s} stable_softmax = {np.array2string(stable, precision=6)}"
        if not kwargs:
            line += f"   naive exp/sum = {np.array2string(_naive(x)[0], precision=6)}"
        print(line)


if __name__ == "__main__":
    main()
