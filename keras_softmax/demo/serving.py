"""Save, export and serve a model: `.keras`, SavedModel, ONNX and LiteRT.

Each `predict_*` function runs a saved artefact the way its users serve it,
so that a test or the demo can compare the result with the Keras model. The
`.keras` file and the SavedModel are read in a fresh Python process: the
first must load with `safe_mode=True` after importing only keras_softmax,
the second must serve without keras_softmax at all. The manifest written
beside the artefacts records their sha256, so a truncated or tampered file
is refused with a clear error instead of being loaded. A SavedModel needs
TensorFlow on any backend, and the demo exports ONNX and LiteRT from the
TensorFlow backend: without what a format needs, exporting or serving it
raises a `ModuleNotFoundError` that names the extra to install.
"""

import hashlib
import json
import pathlib
import tempfile
import textwrap
from collections.abc import Callable
from typing import NamedTuple

import keras
import numpy as np

from keras_softmax import _extras
from keras_softmax.demo.fresh_process import run_python

FORMATS = ("keras", "saved_model", "onnx", "litert")
_SUFFIXES = {
    "keras": ".keras",
    "saved_model": "_saved_model",
    "onnx": ".onnx",
    "litert": ".tflite",
}
# What each format needs besides Keras, exported on the TensorFlow backend
# and served back. A SavedModel is TensorFlow's on any backend.
_NEEDS = {
    "keras": (),
    "saved_model": ("tensorflow",),
    "onnx": ("tensorflow", "tf2onnx", "onnxruntime"),
    "litert": ("tensorflow", "ai_edge_litert"),
}
_TITLES = {"saved_model": "SavedModel", "onnx": "ONNX", "litert": "LiteRT"}


class ArtifactError(ValueError):
    """A saved artefact is missing, truncated or not what its manifest says."""


def artifact_path(directory, name: str, fmt: str) -> pathlib.Path:
    """Where `save` puts the artefact of format `fmt`."""
    return pathlib.Path(directory) / f"{name}{_SUFFIXES[fmt]}"


def check_installed(fmt: str):
    """Raises unless what `fmt` needs, exported on TensorFlow and served, is installed.

    Raises:
        ModuleNotFoundError: naming the extra to install: `tensorflow` for
            the SavedModel, `export` for ONNX (tf2onnx, onnxruntime) and
            LiteRT (ai-edge-litert).
    """
    for module in _NEEDS[fmt]:
        _extras.require(module, f"{_TITLES[fmt]} export")


def save(model: keras.Model, directory, name: str, formats=FORMATS) -> dict:
    """Saves `model` in each of `formats`; returns {format: path}.

    `model.export` converts to every format but `.keras`; see
    `check_installed` for what each needs.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"`formats` must be among {FORMATS}. Received: {formats}")
    for fmt in formats:
        # Other backends export ONNX and LiteRT without TensorFlow (Keras
        # converts through torch.onnx or litert-torch), never a SavedModel.
        if keras.backend.backend() == "tensorflow" or fmt == "saved_model":
            check_installed(fmt)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt in formats:
        path = artifact_path(directory, name, fmt)
        if fmt == "keras":
            model.save(path)
        else:
            export_format = "tf_saved_model" if fmt == "saved_model" else fmt
            model.export(str(path), format=export_format, verbose=False)
        paths[fmt] = path
    return paths


def predict_keras_fresh(path, inputs: dict) -> np.ndarray:
    """Loads a `.keras` file in a fresh process with `safe_mode=True`.

    `inputs` maps the model's input names to arrays, in the model's order,
    here and below.
    """
    return _predict_in_fresh_process(
        """
        import keras
        import keras_softmax
        model = keras.saving.load_model(path, safe_mode=True)
        names = [i.name for i in model.inputs]
        outputs = model.predict([inputs[n] for n in names], verbose=0)
        """,
        path,
        inputs,
    )


def predict_saved_model_fresh(path, inputs: dict) -> np.ndarray:
    """Serves a SavedModel's `serve` signature in a process without keras_softmax."""
    _extras.require("tensorflow", "Serving a SavedModel")
    return _predict_in_fresh_process(
        """
        import sys
        import tensorflow as tf
        serve = tf.saved_model.load(path).signatures["serve"]
        (outputs,) = serve(**{k: tf.constant(v) for k, v in inputs.items()}).values()
        outputs = outputs.numpy()
        if any(m.startswith("keras_softmax") for m in sys.modules):
            raise SystemExit("the SavedModel needed keras_softmax")
        """,
        path,
        inputs,
    )


def predict_tfsm_layer(path, inputs: dict) -> np.ndarray:
    """Serves a SavedModel through `keras.layers.TFSMLayer`."""
    _extras.require("tensorflow", "keras.layers.TFSMLayer")
    layer = keras.layers.TFSMLayer(str(path), call_endpoint="serve")
    # The endpoint takes the inputs by position, in the model's order.
    arrays = list(inputs.values())
    return np.asarray(layer(arrays[0] if len(arrays) == 1 else arrays))


