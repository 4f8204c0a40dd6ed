"""A quiet start for the command-line entry points: no TensorFlow C++ log lines.

TensorFlow writes lines such as `I0000 ... port.cc] oneDNN custom operations
are on`, `cudart_stub.cc] Could not find cuda drivers` or `E0000 ... failed
call to cuInit` to the process's stderr while it is imported. TensorFlow
2.21 logs them through absl before absl's logging is set up, so
`TF_CPP_MIN_LOG_LEVEL` does not reach them: only catching file descriptor 2
during the import does. Everything else written there (Python warnings, a
traceback) is written back. The demo does the same while it serves its
artefacts, where LiteRT's interpreter announces itself in C++.

`python -m keras_softmax.demo` imports `keras_softmax/__init__.py`, and so
Keras and TensorFlow, before the first line of `demo.py` runs: the package
calls `quiet_tensorflow` first when one of its entry points is running.
This module imports nothing but the standard library, and does nothing on
a plain `import keras_softmax`: a library does not silence its user's logs.
"""

import contextlib
import importlib.util
import os
import pathlib
import re
import sys
import tempfile

ENTRY_MODULES = ("keras_softmax.demo", "keras_softmax.distributed")
ENTRY_SCRIPTS = ("keras-softmax-demo",)

_TENSORFLOW_LOG_LINE = re.compile(
    # absl's format: "I0000 00:00:1795644752.438302    4611 port.cc:153] ..."
    r"[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] "  # TensorFlow's own format
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|To enable the following instructions:"  # the second line of cpu_feature_guard
    # LiteRT (TensorFlow Lite) says so each time an interpreter starts.
    r"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU"
)


def is_tensorflow_log_line(line: str) -> bool:
    """Whether `line` is one of TensorFlow's or LiteRT's C++ log lines."""
    return _TENSORFLOW_LOG_LINE.match(line) is not None


def entry_point_running(orig_argv=None, argv=None) -> bool:
    """Whether this interpreter runs `python -m` on an entry point, or its script.

    Args:
        orig_argv: The interpreter's command line; defaults to `sys.orig_argv`.
        argv: The program's arguments; defaults to `sys.argv`, whose first
            element is `"-m"` while `python -m` imports the module's package.
    """
    orig_argv = list(sys.orig_argv if orig_argv is None else orig_argv)
    argv = list(sys.argv if argv is None else argv)
    if argv and pathlib.Path(argv[0]).stem in ENTRY_SCRIPTS:
        return True
    # The interpreter's own options end where the program's arguments begin.
    interpreter = orig_argv[: len(orig_argv) - max(len(argv) - 1, 0)]
    if len(interpreter) >= 2 and interpreter[-2] == "-m":
        return interpreter[-1] in ENTRY_MODULES
    return bool(interpreter) and interpreter[-1] in ("-m" + m for m in ENTRY_MODULES)


def quiet_tensorflow() -> None:
    """Imports TensorFlow, if installed, without its C++ log lines.

    Also sets `TF_CPP_MIN_LOG_LEVEL=3` unless it is set, for the lines that
    TensorFlow logs later, through its own logging. Neither changes any
    numerical setting (`TF_ENABLE_ONEDNN_OPTS` is left as it is).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return
    with without_tensorflow_log_lines():
        import tensorflow  # noqa: F401


@contextlib.contextmanager
def without_tensorflow_log_lines():
    """Catches what is written to file descriptor 2, and writes back the rest.

    C++ code writes to the descriptor itself, past `sys.stderr`; every line
    that is not a TensorFlow or LiteRT log line is written back when the
    block ends, whether it ends normally or by an exception.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            kept = [
                line
                for line in text.splitlines(keepends=True)
                if not is_tensorflow_log_line(line)
            ]
            sys.stderr.write("".join(kept))
