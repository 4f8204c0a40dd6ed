"""What the package ships besides its code: version, type hints, examples.

The built wheel itself is tried by `.ci/check_wheel`, outside the checkout.
"""

import doctest
import importlib
import importlib.metadata
import importlib.resources
import pkgutil

import keras_softmax


def test_version_is_the_installed_metadata_version():
    assert keras_softmax.__version__ == importlib.metadata.version("keras-softmax")


def test_package_marks_itself_as_typed():
    assert (importlib.resources.files("keras_softmax") / "py.typed").is_file()


def _package_modules():
    yield keras_softmax
    for info in pkgutil.walk_packages(keras_softmax.__path__, "keras_softmax."):
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
