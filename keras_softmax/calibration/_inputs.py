"""Checks of the arrays the calibration functions take, each error naming them.

Every function here takes NumPy arrays, lists or tensors of any backend and
returns float64 or int64 NumPy arrays, so the fit and the calibration error
compute in float64 whatever the backend.
"""

import numbers

import keras
import numpy as np
from keras import ops


def to_numpy(x) -> np.ndarray:
    """`x` as a NumPy array: tensors of any backend go through Keras."""
    # Lists stay float64, rather than going through floatx.
    if ops.is_tensor(x) or isinstance(x, keras.Variable):
        return np.asarray(ops.convert_to_numpy(x))
    return np.asarray(x)


def check_scores(x, name: str) -> np.ndarray:
    """Checks logits or probabilities; returns them as float64 NumPy.

    Raises:
        ValueError: naming `name` if `x` is not a finite, real array of shape
            `(num_examples, num_classes)`, with at least one example and two
            classes.
    """
    x = to_numpy(x)
    if x.dtype == bool or not (
        np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    ):
        raise ValueError(
            f"`{name}` must hold real numbers. Received: {name}.dtype={x.dtype}"
        )
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(
            f"`{name}` must have shape (num_examples, num_classes), with at "
            f"least two classes. Received: {name}.shape={x.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError(
            f"`{name}` must hold at least one example. Received: {name}.shape={x.shape}"
        )
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        i, j = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(
            f"`{name}` must be finite. Received: {name}[{i}, {j}]={x[i, j]}"
        )
    return x


def check_labels(labels, scores_shape, name: str) -> np.ndarray:
    """Checks class ids or one-hot rows; returns class ids as int64 NumPy.

    Raises:
        ValueError: naming `name` and the first bad entry if `labels` does
            not match `scores_shape` `(num_examples, num_classes)` as class
            ids of shape `(num_examples,)` or `(num_examples, 1)`, or as
            one-hot rows of shape `(num_examples, num_classes)`.
    """
    n, num_classes = scores_shape
    labels = to_numpy(labels)
    numeric = labels.dtype != bool and (
        np.issubdtype(labels.dtype, np.integer)
        or np.issubdtype(labels.dtype, np.floating)
    )
    if labels.shape == (n, num_classes):
        valid = (labels == 0) | (labels == 1)
        rows = np.all(valid, axis=1) & (np.sum(labels == 1, axis=1) == 1)
        if not np.all(rows):
            i = int(np.argmin(rows))
            raise ValueError(
                f"`{name}` of shape (num_examples, num_classes) must be one-hot: "
                f"one 1 per row, 0 elsewhere. Received: {name}[{i}]="
                f"{labels[i].tolist()}"
            )
        return np.argmax(labels, axis=1)
    if labels.shape not in ((n,), (n, 1)):
        raise ValueError(
            f"`{name}` must have shape ({n},) or ({n}, 1) of class ids, or "
            f"({n}, {num_classes}) of one-hot rows, to match {n} examples of "
            f"{num_classes} classes. Received: {name}.shape={labels.shape}"
        )
    labels = labels.reshape(-1)
    if not numeric:
        raise ValueError(
            f"`{name}` must be integer class ids. Received: {name}.dtype={labels.dtype}"
        )
    bad = ~np.isfinite(labels) | (labels != np.floor(labels))
    if np.any(bad):
        i = int(np.argmax(bad))
        raise ValueError(
            f"`{name}` must be integer class ids. Received: {name}[{i}]={labels[i]}"
        )
    out = (labels < 0) | (labels >= num_classes)
    if np.any(out):
        i = int(np.argmax(out))
        raise ValueError(
            f"`{name}` must be class ids in [0, {num_classes}). "
            f"Received: {name}[{i}]={labels[i]}"
        )
    return labels.astype(np.int64)


def check_num_bins(num_bins) -> int:
    """Returns `num_bins` as an int; raises `ValueError` unless it is one >= 1."""
    if (
        not isinstance(num_bins, numbers.Integral)
        or isinstance(num_bins, bool)
        or num_bins < 1
    ):
        raise ValueError(
            f"`num_bins` must be a positive integer. Received: num_bins={num_bins!r}"
        )
    return int(num_bins)
