"""The tests' fresh interpreters: `run_python` (the demo's) and `check_python`.

The demo's `run_python` starts the interpreter; a test wants its output,
and a failure with the end of its stderr.
"""

from keras_softmax.demo.fresh_process import run_python  # noqa: F401 (re-exported)


def check_python(*args: str, env=None, timeout: float = 600) -> str:
    """Like `run_python`, but returns stdout, and raises if the process failed.

    Raises:
        RuntimeError: if the exit code is not 0, with the end of stderr.
    """
    result = run_python(*args, env=env, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(
            f"python {' '.join(args)[:200]} exited with {result.returncode}:\n"
            f"{result.stderr[-3000:]}"
        )
    return result.stdout
