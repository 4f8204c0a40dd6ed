"""The command-line options that the demo and the distributed run share.

Both entry points take `--epochs` and `--seed` with the same defaults and
checks, and report a bad option in one line with exit code 2.
"""

import argparse


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line and exit with 2."""

    def error(self, message):
        # The usage block would bury the one line that says what is wrong.
        self.exit(2, f"{self.prog}: error: {message}\n")


def training_parser(prog: str, description: str) -> Parser:
    """A parser with the options every entry point takes: `--epochs`, `--seed`."""
    parser = Parser(prog=prog, description=description)
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=40,
        help="epochs to train each model for (default 40)",
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seed of the data split and of the initial weights (default 0)",
    )
    return parser


def positive_int(text: str) -> int:
    """`text` as an integer >= 1; else an `ArgumentTypeError` quoting it."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """`text` as an integer >= 0; else an `ArgumentTypeError` quoting it."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value
