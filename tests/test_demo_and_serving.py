"""The main job and its entry points: train, save, export, serve, report."""

import json
import pathlib
import shutil
import subprocess
from typing import NamedTuple

import keras
import numpy as np
import pytest
from support.backends import BACKEND
from support.backends import exports
from support.backends import once
from support.fresh_process import run_python

from keras_softmax import StableSoftmax
from keras_softmax.demo import digits
from keras_softmax.demo import distributed
from keras_softmax.demo import quiet
from keras_softmax.demo import serving

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMITTED = REPO / "saved_models"
ON_TENSORFLOW = BACKEND == "tensorflow"


class DemoRun(NamedTuple):
    code: int
    output_dir: pathlib.Path
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A shorter run of the demo, as a user starts it, to a scratch directory."""
    output_dir = tmp_path_factory.mktemp("demo")
    result = run_python(
        "-m",
        "keras_softmax.demo",
        "--epochs",
        "15",
        "--output-dir",
        str(output_dir),
    )
    return DemoRun(result.returncode, output_dir, result.stdout, result.stderr)


def test_short_demo_run_trains_saves_exports_and_serves(demo_run):
    assert demo_run.code == 0, demo_run.stderr[-2000:]
    formats = serving.FORMATS if ON_TENSORFLOW else ("keras",)
    for fmt in formats:
        assert serving.artifact_path(demo_run.output_dir, digits.NAME, fmt).exists()
    manifest = serving.verify(demo_run.output_dir)
    assert manifest["test_accuracy"] >= 0.95
    assert manifest["keras_version"] == keras.__version__


def test_demo_report_compares_with_the_builtin_softmax(demo_run):
    report = demo_run.stdout
    for line in ("stable_softmax head", "built-in softmax head", "calibrated (T ="):
        assert line in report
    assert "training time, stable / built-in:" in report
    ways = ("keras", "saved_model", "tfsm_layer", "onnx", "litert")
    for way in ways if ON_TENSORFLOW else ways[:1]:
        assert f"  {way}" in report
    if not ON_TENSORFLOW:
        assert "skipped: exporting runs on the TensorFlow backend" in report


def test_demo_states_its_accuracy_bar_in_help_and_when_it_fails():
    assert f"below {digits.ACCURACY_BAR}" in digits._parser().format_help()
    assert digits._failure(digits.ACCURACY_BAR, []) is None
    failure = digits._failure(0.9306, [])
    assert failure.startswith("FAILED: test accuracy 0.9306")
    assert (
        f"below the bar of {digits.ACCURACY_BAR}" in failure and "--epochs" in failure
    )
    assert "onnx" in digits._failure(0.99, ["onnx"])


def test_stable_and_builtin_heads_reach_the_same_accuracy(demo_run):
    accuracies = [
        float(line.split()[-3])  # the accuracy, NLL and ECE columns
        for line in demo_run.stdout.splitlines()
        if line.startswith(("stable_softmax head", "built-in softmax head"))
    ]
    assert len(accuracies) == 2
    assert accuracies[0] >= 0.95
    assert abs(accuracies[0] - accuracies[1]) <= 0.01


def test_split_is_stratified_and_a_partition_of_the_data_set():
    from sklearn.datasets import load_digits

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = digits.load_digits(seed=0)
    # Every image and label lands in exactly one split: the three together,
    # sorted, are the whole data set, sorted.
    x_all, y_all = load_digits(return_X_y=True)
    whole = np.column_stack([x_all / 16.0, y_all])
    parts = np.vstack(
        [
            np.column_stack([x, y])
            for x, y in ((x_train, y_train), (x_val, y_val), (x_test, y_test))
        ]
    )
    assert len(parts) == len(whole) == 1797
    np.testing.assert_array_equal(
        parts[np.lexsort(parts.T)], whole[np.lexsort(whole.T)].astype(parts.dtype)
    )
    for labels in (y_val, y_test):
        shares = np.bincount(labels, minlength=10) / len(labels)
        np.testing.assert_allclose(
            shares, np.bincount(y_train) / len(y_train), atol=0.01
        )


def _one_error_line(stderr, prog):
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}:")]


@pytest.mark.parametrize(
    "entry_point, args, message",
    [
        (digits, ["--epochs", "0"], "--epochs"),
        (digits, ["--epochs", "many"], "--epochs"),
        (digits, ["--seed", "-1"], "--seed"),
        (digits, ["--temperature", "-1"], "--temperature"),
        (digits, ["--temperature", "nan"], "--temperature"),
        (digits, ["--bogus"], "--bogus"),
        (distributed, ["--epochs", "0"], "--epochs"),
        (distributed, ["--seed", "-1"], "--seed"),
        (distributed, ["--devices", "3"], "--devices"),
    ],
)
def test_bad_option_gives_one_clear_line_and_exit_code_2(
    entry_point, args, message, capsys
):
    with pytest.raises(SystemExit) as exit_:
        entry_point.main(args)
    assert exit_.value.code == 2
    errors = _one_error_line(capsys.readouterr().err, entry_point._parser().prog)
    assert len(errors) == 1 and message in errors[0]


# The options are parsed alike on every backend; one run each, as a user
# starts it, shows that the exit code and the line reach the shell.
@once
@pytest.mark.parametrize(
    "module, prog",
    [
        ("keras_softmax.demo", "keras-softmax-demo"),
        ("keras_softmax.demo.distributed", "python -m keras_softmax.demo.distributed"),
    ],
)
def test_bad_option_from_the_shell_exits_2_with_one_line(module, prog):
    result = run_python("-m", module, "--epochs", "0", timeout=120)
    assert result.returncode == 2
    errors = _one_error_line(result.stderr, prog)
    assert len(errors) == 1 and "--epochs" in errors[0]


@pytest.mark.parametrize("parser", [digits._parser, distributed._parser])
def test_every_option_of_both_entry_points_has_help_text(parser):
    actions = parser()._actions
    assert {"--epochs", "--seed"} <= {o for a in actions for o in a.option_strings}
    for action in actions:
        assert action.help, action.option_strings


# Words of TensorFlow's and LiteRT's log lines, checked besides the filter's
# own pattern so that a line it misses is still caught.
_LOG_WORDS = ("I0000", "E0000", "oneDNN", "cudart_stub", "cuInit", "absl::", "XNNPACK")


def _tensorflow_log_lines(text):
    return [
        line
        for line in text.splitlines()
        if quiet.is_tensorflow_log_line(line) or any(w in line for w in _LOG_WORDS)
    ]


@pytest.mark.parametrize(
    "line",
    [
        "WARNING: All log messages before absl::InitializeLog() is called are "
        "written to STDERR",
        "I0000 00:00:1795644685.468948    4444 port.cc:153] oneDNN custom "
        "operations are on.",
        "I0000 00:00:1795644685.469214    4444 cudart_stub.cc:31] Could not find "
        "cuda drivers on your machine, GPU will not be used.",
        "E0000 00:00:1795644685.469214    4444 cuda_executor.cc:1309] failed call "
        "to cuInit: INTERNAL: CUDA error",
        "2025-09-17 14:44:05.157831: I external/local_xla/xla/tsl/cuda/"
        "cudart_stub.cc:32] Could not find cuda drivers on your machine",
        "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    ],
)
def test_tensorflow_log_lines_are_recognised(line):
    assert quiet.is_tensorflow_log_line(line)


@pytest.mark.parametrize(
    "line",
    ["Epoch 1/3", "UserWarning: something", "Traceback (most recent call last):"],
)
def test_other_stderr_lines_are_not_taken_for_tensorflow_log_lines(line):
    assert not quiet.is_tensorflow_log_line(line)


@once
@pytest.mark.parametrize(
    "module", ["keras_softmax.demo", "keras_softmax.demo.distributed"]
)
def test_help_of_each_entry_point_is_on_stdout_without_log_lines(module):
    result = run_python("-m", module, "--help", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--epochs" in result.stdout
    assert _tensorflow_log_lines(result.stdout) == []


def test_demo_run_prints_one_line_per_epoch_and_no_log_lines_of_its_own(demo_run):
    epoch_lines = [
        line for line in demo_run.stdout.splitlines() if line.startswith("  epoch")
    ]
    assert len(epoch_lines) == 2 * 15  # two heads, 15 epochs each
    assert "━" not in demo_run.stdout  # no progress bar
    assert _tensorflow_log_lines(demo_run.stdout) == []
    # TensorFlow's start-up lines, written while Keras is imported, are the
    # user's to see; LiteRT's, written as the demo serves, are held back.
    assert "XNNPACK" not in demo_run.stderr


def test_demo_writes_by_default_to_a_directory_git_ignores():
    output_dir = digits._parser().parse_args([]).output_dir
    assert output_dir == "artifacts"
    probe = f"{output_dir}/{digits.NAME}.keras"
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", probe])
    assert ignored.returncode == 0, f"{probe} is not git-ignored"


def test_committed_artefacts_match_their_manifest_and_load_with_current_code():
    manifest = serving.verify(COMMITTED)
    model = serving.load_verified(COMMITTED, digits.NAME)
    (_, _), (_, _), (x_test, y_test) = digits.load_digits(seed=0)
    probs = model.predict(x_test, verbose=0)
    accuracy = float(np.mean(np.argmax(probs, axis=1) == y_test))
    assert accuracy == pytest.approx(manifest["test_accuracy"], abs=5e-5)
    inputs = {digits.INPUT_NAME: x_test}
    np.testing.assert_allclose(
        serving.predict_saved_model_fresh(
            serving.artifact_path(COMMITTED, digits.NAME, "saved_model"), inputs
        ),
        probs,
        atol=1e-6,
    )
    for fmt, predict in (
        ("onnx", serving.predict_onnx),
        ("litert", serving.predict_litert),
    ):
        served = predict(serving.artifact_path(COMMITTED, digits.NAME, fmt), inputs)
        np.testing.assert_allclose(served, probs, atol=1e-5)


def test_committed_artefacts_are_small():
    total = sum(f.stat().st_size for f in COMMITTED.rglob("*") if f.is_file())
    assert total < 512 * 1024


@pytest.mark.parametrize(
    "damage", ["truncate", "flip_a_byte", "delete"], ids=lambda d: d
)
@pytest.mark.parametrize("fmt", ["keras", "onnx", "saved_model"])
def test_truncated_or_tampered_artefact_is_refused_with_a_clear_error(
    tmp_path, damage, fmt
):
    copy = tmp_path / "saved_models"
    shutil.copytree(COMMITTED, copy)
    path = serving.artifact_path(copy, digits.NAME, fmt)
    if path.is_dir():
        path = path / "saved_model.pb"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_a_byte":
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        path.unlink()
    expected = "missing" if damage == "delete" else "truncated or was modified"
    with pytest.raises(serving.ArtifactError, match=expected) as info:
        serving.load_verified(copy, digits.NAME)
    assert path.name in str(info.value)


def test_truncated_keras_file_fails_to_load_with_an_error_not_a_crash(tmp_path):
    path = tmp_path / "model.keras"
    data = serving.artifact_path(COMMITTED, digits.NAME, "keras").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BaseException) as info:  # SystemExit included
        keras.saving.load_model(path, safe_mode=True)
    # An ordinary error that names the file, not an exit.
    assert isinstance(info.value, ValueError), repr(info.value)
    assert str(path) in str(info.value)


def test_manifest_records_versions_data_set_and_every_file():
    manifest = json.loads((COMMITTED / "manifest.json").read_text())
    for key in ("package_version", "keras_version", "tensorflow_version", "dataset"):
        assert manifest[key]
    files = {
        f.relative_to(COMMITTED).as_posix()
        for f in COMMITTED.rglob("*")
        if f.is_file() and f.name != "manifest.json"
    }
    assert set(manifest["sha256"]) == files


@exports
def test_exports_of_a_fresh_model_serve_the_same_probabilities(demo_run):
    output_dir = demo_run.output_dir
    model = serving.load_verified(output_dir, digits.NAME)
    x_test = digits.load_digits(seed=0)[2][0]
    differences = digits.check_served(
        serving.save(model, output_dir / "again", digits.NAME),
        model,
        {"pixels": x_test},
    )
    assert set(differences) == {"keras", "saved_model", "tfsm_layer", "onnx", "litert"}
    for way, difference in differences.items():
        assert difference <= digits.TOLERANCES[way], way


def _masked_model():
    logits = keras.Input((6,), name="logits")
    mask = keras.Input((6,), dtype="bool", name="mask")
    probs = StableSoftmax(temperature=0.7)(logits, mask=mask)
    return keras.Model([logits, mask], probs)


@exports
@pytest.mark.parametrize(
    "fully_masked_row", [True, False], ids=["exact formula", "fused kernel"]
)
def test_model_with_mask_as_second_input_exports_and_serves_everywhere(
    tmp_path, fully_masked_row
):
    # Ordinary rows alone take the fused kernel inside the exported graph; a
    # fully masked row sends the batch down the exact formula.
    model = _masked_model()
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(5, 6)) * 20).astype("float32")
    mask = rng.random((5, 6)) > 0.4
    mask[:, 1] = True
    if fully_masked_row:
        mask[0] = False  # must come out as zeros everywhere
    inputs = {"logits": logits, "mask": mask}
    model([logits, mask])  # exporters need a model that has been called
    expected = model.predict([logits, mask], verbose=0)
    np.testing.assert_array_equal(expected[~mask.any(axis=1)], 0.0)
    np.testing.assert_allclose(expected[mask.any(axis=1)].sum(axis=1), 1.0, 1e-6)
    paths = serving.save(model, tmp_path, "masked")
    served = {
        "keras": serving.predict_keras_fresh(paths["keras"], inputs),
        "saved_model": serving.predict_saved_model_fresh(paths["saved_model"], inputs),
        "tfsm_layer": serving.predict_tfsm_layer(paths["saved_model"], inputs),
        "onnx": serving.predict_onnx(paths["onnx"], inputs),
        "litert": serving.predict_litert(paths["litert"], inputs),
    }
    for way, values in served.items():
        np.testing.assert_allclose(
            values, expected, atol=digits.TOLERANCES[way], err_msg=way
        )
        np.testing.assert_array_equal(values[~mask], 0.0, err_msg=way)


@exports
def test_exported_masked_softmax_keeps_its_guarantees_on_special_inputs(tmp_path):
    model = _masked_model()
    big = 3e38
    logits = np.array(
        [
            [1000.0, 1001.0, 1002.0, 0.0, -5.0, 2.0],  # large, ordinary
            [-np.inf, 0.0, 1.0, -np.inf, 2.0, 3.0],  # -inf kept
            [np.inf, 0.0, 1.0, 2.0, 3.0, 4.0],  # +inf masked: ignored
            [big, -big, big / 2, 0.0, 1.0, 2.0],  # near float32 max
            [-np.inf, -np.inf, 1.0, 2.0, 3.0, 4.0],  # all kept are -inf
            [np.nan, 0.0, 1.0, 2.0, 3.0, 4.0],  # NaN masked: still NaN
            [np.inf, 0.0, 1.0, 2.0, 3.0, 4.0],  # +inf kept: NaN
            [0.0, np.nan, 1.0, 2.0, 3.0, 4.0],  # NaN kept: NaN
        ],
        np.float32,
    )
    mask = np.ones((8, 6), bool)
    mask[2, 0] = mask[4, 2:] = mask[5, 0] = False
    inputs = {"logits": logits, "mask": mask}
    model([logits, mask])
    expected = model.predict([logits, mask], verbose=0)
    assert np.all(np.isnan(expected[5:])) and not np.any(np.isnan(expected[:5]))
    np.testing.assert_array_equal(expected[4], 0.0)
    paths = serving.save(model, tmp_path, "special", ("saved_model", "onnx", "litert"))
    served = {
        "saved_model": serving.predict_saved_model_fresh(paths["saved_model"], inputs),
        "onnx": serving.predict_onnx(paths["onnx"], inputs),
        "litert": serving.predict_litert(paths["litert"], inputs),
    }
    for way, values in served.items():
        np.testing.assert_allclose(
            values, expected, atol=digits.TOLERANCES[way], equal_nan=True, err_msg=way
        )


def _installed(backend):
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# On this backend itself, tests/test_keras_integration.py loads .keras files
# in a fresh process; here, on the next backend of a ring, so that across
# CI's three passes each backend saves a file and loads another's.
NEXT_BACKEND = {"tensorflow": "jax", "jax": "torch", "torch": "tensorflow"}


def test_keras_file_saved_on_this_backend_loads_on_the_next_one(tmp_path):
    backend = NEXT_BACKEND[BACKEND]
    if not _installed(backend):
        pytest.fail(f"{backend} is not installed: pip install -e '.[test]'")
    model = digits.build_model("stable_softmax", seed=3)
    x_test = digits.load_digits(seed=0)[2][0]
    expected = model.predict(x_test, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    code = f"""
import numpy as np, keras, keras_softmax
assert keras.backend.backend() == {backend!r}
model = keras.saving.load_model({str(path)!r}, safe_mode=True)
x = np.load({str(tmp_path / "x.npy")!r})
np.save({str(tmp_path / "out.npy")!r}, model.predict(x, verbose=0))
"""
    np.save(tmp_path / "x.npy", x_test)
    result = run_python(
        "-c",
        code,
        env={"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = np.load(tmp_path / "out.npy")
    np.testing.assert_allclose(loaded, expected, atol=1e-6)
    np.testing.assert_array_equal(np.argmax(loaded, 1), np.argmax(expected, 1))
