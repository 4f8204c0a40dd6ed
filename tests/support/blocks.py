"""Blocks small enough that short test sequences span several."""

import contextlib
from unittest import mock


@contextlib.contextmanager
def small_blocks(side=2, large_scores=None):
    """Blocks of `side` queries and keys; chosen from `large_scores` scores
    if given (else at the library's size, which no test reaches)."""
    from keras_softmax import _blockwise_attention

    sizes = dict(_BLOCK_ELEMENTS=side * side, _MIN_BLOCK=side, _MAX_BLOCK=side)
    if large_scores is not None:
        sizes["LARGE_SCORES"] = large_scores
    with mock.patch.multiple(_blockwise_attention, **sizes):
        yield
