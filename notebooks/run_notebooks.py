"""Runs the tutorial notebooks; with `--write`, saves their fresh outputs.

Without `--write` it runs each notebook and says whether it ran clean,
leaving the files as they are. With `--write` it is the one command that
regenerates the outputs committed with the notebooks (run it after changing
a notebook or the code it shows):

    python notebooks/run_notebooks.py                     # run all, write nothing
    python notebooks/run_notebooks.py --write             # regenerate all
    python notebooks/run_notebooks.py --write 02_masking_and_temperature.ipynb

It needs the packages the notebooks import: nbclient, nbformat, ipykernel and
matplotlib, and, for the PyTorch row of the first notebook, torch (a CPU
build is enough: `pip install torch==2.13.0`). Without torch the first
notebook still runs, and says in its output that the row is left out.

Each notebook runs from its first cell to its last in a fresh "python3"
kernel (the Python that runs this script), with `notebooks/` as its working
directory and a 600 s limit per cell. The notebooks fix every random seed,
so a re-run on the same machine reproduces their numbers digit for digit;
`tests/test_notebooks.py` re-runs them the same way, in memory, and checks
the committed outputs against the fresh ones.
"""

import os
import pathlib
import sys
import time

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 600
KERNEL_NAME = "python3"
# ipykernel normally forwards what C++ libraries write to the process's file
# descriptors into the notebook; TensorFlow logs a few start-up lines there
# that TF_CPP_MIN_LOG_LEVEL does not silence. With this, they stay in the
# terminal, and the notebook keeps only what Python prints (warnings
# included).
KERNEL_ARGUMENTS = ["--IPKernelApp.capture_fd_output=False"]


def kernel_environment(**overrides) -> dict:
    """The kernel's environment: this one, with plots drawn inline as PNG."""
    env = dict(os.environ)
    # The tutorials are written for the TensorFlow backend (they export a
    # SavedModel and call tf.nn.softmax), whatever backend runs the tests.
    env["KERAS_BACKEND"] = "tensorflow"
    # A headless MPLBACKEND=Agg (common in CI) would make plt.show() draw
    # nothing; the inline backend saves each figure into the notebook.
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env.update(overrides)
    return env


def execute(path, env=None):
    """Runs the notebook at `path` in memory; returns `(notebook, seconds)`.

    The file is not modified. Raises `nbclient.exceptions.CellExecutionError`
    naming the cell if a cell raises.

    Args:
        path: The `.ipynb` file.
        env: The kernel's environment; defaults to `kernel_environment()`.
    """
    import nbformat
    from nbclient import NotebookClient

    path = pathlib.Path(path)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_S,
        record_timing=False,  # no timestamps in the saved cells' metadata
        extra_arguments=KERNEL_ARGUMENTS,
        resources={"metadata": {"path": str(path.parent)}},  # working directory
    )
    start = time.perf_counter()
    client.execute(env=kernel_environment() if env is None else env)
    return notebook, time.perf_counter() - start


def main(argv=None) -> int:
    import argparse

    import nbformat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all)")
    parser.add_argument(
        "--write", action="store_true", help="save the fresh outputs into the files"
    )
    args = parser.parse_args(argv)
    paths = [NOTEBOOK_DIR / pathlib.Path(n).name for n in args.names] or NOTEBOOKS
    for path in paths:
        notebook, seconds = execute(path)
        if args.write:
            nbformat.write(notebook, path)
        done = "executed and saved" if args.write else "ran clean (not saved)"
        print(f"{path.name}: {done} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
