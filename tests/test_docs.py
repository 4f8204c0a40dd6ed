"""The documentation: the API reference covers the public API, and the README
stays short and runs.

`mkdocs build --strict` (in .ci/run) checks that the pages build without a
warning; these tests check what a build cannot: that no public name is left
out of the reference, and that the README's example still works.
"""

import pathlib
import re

from support.backends import once

import keras_softmax
from keras_softmax import calibration
from keras_softmax.demo.fresh_process import check_python
from keras_softmax.registration import ACTIVATIONS

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 300
# The README's section whose Python block a user runs on their own model.
OWN_MODEL_HEADING = "## Your own model"


def _directive_targets():
    """Every `::: target` of mkdocstrings in docs/."""
    targets = set()
    for page in DOCS.rglob("*.md"):
        targets.update(re.findall(r"^:::\s+(\S+)", page.read_text(), re.MULTILINE))
    return targets


def _public_names():
    return [f"keras_softmax.{name}" for name in keras_softmax.__all__] + [
        f"keras_softmax.calibration.{name}" for name in calibration.__all__
    ]


def test_every_public_name_has_a_reference_entry():
    missing = sorted(set(_public_names()) - _directive_targets())
    assert not missing, f"no `::: name` directive in docs/ for {missing}"


def test_every_public_name_has_a_docstring():
    # mkdocstrings renders an object without a docstring silently.
    objects = [getattr(keras_softmax, name) for name in keras_softmax.__all__]
    objects += [getattr(calibration, name) for name in calibration.__all__]
    undocumented = [o.__name__ for o in objects if not (o.__doc__ or "").strip()]
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_every_reference_entry_names_a_public_object():
    public = set(_public_names())
    unknown = sorted(_directive_targets() - public)
    assert not unknown, f"docs/ documents names outside __all__: {unknown}"


def test_the_activation_names_are_documented():
    page = (DOCS / "api" / "activations.md").read_text()
    for name in ACTIVATIONS:
        assert f'`"{name}"`' in page, name


def test_package_docstring_maps_every_public_name():
    doc = keras_softmax.__doc__
    assert doc.startswith("keras_softmax: ")
    missing = [
        name for name in keras_softmax.__all__ if not re.search(rf"\b{name}\b", doc)
    ]
    assert not missing, f"help(keras_softmax) does not name {missing}"


def test_readme_is_at_most_300_lines():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines"


def _own_model_block():
    text = README.read_text()
    section = text.split(OWN_MODEL_HEADING + "\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"^```python\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    assert match, f"no Python block under {OWN_MODEL_HEADING!r} in README.md"
    return match.group(1)


@once
def test_readme_own_model_example_runs(tmp_path):
    # As a user runs it: a fresh interpreter, in a directory of its own,
    # where it writes its files.
    code = f"import os\nos.chdir({str(tmp_path)!r})\n" + _own_model_block()
    stdout = check_python(
        "-c",
        code,
        env={"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert "fitted temperature:" in stdout
    for name in (
        "iris.keras",
        "iris_saved_model",
        "iris.onnx",
        "iris.tflite",
        "iris_calibrated.keras",
    ):
        assert (tmp_path / name).exists(), name
