"""The reliability diagram: accuracy against confidence, bin by bin.

Needs matplotlib (the `plots` extra), which is imported only when a diagram
is drawn, so the rest of `keras_softmax.calibration` works without it.
"""

import numpy as np

from keras_softmax.calibration.metric import bin_statistics


def reliability_diagram(probs, labels, num_bins: int = 15, ax=None):
    """Draws accuracy against confidence, bin by bin.

    Bars show the accuracy of each non-empty bin, shaded bars the gap to its
    mean confidence, and a dashed diagonal perfect calibration; the title
    gives the expected calibration error. Bins are those of
    `expected_calibration_error`. Needs matplotlib: `pip install
    keras-softmax[plots]`.

    Args:
        probs: Probabilities, as for `expected_calibration_error`.
        labels: Labels, as for `expected_calibration_error`.
        num_bins: Positive integer. Defaults to 15.
        ax: Optional matplotlib `Axes` to draw on. If `None`, a new figure
            is made, without pyplot, so no window opens and none is kept.

    Returns:
        The matplotlib `Figure` drawn on.

    Example:

    >>> from keras_softmax.calibration import reliability_diagram
    >>> probs = [[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.3, 0.7]]
    >>> figure = reliability_diagram(probs, [0, 0, 1, 0], num_bins=10)
    >>> figure.axes[0].get_title()
    'Reliability diagram (ECE = 15.00%)'
    """
    try:
        import matplotlib.figure
    except ImportError as error:
        raise ImportError(
            "`reliability_diagram` needs matplotlib. Install it with "
            "`pip install keras-softmax[plots]`."
        ) from error

    counts, confidences, hits = bin_statistics(probs, labels, num_bins)
    ece = np.sum(np.abs(hits - confidences)) / np.sum(counts)
    if ax is None:
        ax = matplotlib.figure.Figure(figsize=(4.5, 4.5)).add_subplot()
    filled = counts > 0
    left = (np.arange(num_bins) / num_bins)[filled]
    accuracy = hits[filled] / counts[filled]
    confidence = confidences[filled] / counts[filled]
    bars = {"width": 1 / num_bins, "align": "edge", "edgecolor": "black"}
    ax.bar(left, accuracy, color="tab:blue", label="Accuracy", **bars)
    ax.bar(
        left,
        confidence - accuracy,
        bottom=accuracy,
        color="tab:red",
        alpha=0.3,
        hatch="//",
        label="Gap to confidence",
        **bars,
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", label="Perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("Confidence")
    ax.set_ylabel("Accuracy")
    ax.set_title(f"Reliability diagram (ECE = {100 * ece:.2f}%)")
    ax.legend(loc="upper left")
    return ax.figure
