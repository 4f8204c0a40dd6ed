"""The main job: train, evaluate, save, export and serve a digits classifier.

A small MLP learns scikit-learn's bundled digits (1,797 8x8 images, 10
classes; no download) with the head `Dense(10, activation="stable_softmax")`.
The same model is trained with Keras' built-in `"softmax"` for comparison,
the stable one is calibrated by temperature scaling, and then it is saved
(`.keras`), exported (SavedModel, ONNX, LiteRT) and served from each, every
served prediction checked against the Keras model.

    python -m keras_softmax.demo [--epochs N] [--seed S] [--temperature T]
                                 [--output-dir DIR] [--quiet]

By default everything is written to `artifacts/`, which git ignores, so a
run leaves the checkout as it was. The artefacts committed in
`saved_models/` are regenerated, deliberately, with

    python -m keras_softmax.demo --output-dir saved_models
"""

import argparse
import pathlib
import time
import warnings

import keras
import numpy as np

from keras_softmax import _extras
from keras_softmax import calibration
from keras_softmax._temperature import check_temperature_value
from keras_softmax.demo import cli
from keras_softmax.demo import quiet
from keras_softmax.demo import serving
from keras_softmax.layer import StableSoftmax

NAME = "digits_classifier"
# The test accuracy the stable head must reach for the run to pass (exit 0).
ACCURACY_BAR = 0.95
# Git ignores it (.gitignore): a run with the default options changes no
# tracked file.
DEFAULT_OUTPUT_DIR = "artifacts"
INPUT_NAME = "pixels"
# How far each way of serving may differ from the Keras model.
TOLERANCES = {
    "keras": 0.0,
    "saved_model": 1e-6,
    "tfsm_layer": 1e-6,
    "onnx": 1e-5,
    "litert": 1e-5,
}


def load_digits(seed: int):
    """Digits split 60/20/20 into train, validation and test, stratified."""
    _extras.require("sklearn", "The demo's data set")
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    x, y = sklearn_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, stratify=y, random_state=seed
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    return (x_train, y_train), (x_val, y_val), (x_test, y_test)


def build_model(head_activation, seed: int) -> keras.Model:
    """A 64-32-10 MLP; the same seed gives the same initial weights."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((64,), name=INPUT_NAME)
    hidden = keras.layers.Dense(32, activation="relu")(inputs)
    outputs = keras.layers.Dense(10, activation=head_activation, name="head")(hidden)
    model = keras.Model(inputs, outputs, name=NAME)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy", calibration.ExpectedCalibrationError()],
    )
    return model


def train(model, data, epochs: int, seed: int, verbose: int):
    """Fits `model`; returns the wall time of `fit` in seconds.

    `verbose=1` prints one line per epoch, `0` nothing.
    """
    (x_train, y_train), (x_val, y_val), _ = data
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=epochs,
        batch_size=32,
        verbose=0,
        callbacks=[_EpochLine(epochs)] if verbose else [],
    )
    return time.perf_counter() - start


class _EpochLine(keras.callbacks.Callback):
    """One line per epoch: Keras' progress bars would bury the report."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        print(
            f"  epoch {epoch + 1:>3d}/{self.epochs}: loss {logs['loss']:.4f}, "
            f"validation accuracy {logs['val_accuracy']:.4f}",
            flush=True,
        )


def scores(probs, labels) -> dict:
    """Accuracy, mean negative log-likelihood and ECE of predictions."""
    probs = np.asarray(probs, np.float64)
    picked = probs[np.arange(len(labels)), labels]
    return {
        "accuracy": float(np.mean(np.argmax(probs, axis=1) == labels)),
        "nll": float(-np.mean(np.log(np.maximum(picked, 1e-300)))),
        "ece": calibration.expected_calibration_error(probs, labels),
    }


