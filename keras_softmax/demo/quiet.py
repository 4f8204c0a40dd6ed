"""The demo's quiet output: TensorFlow's and LiteRT's C++ log lines held back.

C++ code writes to file descriptor 2 itself, past `sys.stderr`: TensorFlow's
converters as the demo exports, LiteRT's interpreter each time it serves a
`.tflite` file. `without_tensorflow_log_lines` catches the descriptor for a
block and writes back everything that is not such a log line (Python
warnings, a traceback).

TensorFlow's start-up lines (TensorFlow 2.21: three per shared library, two
libraries) are absl's, written before its logging is set up, so
`TF_CPP_MIN_LOG_LEVEL` does not hide them, even when set before Python
starts; only catching the descriptor while TensorFlow is imported does. That
import happens in `keras_softmax/__init__.py` (Keras, to register the
activation names), which Python runs before any module of the demo, for
`python -m keras_softmax.demo` and the `keras-softmax-demo` script alike, and
the library leaves its user's logs alone. So they reach stderr; `2>/dev/null`
hides them.
"""

import contextlib
import os
import re
import sys
import tempfile

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
