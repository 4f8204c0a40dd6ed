"""How well temperature scaling undoes a known overconfidence.

Draws logits z, samples labels from softmax(z) (so z is calibrated by
construction), then hands fit_temperature the logits k * z of a model that
is overconfident by the factor k: the fitted temperature should recover k.
Prints the fitted T, and ECE and NLL before and after, on fresh test data.

    python benchmarks/calibration_recovery.py [--factor 3] [--examples 20000]
"""

import argparse
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The suite's float64 NumPy softmax, the one every numerical claim is tested
# against.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
from support.references import softmax  # noqa: E402

from keras_softmax.calibration import expected_calibration_error  # noqa: E402
from keras_softmax.calibration import fit_temperature  # noqa: E402


def _sample(rng, n, num_classes):
    z = rng.normal(scale=1.5, size=(n, num_classes))
    labels = (softmax(z).cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return z, labels


def _nll(p, labels):
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--factor",
        type=float,
        default=3.0,
        help="how overconfident the model is: it reports k * z (default 3)",
    )
    parser.add_argument(
        "--examples",
        type=int,
        default=20000,
        help="examples in each of the validation and test sets (default 20000)",
    )
    parser.add_argument(
        "--classes", type=int, default=10, help="number of classes (default 10)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the logits and labels (default 0)"
    )
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    z_val, y_val = _sample(rng, args.examples, args.classes)
    z_test, y_test = _sample(rng, args.examples, args.classes)
    t = fit_temperature(args.factor * z_val, y_val)
    print(
        f"overconfidence factor {args.factor:g}: fitted T = {t:.4f} "
        f"({100 * (t / args.factor - 1):+.2f}%), {args.examples} examples"
    )
    print(f"{'test split':24s}{'ECE':>10s}{'NLL':>10s}")
    for name, logits in (
        ("before (k * z)", args.factor * z_test),
        ("after (k * z / T)", args.factor * z_test / t),
        ("true model (z)", z_test),
    ):
        p = softmax(logits)
        print(
            f"{name:24s}{expected_calibration_error(p, y_test):>10.4f}"
            f"{_nll(p, y_test):>10.4f}"
        )


if __name__ == "__main__":
    main()
