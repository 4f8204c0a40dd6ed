"""What the package ships besides its code: version, type hints, examples.

The built wheel itself is tried by `.ci/check_wheel`, outside the checkout.
"""

import ast
import doctest
import importlib
import importlib.metadata
import importlib.resources
import pathlib
import pkgutil

from support.backends import once
from support.fresh_process import check_python

import keras_softmax

LIBRARY = pathlib.Path(keras_softmax.__file__).parent


def test_version_is_the_installed_metadata_version():
    assert keras_softmax.__version__ == importlib.metadata.version("keras-softmax")


def test_package_marks_itself_as_typed():
    assert (importlib.resources.files("keras_softmax") / "py.typed").is_file()


def _package_modules():
    yield keras_softmax
    for info in pkgutil.walk_packages(keras_softmax.__path__, "keras_softmax."):
        if not info.name.endswith(".__main__"):  # importing it runs the demo
            yield importlib.import_module(info.name)


def test_docstring_examples_of_the_package_run_in_the_suite(request):
    # `--doctest-modules` alone runs only what pytest collects: with the
    # package outside `testpaths`, no example in it would ever run.
    assert request.config.option.doctestmodules
    assert "keras_softmax" in request.config.getini("testpaths")
    finder = doctest.DocTestFinder()
    with_examples = {
        test.name
        for module in _package_modules()
        for test in finder.find(module)
        if test.examples
    }
    for name in (
        "keras_softmax.calibration.temperature.fit_temperature",
        "keras_softmax.calibration.metric.ExpectedCalibrationError",
        "keras_softmax.calibration.plot.reliability_diagram",
    ):
        assert name in with_examples


def _library_sources():
    """The library's modules: every one but the demo application's."""
    return [
        p for p in LIBRARY.rglob("*.py") if "demo" not in p.relative_to(LIBRARY).parts
    ]


def test_library_never_imports_the_demo_nor_reads_the_command_line():
    for path in _library_sources():
        tree = ast.parse(path.read_text())
        imported = {
            alias.name
            if isinstance(node, ast.Import)
            else f"{node.module}.{alias.name}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        assert not any(".demo" in name for name in imported), path
        read = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not read & {"argv", "orig_argv"}, path


@once
def test_importing_the_library_loads_no_module_of_the_demo():
    loaded = check_python(
        "-c",
        "import sys, keras_softmax\n"
        "print(sorted(m for m in sys.modules if m.startswith('keras_softmax.demo')))",
    )
    assert loaded.split()[-1] == "[]"


def _imported_modules(path):
    tree = ast.parse(path.read_text())
    return {
        alias.name if isinstance(node, ast.Import) else node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }


def test_only_the_tensorflow_edge_and_the_ledger_import_tensorflow():
    allowed = {
        LIBRARY / "_backend" / "tensorflow.py",
        LIBRARY / "_keras_internals.py",
    }
    importers = {
        path
        for path in _library_sources()
        if any(m.split(".")[0] == "tensorflow" for m in _imported_modules(path))
    }
    assert importers <= allowed, sorted(map(str, importers - allowed))
    assert LIBRARY / "_backend" / "tensorflow.py" in importers


def test_every_framework_edge_offers_the_whole_surface():
    from keras_softmax import _backend
    from keras_softmax._backend import base

    for module in ("tensorflow", "jax", "torch"):
        edge = importlib.import_module(f"keras_softmax._backend.{module}").EDGE
        assert isinstance(edge, base.Edge), module
        for name in base.SURFACE:
            assert callable(getattr(edge, name)), (module, name)
    assert isinstance(_backend.edge(), base.Edge)
    assert _backend.scan.__self__ is _backend.edge()


def test_the_edge_follows_the_backend_keras_reports(monkeypatch):
    import keras

    from keras_softmax import _backend

    here = _backend.edge()
    names = {"tensorflow": "TensorFlowEdge", "jax": "JaxEdge", "torch": "TorchEdge"}
    for name, edge in names.items():
        monkeypatch.setattr(keras.backend, "backend", lambda name=name: name)
        assert type(_backend.edge()).__name__ == edge
        assert _backend.is_concrete.__self__ is _backend.edge()
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    assert type(_backend.edge()) is _backend.Edge  # Keras' own answers
    monkeypatch.undo()
    assert _backend.edge() is here