def predict_onnx(path, inputs: dict) -> np.ndarray:
    """Runs an ONNX file in onnxruntime."""
    onnxruntime = _extras.require("onnxruntime", "Serving an ONNX file")
    session = onnxruntime.InferenceSession(
        str(path), providers=["CPUExecutionProvider"]
    )
    return session.run(None, dict(inputs))[0]


def predict_litert(path, inputs: dict) -> np.ndarray:
    """Runs a `.tflite` file in the LiteRT interpreter."""
    litert = _extras.require("ai_edge_litert.interpreter", "Serving a LiteRT file")
    interpreter = litert.Interpreter(model_path=str(path))
    details = interpreter.get_input_details()
    # LiteRT names an input "serving_default_<name>:0".
    arrays = [inputs[_litert_input_name(d["name"])] for d in details]
    for detail, array in zip(details, arrays, strict=True):
        interpreter.resize_tensor_input(detail["index"], array.shape)
    interpreter.allocate_tensors()
    for detail, array in zip(details, arrays, strict=True):
        interpreter.set_tensor(detail["index"], array.astype(detail["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


class Server(NamedTuple):
    """One way of serving: the format it reads, and how it predicts."""

    format: str
    predict: Callable[..., np.ndarray]


# Every way the artefacts are served, each named for its format but one:
# TFSMLayer wraps a SavedModel's TensorFlow graph (TensorFlow backend only).
SERVERS = {
    "keras": Server("keras", predict_keras_fresh),
    "saved_model": Server("saved_model", predict_saved_model_fresh),
    "tfsm_layer": Server("saved_model", predict_tfsm_layer),
    "onnx": Server("onnx", predict_onnx),
    "litert": Server("litert", predict_litert),
}


def predict_export(fmt: str, path, inputs: dict) -> np.ndarray:
    """Serves an export of format `fmt` ("saved_model", "onnx", "litert")."""
    return SERVERS[fmt].predict(path, inputs)


def write_manifest(directory, files, **info) -> pathlib.Path:
    """Writes `manifest.json`: `info` and the sha256 of every file saved."""
    directory = pathlib.Path(directory)
    digests = {}
    for path in files:
        for file in _files_under(pathlib.Path(path)):
            digests[file.relative_to(directory).as_posix()] = _sha256(file)
    manifest = {
        "package": "keras_softmax",
        "package_version": _package_version(),
        "keras_version": keras.__version__,
        "tensorflow_version": _tensorflow_version(),
        **info,
        "sha256": dict(sorted(digests.items())),
    }
    path = directory / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def verify(directory) -> dict:
    """Checks every file against `manifest.json`; returns the manifest.

    Raises:
        ArtifactError: naming the first file that is missing or whose
            sha256 differs, as a truncated or tampered file does.
    """
    directory = pathlib.Path(directory)
    manifest_path = directory / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        digests = manifest["sha256"]
    except (OSError, ValueError, KeyError) as error:
        raise ArtifactError(
            f"{manifest_path} is missing or unreadable: {error}"
        ) from error
    for relative, expected in digests.items():
        file = directory / relative
        if not file.is_file():
            raise ArtifactError(f"{file} is missing (listed in {manifest_path})")
        actual = _sha256(file)
        if actual != expected:
            raise ArtifactError(
                f"{file} does not match {manifest_path}: sha256 {actual} "
                f"instead of {expected}. The file is truncated or was modified; "
                "re-create it with `python -m keras_softmax.demo --output-dir "
                f"{directory}`."
            )
    return manifest


def load_verified(directory, name: str) -> keras.Model:
    """Loads `<name>.keras` from `directory` after checking its manifest."""
    verify(directory)
    return keras.saving.load_model(
        artifact_path(directory, name, "keras"), safe_mode=True
    )


def _predict_in_fresh_process(body, path, inputs):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        np.savez(tmp / "inputs.npz", **inputs)
        prologue = f"""
import numpy as np
path = {str(path)!r}
inputs = dict(np.load({str(tmp / "inputs.npz")!r}))
"""
        epilogue = f"\nnp.save({str(tmp / 'outputs.npy')!r}, np.asarray(outputs))\n"
        code = prologue + textwrap.dedent(body) + epilogue
        result = run_python("-c", code, env={"TF_CPP_MIN_LOG_LEVEL": "3"})
        if result.returncode != 0:
            raise RuntimeError(
                f"Serving {path} in a fresh process failed:\n{result.stderr[-2000:]}"
            )
        return np.load(tmp / "outputs.npy")


def _litert_input_name(name):
    name = name.split(":")[0]
    prefix = "serving_default_"
    return name[len(prefix) :] if name.startswith(prefix) else name


def _files_under(path):
    return (
        sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    )


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_version():
    from keras_softmax import __version__

    return __version__


def _tensorflow_version():
    # None where TensorFlow is not installed, as on PyTorch or JAX: then
    # nothing was exported with it.
    try:
        import tensorflow as tf
    except ModuleNotFoundError:
        return None
    return tf.__version__
