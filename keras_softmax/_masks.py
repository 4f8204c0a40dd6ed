"""Masks: the one place they are normalised, and the one causal mask."""

import keras
from keras import ops

from keras_softmax import _arguments
from keras_softmax import _backend


def to_keep_mask(mask, shape, align="trailing", target=None):
    """`mask` as bools that broadcast to `shape`, `True` to keep; or None.

    The one place masks are normalised. A numeric mask keeps the positions
    where it is `> 0.5`.

    Args:
        mask: A mask, or None.
        shape: The static shape of what is masked (unknown sizes as None).
        align: How a mask of lower rank meets `shape`:
            `"trailing"`: as NumPy broadcasts, its last axis on the last.
            `"leading"`: a Keras mask, one value per leading position (a
            timestep): a mask shaped like the leading axes of `shape` gets
            trailing axes of size 1; any other aligns as `"trailing"`.
            A negative int `a`: the missing axes are inserted at axis `a`,
            as Keras' `MultiHeadAttention` inserts the heads' axes into an
            attention mask.
        target: What `shape` is, for the error (e.g. attention's scores);
            None for the softmax's `x`.
    """
    if mask is None:
        return None
    mask = _backend.to_tensor(mask)
    shape = tuple(shape)
    missing = len(shape) - len(mask.shape)
    if missing > 0 and align == "leading":
        leading = shape[: len(mask.shape)]
        if _arguments.broadcasts_exactly(_backend.static_shape(mask), leading):
            mask = ops.reshape(mask, tuple(ops.shape(mask)) + (1,) * missing)
    elif missing > 0 and isinstance(align, int):
        for _ in range(missing):
            mask = ops.expand_dims(mask, align)
    check_mask_shape(_backend.static_shape(mask), shape, target)
    if keras.backend.standardize_dtype(mask.dtype) != "bool":
        mask = ops.greater(mask, 0.5)
    return mask


def check_mask_shape(mask_shape, x_shape, target=None):
    """Raises unless a mask of `mask_shape` broadcasts to `x_shape` (which is
    `target`, where given, in the error)."""
    mask_shape, x_shape = tuple(mask_shape), tuple(x_shape)
    if _arguments.broadcasts(mask_shape, x_shape):
        return
    if target is not None:
        raise ValueError(
            f"`mask` must be broadcastable to {target} = {x_shape}. "
            f"Received: mask.shape={mask_shape}"
        )
    extra = (
        " and must not have more dimensions" if len(mask_shape) > len(x_shape) else ""
    )
    raise ValueError(
        f"`mask` must be broadcastable to `x`{extra}. "
        f"Received: mask.shape={mask_shape}, x.shape={x_shape}"
    )


def causal_mask(query_length, key_length, query_start=0, key_start=0):
    """`(1, 1, T, S)` bools, True where key position <= query position.

    With starts, the block of the causal mask from query `query_start` and
    key `key_start` on (attention's blocks).
    """
    rows = query_start + ops.arange(query_length)[:, None]
    cols = key_start + ops.arange(key_length)[None, :]
    return ops.greater_equal(rows, cols)[None, None]


def with_causal(keep, query_length, key_length):
    """`keep` (None: nothing masked) and the causal mask, combined."""
    causal = causal_mask(query_length, key_length)
    return causal if keep is None else ops.logical_and(keep, causal)