def check_served(paths, model, inputs) -> dict:
    """Serves every artefact; returns {way: largest difference from Keras}."""
    expected = model.predict(inputs[INPUT_NAME], verbose=0)
    differences = {}
    for way, server in serving.SERVERS.items():
        if way == "tfsm_layer" and keras.backend.backend() != "tensorflow":
            continue
        if server.format in paths:
            served = server.predict(paths[server.format], inputs)
            differences[way] = float(np.max(np.abs(served - expected)))
    return differences


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # Keras' tf2onnx shim probes a NumPy attribute that NumPy 2 warns about.
    warnings.filterwarnings("ignore", category=FutureWarning, module="keras.src.export")
    verbose = 0 if args.quiet else 1
    say = (lambda *a, **k: None) if args.quiet else print
    data = load_digits(args.seed)
    (_, _), (x_val, y_val), (x_test, y_test) = data
    head = (
        "stable_softmax"
        if args.temperature == 1.0
        else StableSoftmax(temperature=args.temperature)
    )

    say(f"Training with Dense(10, activation={head!r}) ...")
    stable = build_model(head, args.seed)
    stable_time = train(stable, data, args.epochs, args.seed, verbose)
    say("Training the same model with the built-in 'softmax' ...")
    builtin = build_model("softmax", args.seed)
    builtin_time = train(builtin, data, args.epochs, args.seed, verbose)

    stable_scores = scores(stable.predict(x_test, verbose=0), y_test)
    builtin_scores = scores(builtin.predict(x_test, verbose=0), y_test)
    calibrated = calibration.calibrate(stable, x_val, y_val)
    fitted = calibrated.layers[-1].temperature
    calibrated_scores = scores(calibrated.predict(x_test, verbose=0), y_test)

    formats = [f for f in serving.FORMATS if _why_not_exported(f) is None]
    output_dir = pathlib.Path(args.output_dir)
    # TensorFlow's converters log each export on stderr, in C++, and LiteRT's
    # interpreter announces itself there.
    with quiet.without_tensorflow_log_lines():
        paths = serving.save(stable, output_dir, NAME, formats)
        differences = check_served(paths, stable, {INPUT_NAME: x_test})
    serving.write_manifest(
        output_dir,
        paths.values(),
        dataset="scikit-learn digits (1,797 8x8 images, 10 classes), "
        f"stratified 60/20/20 split, seed {args.seed}",
        model=f"64-32-10 MLP, head Dense(10, activation={head!r})",
        epochs=args.epochs,
        test_accuracy=round(stable_scores["accuracy"], 4),
    )

    print(
        _report(
            args,
            stable_scores,
            builtin_scores,
            calibrated_scores,
            fitted,
            stable_time / builtin_time,
            differences,
            formats,
            output_dir,
        )
    )
    failures = [way for way, diff in differences.items() if not diff <= TOLERANCES[way]]
    verdict = _failure(stable_scores["accuracy"], failures)
    if verdict:
        print(verdict)
        return 1
    return 0


def _failure(accuracy, mismatches) -> str | None:
    """The line that says why a run failed, or None if it passed."""
    problems = []
    if accuracy < ACCURACY_BAR:
        problems.append(
            f"test accuracy {accuracy:.4f} is below the bar of {ACCURACY_BAR} "
            "(train longer: --epochs)"
        )
    if mismatches:
        problems.append(f"served predictions differ from Keras': {mismatches}")
    return "FAILED: " + "; ".join(problems) if problems else None


def _report(
    args,
    stable,
    builtin,
    calibrated,
    fitted,
    time_ratio,
    differences,
    formats,
    output_dir,
):
    lines = [
        "",
        f"digits test split ({args.epochs} epochs, seed {args.seed}, "
        f"{keras.backend.backend()} backend)",
        f"{'':32s}{'accuracy':>10s}{'NLL':>10s}{'ECE':>10s}",
        _score_line("stable_softmax head", stable),
        _score_line("built-in softmax head", builtin),
        _score_line(f"stable, calibrated (T = {fitted:.3f})", calibrated),
        f"accuracy difference, stable - built-in: "
        f"{stable['accuracy'] - builtin['accuracy']:+.4f}",
        f"training time, stable / built-in: {time_ratio:.2f}",
        "",
        f"saved to {output_dir}/ and served back (largest |difference| from Keras):",
    ]
    for way, diff in differences.items():
        verdict = "ok" if diff <= TOLERANCES[way] else "MISMATCH"
        lines.append(
            f"  {way:12s} {diff:.2e}  (allowed {TOLERANCES[way]:.0e})  {verdict}"
        )
    for fmt in serving.FORMATS:
        if fmt not in formats:
            lines.append(f"  {fmt:12s} skipped: {_why_not_exported(fmt)}")
    return "\n".join(lines)


def _score_line(name, values):
    return (
        f"{name:32s}{values['accuracy']:>10.4f}{values['nll']:>10.4f}"
        f"{values['ece']:>10.4f}"
    )


def _why_not_exported(fmt):
    """None if `fmt` can be exported here, else the reason it cannot."""
    if fmt != "keras" and keras.backend.backend() != "tensorflow":
        return "exporting runs on the TensorFlow backend"
    try:
        serving.check_installed(fmt)
    except ModuleNotFoundError as error:
        return str(error)
    return None


def _temperature(text):
    try:
        return check_temperature_value(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive finite number, got {text!r}"
        ) from None


def _parser():
    parser = cli.training_parser(
        prog="keras-softmax-demo",
        description="Train, evaluate, save, export and serve a digits classifier "
        "whose head is Dense(10, activation='stable_softmax'). Exits with 1 if "
        f"the test accuracy is below {ACCURACY_BAR} (the default epochs reach "
        "it) or a served prediction differs from the Keras model's.",
    )
    parser.add_argument(
        "--temperature",
        type=_temperature,
        default=1.0,
        help="temperature of the head (default 1: the 'stable_softmax' string)",
    )
    parser.add_argument(
        "--output-dir",
        default=DEFAULT_OUTPUT_DIR,
        help=f"where to write the artefacts and their manifest (default "
        f"{DEFAULT_OUTPUT_DIR}/, which git ignores; '--output-dir saved_models' "
        "regenerates the committed ones)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="print only the report, no epoch lines"
    )
    return parser
