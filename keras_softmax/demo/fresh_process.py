"""Runs Python in a fresh interpreter: how the demo serves a saved model.

A fresh process is how a saved model is checked the way its users load it
(nothing registered or imported beforehand), and how an entry point is
tried the way a user starts it.
"""

import os
import subprocess
import sys


def run_python(*args: str, env=None, timeout: float = 600):
    """Runs `python *args` with this interpreter; returns the finished process.

    Args:
        *args: The interpreter's arguments, e.g. `"-c", code` or
            `"-m", "keras_softmax.demo", "--help"`.
        env: Variables to set on top of this process's environment; a value
            of `None` removes the variable.
        timeout: Seconds before the process is killed and
            `subprocess.TimeoutExpired` raised.

    Returns:
        A `subprocess.CompletedProcess` with `returncode`, and `stdout` and
        `stderr` as text.
    """
    environment = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )
