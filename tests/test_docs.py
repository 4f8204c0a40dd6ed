"""The documentation: the API reference covers the public API, and the README
stays short and runs.

`mkdocs build --strict` (in .ci/run) checks that the pages build without a
warning; these tests check what a build cannot: that no public name is left
out of the reference, that the built pages render each object as meant, and
that the README's example still works.
"""

import html
import importlib
import importlib.util
import inspect
import os
import pathlib
import re
import subprocess
import sys

import griffe
import pytest
import yaml
from support.backends import once
from support.fresh_process import check_python

import keras_softmax
from keras_softmax import calibration
from keras_softmax.registration import ACTIVATIONS

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 300
# The README's section whose Python block a user runs on their own model.
OWN_MODEL_HEADING = "## Your own model"


def _directives():
    """(target, page) for every `::: target` of mkdocstrings in docs/; the
    page is its path in the built site, e.g. `api/attention`."""
    return [
        (target, page.relative_to(DOCS).with_suffix("").as_posix())
        for page in sorted(DOCS.rglob("*.md"))
        for target in re.findall(r"^:::\s+(\S+)", page.read_text(), re.MULTILINE)
    ]


def _resolve(path):
    """The object a dotted path names at run time, as `import` finds it."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _public_names():
    return [f"keras_softmax.{name}" for name in keras_softmax.__all__] + [
        f"keras_softmax.calibration.{name}" for name in calibration.__all__
    ]


def _directive_targets():
    """Every `::: target` in docs/, a public object's own path (where its
    public name is shadowed by a submodule) read as its public name."""
    public = {}
    for name in _public_names():
        obj = _resolve(name)
        if not inspect.ismodule(obj):
            public[f"{obj.__module__}.{obj.__qualname__}"] = name
    return {public.get(target, target) for target, _ in _directives()}


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


# The built site: what `mkdocs build --strict` lets through.


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The API reference, built once for this module's tests."""
    directory = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(directory)],
        cwd=ROOT,  # mkdocs.yml's paths are relative to the checkout
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return directory


def _returns_lines(path):
    """The lines of the `Returns:` section of `path`'s docstring, stripped."""
    lines = inspect.getdoc(_resolve(path)).splitlines()
    if "Returns:" not in lines:
        return []
    start = lines.index("Returns:") + 1
    end = lines.index("", start) if "" in lines[start:] else len(lines)
    return [line.strip() for line in lines[start:end]]


def _text(html_text):
    """The text of an HTML fragment, its whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", html_text)).split())


def _own_returns_section(page, path):
    """The HTML of the `Returns:` section of the object `path` documents."""
    after = re.split(r"</h\d>", page.split(f'id="{path}"', 1)[1], maxsplit=1)[1]
    title = after.index('<span class="doc-section-title">Returns:</span>')
    # A member's heading before it: the section would be the member's.
    own = "doc-heading" not in after[:title]
    assert own, f"{path} renders no Returns section of its own"
    end = re.compile(r"</ul>|</table>").search(after, title).end()
    return after[title:end]


RETURNS = [
    pytest.param(target, page, id=target)
    for target, page in _directives()
    if len(_returns_lines(target)) > 0
]


@once
@pytest.mark.parametrize("target, page", RETURNS)
def test_returns_renders_as_one_item(site, target, page):
    # griffe's Google parser reads each line of `Returns:` at the section's
    # indent as a new item, so a wrapped description became several.
    section = _own_returns_section((site / page / "index.html").read_text(), target)
    items = section.count('class="doc-section-item')
    assert items == 1, f"{target}'s Returns renders as {items} items"
    expected = " ".join(_returns_lines(target)).replace("`", "")
    assert expected in _text(section), (expected, _text(section))


def test_the_returns_of_wrapped_descriptions_are_checked():
    # The objects whose wrapped Returns rendered as several items.
    wrapped = {target for target, _ in _directives() if len(_returns_lines(target)) > 1}
    assert wrapped >= {
        "keras_softmax.dot_product_attention",
        "keras_softmax.StableMultiHeadAttention",
        "keras_softmax.calibration.calibrate",
        "keras_softmax.stable_softmax",
    }


def _keras_to_google():
    """docs/griffe_keras.py's rewriting, which mkdocstrings loads by path."""
    path = DOCS / "griffe_keras.py"
    spec = importlib.util.spec_from_file_location("griffe_keras", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.keras_to_google


def test_a_returns_description_is_read_as_one_description():
    # What no docstring has yet: a first line that griffe would read as a
    # name and a type, and a wrapped line with a colon.
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    (mkdocstrings,) = [
        p["mkdocstrings"]
        for p in config["plugins"]
        if isinstance(p, dict) and "mkdocstrings" in p
    ]
    options = mkdocstrings["handlers"]["python"]["options"]["docstring_options"]
    text = _keras_to_google()(
        "Summary.\n\nReturns:\n    Shape (B, T): the output, wrapped\n"
        "    onto a line: with a colon.\n"
    )
    docstring = griffe.Docstring(
        text, parser="google", parser_options=options, parent=griffe.Function("f")
    )
    (returns,) = [s.value for s in docstring.parsed if s.kind.value == "returns"]
    assert [(r.name, r.annotation, r.description) for r in returns] == [
        ("", None, "Shape (B, T): the output, wrapped\nonto a line: with a colon.")
    ]


def _is_module(path):
    try:
        return importlib.util.find_spec(path) is not None
    except ModuleNotFoundError:  # its parent is a module, not a package
        return False


def test_no_directive_names_a_shadowed_submodule():
    # `keras_softmax.linear_cross_entropy` is both a submodule and the
    # function the package re-exports; griffe resolves the name to the
    # module, so `::: keras_softmax.linear_cross_entropy` rendered the
    # module's docstring. A directive names such an object by its real path.
    shadowed = [
        target
        for target, _ in _directives()
        if _is_module(target) and not inspect.ismodule(_resolve(target))
    ]
    assert not shadowed, f"these name a submodule, not the object: {shadowed}"


@once
def test_linear_cross_entropy_renders_the_function(site):
    page = (site / "api" / "large_vocabulary" / "index.html").read_text()
    function = keras_softmax.linear_cross_entropy
    module = sys.modules["keras_softmax.linear_cross_entropy"]
    # The function is the directive's root object: a top-level heading
    # with its signature, keyword-only arguments included.
    headings = [_text(h) for h in re.findall(r"<h2 .*?</h2>", page, re.DOTALL)]
    assert any(
        h.startswith("linear_cross_entropy(labels, inputs, kernel")
        and "chunk_size" in h
        for h in headings
    ), headings
    text = _text(page)
    summary = inspect.getdoc(function).split("\n\n")[0]
    assert _text(summary).replace("`", "") in text
    for paragraph in inspect.getdoc(module).split("\n\n"):
        assert _text(paragraph).replace("`", "") not in text, paragraph
