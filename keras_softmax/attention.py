"""Dot-product attention that never attends to padding.

A query whose keys are all masked gets an output of exactly 0 (and weights
of 0), where `keras.ops.dot_product_attention` averages the masked values.

The work goes to fused attention whenever its answer is exact: with the
temperature at 1 or above (folded into `scale`) and no weights to return.
On a GPU that is the device's own kernel, called directly (cuDNN's through
`jax.nn.dot_product_attention`, the flash and memory-efficient kernels of
PyTorch's `scaled_dot_product_attention`), at any length and with any mask;
elsewhere Keras' attention, or for long sequences the blocks
(`_blockwise_attention`). Two changes make a kernel exact for every query:

* Masking is additive, with the lowest finite float rather than Keras' fill
  of -0.7 times the largest: a masked score then stays at least 3.4e38
  below the kept maximum for any score spread under that, so exp gives it
  exactly 0. A finite fill survives the converters: tf2onnx rewrites a
  `where` as `c * a + (1 - c) * b`, where a -inf fill would give NaN.
* A query with nothing kept is unmasked, so the kernel sees ordinary finite
  scores (finite gradients), and its output row is then multiplied by 0.
  A multiplication, not a `where`, so that exported graphs keep the zeros.

A temperature below 1, or held in a tensor, could overflow the scores once
folded into `scale`; those calls take the explicit path, through
`stable_softmax`, which shifts by the maximum before it divides.
"""

import math
from typing import NamedTuple

import keras
from keras import ops

from keras_softmax import _arguments
from keras_softmax import _backend
from keras_softmax import _blockwise_attention
from keras_softmax import _dtypes
from keras_softmax import _masks
from keras_softmax import _numerics
from keras_softmax import _temperature
from keras_softmax._backend import AttentionDevice
from keras_softmax._blockwise_attention import BlockSizes
from keras_softmax.softmax import stable_softmax


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    scale: float | None = None,
    is_causal: bool = False,
    flash_attention: bool | None = None,
    attn_logits_soft_cap: float | None = None,
    temperature=1.0,
    *,
    block_sizes: BlockSizes | None = None,
):
    """Scaled dot-product attention in which a fully masked query gives 0.

    Computes `softmax((query . key) * scale + bias) . value` with the
    arguments, layout and meaning of `keras.ops.dot_product_attention`, and
    the same results wherever every query keeps at least one key. A query
    with no key kept (its mask row all `False`, or every key padding) gets
    an output row of exactly 0, with a gradient of 0, on every backend.
    Gradients stay finite for any finite scores.

    On a GPU, every call whose result the device's fused attention gives
    takes it, at any length and with any mask (no soft cap, a temperature
    of at least 1, no returned weights or dropout, a dtype and head sizes
    it takes, and a bias in the inputs' dtype for half-precision inputs):
    on JAX cuDNN's (float16 and bfloat16), on PyTorch the flash and
    memory-efficient kernels of `scaled_dot_product_attention` (eager
    calls; float32 too). Its derivative is reverse mode.

    Elsewhere, long sequences are computed a block of keys at a time
    (FlashAttention's algorithm), with a derivative that recomputes the
    blocks: memory grows linearly in the sequence instead of holding the
    `(B, N, T, S)` scores, and a causal mask skips the blocks above the
    diagonal. The result differs from the full path's by float32 rounding
    only. Its derivative is reverse mode (and `vmap`); on PyTorch, eager
    calls on a CPU go to `scaled_dot_product_attention` where it gives our
    result.

    Args:
        query: Queries of shape `(B, T, N, H)`: batch, query length, heads,
            head size.
        key: Keys of shape `(B, S, K, H)`. `N` must be a multiple of `K`
            (grouped-query attention when `K < N`).
        value: Values of the same shape as `key`, bar the last axis.
        bias: Optional finite bias added to the scores, broadcastable to
            `(B, N, T, S)`.
        mask: Optional bool tensor broadcastable to `(B, N, T, S)`, `True`
            where a query attends to a key. A numeric mask keeps the
            positions where it is `> 0.5`.
        scale: Positive number that multiplies the scores. Defaults to
            `1 / sqrt(H)`.
        is_causal: If `True`, query `t` attends to keys `s <= t` only.
        flash_attention: As in Keras: `None` lets the function choose (a
            GPU's fused kernel where it gives our result, else the blocks
            where the scores would pass 2**24 numbers; see above); `True`
            takes the device's fused flash-attention kernel (its own, else
            Keras') where there is one for the call, else the blocks, and
            raises a `ValueError` where neither can run (a length unknown
            when traced); `False` takes neither.
        attn_logits_soft_cap: Optional positive number `c`: the scaled and
            biased scores `s` become `c * tanh(s / c)` before the temperature
            and the masks (Gemma 2's soft cap).
        temperature: Positive finite number, or scalar tensor, that divides
            the scaled and biased (and capped) scores before the softmax.
        block_sizes: Optional `BlockSizes(query, key)`, or a pair of
            positive integers: the queries and the keys in one block of
            the blocks (taken where no fused kernel serves the call: with
            `flash_attention=True`, and for long sequences). The other
            paths ignore it, and it never changes which path is taken. A
            block longer than its sequence is cut to its length. `None`
            chooses square blocks of about 2**21 scores over the batch
            and the heads.

    Returns:
        The attention output, of shape `(B, T, N, value.shape[-1])`, in the
        dtype the inputs promote to (`keras.backend.result_type`).

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import keras_softmax
    >>> q = np.ones((1, 2, 1, 4), "float32")
    >>> v = np.arange(8, dtype="float32").reshape(1, 2, 1, 4)
    >>> mask = np.array([[[[True, False], [False, False]]]])
    >>> out = keras_softmax.dot_product_attention(q, q, v, mask=mask)
    >>> keras.ops.convert_to_numpy(out)[0, :, 0].tolist()
    [[0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0]]
    """
    query, key, value = _promoted(_tensor(t) for t in (query, key, value))
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if len(tensor.shape) != 4:
            raise ValueError(
                f"`{name}` must have rank 4, (batch, length, heads, size). "
                f"Received: {name}.shape={tuple(tensor.shape)}"
            )
    mask, bias = (None if t is None else _tensor(t) for t in (mask, bias))
    scores = _scores_shape(query, key)
    if bias is not None and not _arguments.broadcasts(bias.shape, scores):
        raise ValueError(
            f"`bias` must be broadcastable to {_SCORES} = {scores}. "
            f"Received: bias.shape={tuple(bias.shape)}"
        )
    tensors = (query, key, value, bias, mask)
    symbolic = any(isinstance(t, keras.KerasTensor) for t in tensors)
    options = dict(
        scale=scale,
        is_causal=is_causal,
        flash_attention=flash_attention,
        attn_logits_soft_cap=attn_logits_soft_cap,
        temperature=temperature,
        block_sizes=block_sizes,
    )
    if symbolic:
        # In a functional model: shapes may be unknown until called.
        return DotProductAttentionOperation(**options)(*tensors)
    return _attend_checked(*tensors, _options(query, **options))


# What a mask or bias must broadcast to, in errors.
_SCORES = "the scores' shape (batch, heads, queries, keys)"


class _Options(NamedTuple):
    """The checked arguments of `dot_product_attention` other than tensors."""

    scale: float | None  # None: 1 / sqrt(head size), known at run time only
    is_causal: bool
    temperature: _temperature.Temperature
    flash_attention: bool | None
    soft_cap: float | None
    block_sizes: BlockSizes | None


def _options(
    query,
    scale,
    is_causal,
    flash_attention,
    attn_logits_soft_cap,
    temperature,
    block_sizes=None,
) -> _Options:
    """The arguments checked, each error naming its argument."""
    size = query.shape[-1]
    if scale is None and size is not None:
        # Any scale gives scores of 0 over heads of size 0.
        scale = 1.0 / math.sqrt(size) if size else 1.0
    return _Options(
        scale=None if scale is None else _arguments.check_positive("scale", scale),
        is_causal=_arguments.check_flag("is_causal", is_causal),
        temperature=_temperature.normalize_temperature(
            temperature, _dtypes.compute_dtype(query.dtype)
        ),
        flash_attention=_arguments.check_flag(
            "flash_attention", flash_attention, allow_none=True
        ),
        soft_cap=_arguments.check_real(
            "attn_logits_soft_cap",
            attn_logits_soft_cap,
            minimum=0,
            open_minimum=True,
            allow_none=True,
        ),
        block_sizes=_blockwise_attention.check_block_sizes(block_sizes),
    )


def _attend_checked(query, key, value, bias, mask, options: _Options):
    """`dot_product_attention` after its checks: the mask, then `attend`."""
    keep = _masks.to_keep_mask(mask, _scores_shape(query, key), target=_SCORES)
    keep, bias = (None if t is None else _rank4(t) for t in (keep, bias))
    scale = options.scale
    if scale is None:
        # A head size unknown while tracing: the query takes the default
        # scale at run time, the scores none.
        size = ops.cast(ops.shape(query)[-1], query.dtype)
        query, scale = query * ops.rsqrt(size), 1.0
    outputs, _ = attend(
        query,
        key,
        value,
        bias,
        keep,
        scale,
        options.temperature,
        flash_attention=options.flash_attention,
        soft_cap=options.soft_cap,
        is_causal=options.is_causal,
        block_sizes=options.block_sizes,
    )
    return outputs


@keras.saving.register_keras_serializable(package="keras_softmax")
class DotProductAttentionOperation(keras.Operation):
    """`dot_product_attention` as a node of a functional model.

    Args:
        scale, is_causal, flash_attention, attn_logits_soft_cap,
        temperature, block_sizes: As for `dot_product_attention`; the
            temperature a Python number, so that the model saves.
    """

    def __init__(
        self,
        scale=None,
        is_causal=False,
        flash_attention=None,
        attn_logits_soft_cap=None,
        temperature=1.0,
        *,
        block_sizes=None,
        name=None,
    ):
        super().__init__(name=name)
        if not _arguments.is_number(temperature):
            raise ValueError(
                "In a functional model, `temperature` must be a positive finite "
                f"number. Received: temperature={temperature!r}"
            )
        self.config = dict(
            scale=None if scale is None else _arguments.check_positive("scale", scale),
            is_causal=_arguments.check_flag("is_causal", is_causal),
            flash_attention=_arguments.check_flag(
                "flash_attention", flash_attention, allow_none=True
            ),
            attn_logits_soft_cap=attn_logits_soft_cap,
            temperature=_temperature.check_temperature_value(temperature),
            block_sizes=_blockwise_attention.check_block_sizes(block_sizes),
        )

    def call(self, query, key, value, bias=None, mask=None):
        options = _options(query, **self.config)
        return _attend_checked(query, key, value, bias, mask, options)

    def compute_output_spec(self, query, key, value, bias=None, mask=None):
        if mask is not None:
            _masks.check_mask_shape(mask.shape, _scores_shape(query, key), _SCORES)
        shape = tuple(query.shape[:-1]) + (value.shape[-1],)
        return keras.KerasTensor(shape, dtype=query.dtype)

    def get_config(self):
        config = {**self.config, "name": self.name}
        if config["block_sizes"] is not None:
            # A list in the saved JSON; `__init__` makes it `BlockSizes` again.
            config["block_sizes"] = list(config["block_sizes"])
        return config


def attend(
    query,
    key,
    value,
    bias,
    keep,
    scale,
    temperature: _temperature.Temperature,
    return_weights=False,
    dropout=None,
    flash_attention=None,
    soft_cap=None,
    is_causal=False,
    block_sizes=None,
):
    """Attention of checked, rank-4 inputs: `(outputs, weights)`.

    The one body that `dot_product_attention` and `StableMultiHeadAttention`
    share; `weights` is None where a fused or blockwise kernel computed the
    outputs.

    Args:
        keep: Bool mask broadcastable to `(B, N, T, S)`, or None.
        scale: A Python float.
        temperature: A normalised `Temperature`.
        return_weights: Whether the weights are needed (the explicit path).
        dropout: Optional function applied to the weights before they
            combine the values.
        flash_attention: `None` chooses, `True` asks for a fused or
            blockwise kernel, `False` takes neither (see `choose_path`).
        soft_cap: Optional positive float `c`: scores `s` become
            `c * tanh(s / c)`, before the temperature and the masks.
        is_causal: Whether query `t` attends to keys `s <= t` only.
        block_sizes: A checked `BlockSizes` for the blocks, or None (their
            default for the shape).
    """
    # Keras' TensorFlow backend repeats grouped heads only when there are
    # several (as of Keras 3.15), so a single key head is repeated here.
    key, value = _repeat_heads(key, query), _repeat_heads(value, query)
    batch, queries, heads, _ = _backend.static_shape(query)
    if 0 in (batch, queries, heads, key.shape[1]):
        # Nothing to attend to (or no query): zeros, as every path gives.
        shape = ops.shape(query)[:-1] + (value.shape[-1],)
        return ops.zeros(shape, value.dtype), None
    # A soft cap comes before the temperature, so that it cannot be folded.
    foldable = soft_cap is None and temperature.foldable
    if foldable and not temperature.is_one:
        # Dividing by a temperature of at least 1 cannot overflow, and
        # folding it into the scale rounds the scores once, as Keras does.
        scale = scale / temperature.value
        bias = None if bias is None else bias / temperature.value
        temperature = _temperature.Temperature(1.0)
    weightless = not return_weights and dropout is None
    choice = _Choice(foldable, weightless, flash_attention)
    tensors = tuple(t for t in (query, key, value, bias, keep) if t is not None)
    device = _backend.attention_device(tensors)
    refused = ()
    while True:
        path = choose_path(query, key, value, bias, keep, choice, device, refused)
        if path == "blocks":
            # The causal flag as it is: the blocks skip those above the diagonal.
            outputs = _blocks(
                query,
                key,
                value,
                bias,
                keep,
                scale,
                temperature,
                is_causal,
                soft_cap,
                block_sizes,
            )
            return outputs, None
        path_keep, causal = _fold_causal(path, query, key, bias, keep, is_causal)
        if path == "explicit":
            return _explicit_attention(
                query,
                key,
                value,
                bias,
                path_keep,
                scale,
                temperature,
                soft_cap,
                dropout,
                foldable,
            )
        if path == "sdpa":
            outputs = _sdpa_attention(query, key, value, path_keep, scale, causal)
        elif path == "keras_fused":
            outputs = _keras_fused_attention(query, key, value, bias, path_keep, scale)
        else:  # a fused kernel, which may refuse the call (None)
            fused = _FUSED_KERNELS[path]
            outputs = fused(query, key, value, bias, path_keep, scale, causal)
        if outputs is not None:
            return outputs, None
        refused += (path,)


class _Choice(NamedTuple):
    """What the choice of path asks of the call, beside its tensors."""

    foldable: bool  # no soft cap, and a temperature folded into the scale
    weightless: bool  # no weights returned, no dropout
    flash_attention: bool | None


def choose_path(
    query,
    key,
    value,
    bias,
    keep,
    choice: _Choice,
    device: AttentionDevice,
    refused: tuple[str, ...] = (),
) -> str:
    """The one decision of how attention is computed; each name a function.

    - `"cudnn"`: cuDNN's fused attention on a JAX GPU (`_cudnn_attention`).
    - `"sdpa_gpu"`: PyTorch's `scaled_dot_product_attention` on its fused
      kernels, on a GPU (`_sdpa_gpu_attention`).
    - `"keras_flash"`: Keras' fused flash kernel, asked for with
      `flash_attention=True` where the device has none of the above.
    - `"sdpa"`: PyTorch's `scaled_dot_product_attention` on a CPU, eager
      calls without bias: it gives a query with no key kept 0.
    - `"blocks"`: `_blockwise_attention`, for long sequences (the full
      scores would pass `LARGE_SCORES`) or `flash_attention=True`.
    - `"keras_fused"`: `keras.ops.dot_product_attention`, with our fill and
      dead queries zeroed, where it gives our result.
    - `"explicit"`: the scores, `stable_softmax`, the weighted sum: for
      returned weights, dropout, a soft cap or a temperature below 1.

    The device's fused kernel (the first two) serves every call whose
    result it gives, whatever its mask and length, unless
    `flash_attention=False`: no soft cap, a temperature of at least 1 (in
    the scale), no weights or dropout, a dtype and head sizes it takes.

    Half-precision inputs are computed in float32 (the scores, the softmax,
    the weighted sum) and a bias in its own precision: the blocks, the
    explicit path and SDPA on a CPU compute on float32 copies. The fused
    kernels take the inputs as they are, so they are chosen for half
    precision only where they are a GPU's, with a bias in the inputs'
    dtype. They accumulate in float32, but round the softmax's weights to
    the inputs' dtype before the weighted sum (FlashAttention, cuDNN and
    SDPA's memory-efficient kernel all do): up to `u * sum_s p_s |v_s|`
    more, with `u` the half type's unit roundoff. A float16 call with a
    mask or a bias takes none of them: its fill, -65504, would let a masked
    key whose score is 65504 above the kept ones win.

    Args:
        query, key, value, bias, keep: The call's tensors, as `attend` has
            them: their dtypes and static shapes decide.
        choice: What the call asks for (`_Choice`).
        device: The `AttentionDevice` it runs on (`_backend.attention_device`;
            a test may describe a GPU).
        refused: The paths whose kernel refused this call: not chosen again.

    Returns:
        The path's name.

    Raises:
        ValueError: naming `flash_attention=True`, where neither a fused
            kernel nor the blocks can run.
    """
    given = keras.backend.standardize_dtype(query.dtype)
    dtype = _dtypes.compute_dtype(given)
    half = dtype != given
    sizes = (key.shape[-1], value.shape[-1])
    # Keras' attention and the fused kernels cast the bias to the inputs'
    # dtype: a wider bias with half-precision inputs would be rounded.
    precise = not half or bias is None or _same_dtype(bias, query)
    exact = (
        choice.foldable
        and choice.weightless
        and precise
        and _backend.keras_attention_is_exact(dtype, *sizes)
    )
    flash = choice.flash_attention
    masked = keep is not None or bias is not None
    filled = given == "float16" and masked
    kernel = None if filled else _backend.fused_attention(device, given, *sizes)
    if kernel == "cudnn" and masked and not _even_lengths(query, key):
        # JAX's cuDNN rule refuses a bias of odd lengths ("Unsupported
        # sequence length") when it traces the backward pass, which under
        # `grad(jit(f))` or a checkpoint is outside `_cudnn_attention`'s try.
        kernel = None
    if exact and flash is not False and kernel and kernel not in refused:
        return kernel
    # Keras' fused flash kernel is a GPU's or a TPU's (`keras_flash_kernel`;
    # False on TensorFlow), which rounds the weights as the kernels above.
    # None of Keras' other attention keeps half precision in float32 (Keras
    # 3.15): TensorFlow's computes the scores and the weighted sum in half
    # precision; JAX's (XLA, on a GPU too) and PyTorch's (SDPA) round the
    # weights to half before the weighted sum.
    keras_flash = _backend.keras_flash_kernel(device) and not filled
    keras_exact = exact and not half
    if flash and exact and keras_flash and "keras_flash" not in refused:
        return "keras_flash"
    blocks = choice.weightless and _blockwise_attention.can_run(query, key, bias, keep)
    if flash and not blocks:
        raise ValueError(
            "`flash_attention=True` asks for a fused or blockwise kernel, "
            "and neither can run here: the backend has no fused flash "
            "kernel for this call, and the blocks need no dropout, no "
            "returned weights and lengths known when traced. "
            "Received: flash_attention=True"
        )
    if (
        choice.foldable
        and choice.weightless
        and bias is None
        and flash is not False
        and _backend.cpu_sdpa_serves(device, given)
    ):
        return "sdpa"
    large = _blockwise_attention.scores_are_large(query, key)
    if blocks and (flash or (flash is None and large)):
        return "blocks"
    return "keras_fused" if keras_exact else "explicit"


def _even_lengths(query, key) -> bool:
    """Whether the numbers of queries and keys are known and even."""
    lengths = (_backend.static_shape(query)[1], _backend.static_shape(key)[1])
    return all(n is not None and n % 2 == 0 for n in lengths)


# The paths whose kernel takes the causal mask as a flag, `is_causal`.
_NATIVE_CAUSAL = ("cudnn", "sdpa_gpu", "keras_flash", "sdpa")


def _fold_causal(path, query, key, bias, keep, is_causal):
    """`(keep, is_causal)` as `path`'s kernel takes them: the causal mask
    folded into `keep`, once, but where the kernel takes it as its flag.

    A flag only without another mask or a bias: PyTorch's SDPA refuses a
    mask beside `is_causal=True` on a GPU ("Explicit attn_mask should not be
    set when is_causal=True"), and Keras' PyTorch backend hands it the bias
    as that mask. And only with as many queries as keys, where the kernels'
    conventions for the diagonal (top left, as ours, or bottom right) agree.
    """
    if not is_causal:
        return keep, False
    queries, keys = _backend.static_shape(query)[1], _backend.static_shape(key)[1]
    flag = keep is None and bias is None and queries is not None and queries == keys
    if path in _NATIVE_CAUSAL and flag:
        return None, True
    return _masks.with_causal(keep, ops.shape(query)[1], ops.shape(key)[1]), False


def _cudnn_attention(
    query, key, value, bias, keep, scale, is_causal, implementation="cudnn"
):
    """`jax.nn.dot_product_attention` on cuDNN's fused kernel, or None where
    cuDNN refuses the call (it raises when traced).

    The inputs as they are: cuDNN takes half precision only, and accumulates
    in float32. It takes a bias only of the scores' last two sizes, so our
    additive mask is broadcast to them. `implementation="xla"` runs the same
    call on a CPU, for tests.
    """
    import jax

    additive, live = _additive_mask(keep, bias, query.dtype)
    if additive is not None:
        batch, heads = _backend.static_shape(additive)[:2]
        queries, keys = ops.shape(query)[1], ops.shape(key)[1]
        additive = ops.broadcast_to(additive, (batch, heads, queries, keys))
    try:
        outputs = jax.nn.dot_product_attention(
            query,
            key,
            value,
            bias=additive,
            scale=scale,
            is_causal=is_causal,
            implementation=implementation,
        )
    except (RuntimeError, ValueError, TypeError):  # NotImplementedError too
        # (TypeError: JAX's batching rule for a mask under `vmap`.)
        return None
    return _zero_dead_queries(outputs, live)


def _sdpa_gpu_attention(query, key, value, bias, keep, scale, is_causal):
    """PyTorch's `scaled_dot_product_attention` on its fused kernels, or
    None where none of them takes the call.

    Its flash, memory-efficient and (without a mask) cuDNN kernels, never
    the math one: they accumulate in float32, so the inputs go as they
    are, and their memory grows linearly in the sequence. A mask goes in
    as our additive mask, as everywhere: SDPA on a GPU gave a query with
    no key kept 0.166 from a bool mask.
    """
    import torch
    from torch.nn.attention import SDPBackend
    from torch.nn.attention import sdpa_kernel

    additive, live = _additive_mask(keep, bias, query.dtype)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if additive is None:
        # Not with a mask: cuDNN's backward gives NaN query gradients with
        # one where S % 128 == 64 (pytorch/pytorch#196678, since 2.11).
        fused.append(SDPBackend.CUDNN_ATTENTION)
    try:
        with sdpa_kernel(fused):
            outputs = torch.nn.functional.scaled_dot_product_attention(
                *(t.transpose(1, 2) for t in (query, key, value)),
                attn_mask=additive,
                is_causal=is_causal,
                scale=scale,
            )
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:  # "No available kernel" for this dtype, size or mask
        return None
    return _zero_dead_queries(outputs.transpose(1, 2), live)


def _keras_flash_attention(query, key, value, bias, keep, scale, is_causal):
    """Keras' fused flash kernel, or None where the backend has none here."""
    additive, live = _additive_mask(keep, bias, query.dtype)
    try:
        outputs = ops.dot_product_attention(
            query,
            key,
            value,
            bias=additive,
            scale=scale,
            is_causal=is_causal,
            flash_attention=True,
        )
    except (RuntimeError, ValueError):  # none on a CPU, for one
        return None
    return _zero_dead_queries(outputs, live)


# The paths whose kernel may refuse a call, by name.
_FUSED_KERNELS = {
    "cudnn": _cudnn_attention,
    "sdpa_gpu": _sdpa_gpu_attention,
    "keras_flash": _keras_flash_attention,
}


def _sdpa_attention(query, key, value, keep, scale, is_causal):
    """PyTorch's `scaled_dot_product_attention` with a bool mask, in the
    compute dtype, returned in the values' dtype.

    On a CPU (PyTorch 2.13) it gives a query with no key kept 0, and its
    flash kernel's memory grows linearly in the sequence. The edge says
    where it may run (`cpu_sdpa_serves`). That kernel rounds half-precision
    weights to half before the weighted sum: it runs on float32 copies.
    """
    import torch

    dtype = _dtypes.compute_dtype(query.dtype)
    outputs = torch.nn.functional.scaled_dot_product_attention(
        *(_cast(t, dtype).transpose(1, 2) for t in (query, key, value)),
        attn_mask=keep,
        is_causal=is_causal,
        scale=scale,
    )
    return _cast(outputs.transpose(1, 2), value.dtype)


def _blocks(
    query, key, value, bias, keep, scale, temperature, is_causal, soft_cap, block_sizes
):
    """The blocks, in the compute dtype, returned in the values' dtype."""
    dtype = _dtypes.compute_dtype(query.dtype)
    outputs = _blockwise_attention.blockwise_attention(
        *(_cast(t, dtype) for t in (query, key, value)),
        bias,
        keep,
        scale,
        temperature.tensor(dtype),
        is_causal,
        soft_cap,
        block_sizes,
    )
    return _cast(outputs, value.dtype)


def _keras_fused_attention(query, key, value, bias, keep, scale):
    """`keras.ops.dot_product_attention`, with our fill and dead queries at 0."""
    additive, live = _additive_mask(keep, bias, query.dtype)
    outputs = ops.dot_product_attention(
        query, key, value, bias=additive, scale=scale, flash_attention=False
    )
    return _zero_dead_queries(outputs, live)


def _explicit_attention(
    query, key, value, bias, keep, scale, temperature, soft_cap, dropout, foldable
):
    """The scores, their softmax, and the weighted sum: `(outputs, weights)`.

    With the temperature folded, Keras' own formula (its additive mask and
    softmax, our fill and dead queries zeroed), so that returning the
    weights never changes the outputs; else `stable_softmax`, which shifts
    before it divides. All in the compute dtype (float32 for half-precision
    inputs), the outputs and weights returned in the values' dtype.
    """
    dtype = _dtypes.compute_dtype(query.dtype)
    returned = value.dtype
    query, key, value = (_cast(t, dtype) for t in (query, key, value))
    if foldable:
        additive, live = _additive_mask(keep, bias, dtype)
        weights = ops.softmax(_scores(query, key, scale, additive, dtype), axis=-1)
        if live is not None:
            weights = weights * ops.cast(live, dtype)
    else:
        logits = _numerics.soft_cap(_scores(query, key, scale, bias, dtype), soft_cap)
        weights = stable_softmax(
            logits, axis=-1, mask=keep, temperature=temperature.value
        )
    # A dropout layer may return its own dtype (a mixed precision policy's).
    combined = weights if dropout is None else _cast(dropout(weights), dtype)
    outputs = ops.einsum("BNTS,BSNH->BTNH", combined, value)
    return _cast(outputs, returned), _cast(weights, returned)


def _additive_mask(keep, bias, dtype):
    """`(additive, live)`: the bias in `dtype` (None: none) with the lowest
    finite number where `keep` masks a key, and whether each query keeps a
    key, `(B, N, T, 1)` (None without a mask).

    A query that keeps no key is unmasked whole, so that every kernel sees
    finite scores there, and finite gradients (a row of fills is 0 / 0 to
    some kernels, and gave 0.166 in SDPA on a GPU); `_zero_dead_queries`
    then multiplies its output by 0. The fill is in the kernel's dtype (the
    inputs'): a half-precision fill must be finite there too.
    """
    dtype = keras.backend.standardize_dtype(dtype)
    kept = None if bias is None else _cast(bias, dtype)
    if keep is None:
        return kept, None
    live = ops.any(keep, axis=-1, keepdims=True)
    opened = ops.logical_or(keep, ops.logical_not(live))
    kept = ops.zeros((), dtype) if kept is None else kept
    return ops.where(opened, kept, _dtypes.lowest(dtype)), live


def _zero_dead_queries(outputs, live):
    """`outputs` (`(B, T, N, H)`) with 0 for each query that keeps no key.

    A multiplication rather than a `where`: the kernel's output there is
    finite (`_additive_mask` unmasked the query), so 0 times it is exactly 0,
    with a gradient of 0, and exported graphs keep it (see the module's
    docstring).
    """
    if live is None:
        return outputs
    return outputs * _per_query(live, outputs.dtype)


def _promoted(tensors):
    """The tensors in the one dtype they promote to, as Keras' attention does."""
    tensors = tuple(tensors)
    dtypes = [keras.backend.standardize_dtype(t.dtype) for t in tensors]
    if len(set(dtypes)) == 1:
        # Keras' result_type on JAX (3.15) makes even float64 alone float32.
        return tensors
    dtype = keras.backend.result_type(*dtypes)
    return tuple(
        t if keras.backend.standardize_dtype(t.dtype) == dtype else ops.cast(t, dtype)
        for t in tensors
    )


def _cast(x, dtype):
    """`x` in `dtype`: as it is where it has it already (no op added)."""
    standard = keras.backend.standardize_dtype
    return x if standard(x.dtype) == standard(dtype) else ops.cast(x, dtype)


def _same_dtype(a, b) -> bool:
    standard = keras.backend.standardize_dtype
    return standard(a.dtype) == standard(b.dtype)


def _tensor(x):
    return x if isinstance(x, keras.KerasTensor) else ops.convert_to_tensor(x)


def _rank4(x):
    """Gives a mask or bias the leading axes it broadcasts over."""
    return ops.reshape(x, (1,) * (4 - len(x.shape)) + tuple(ops.shape(x)))


def _scores_shape(query, key):
    """The static shape of the scores, `(B, N, T, S)`; unknown sizes None."""
    (batch, queries, heads, _), keys = _backend.static_shape(query), key.shape[1]
    return (batch, heads, queries, keys)


def _scores(query, key, scale, bias, dtype):
    """`(query . key) * scale + bias` as `(B, N, T, S)`, in Keras' order."""
    logits = ops.einsum("BTNH,BSNH->BNTS", query, key)
    logits = ops.cast(logits, dtype) * ops.cast(scale, dtype)
    return logits if bias is None else logits + ops.cast(bias, dtype)


def _repeat_heads(tensor, query):
    """Repeats grouped key or value heads to the query's number of heads."""
    heads, groups = query.shape[2], tensor.shape[2]
    if heads is None or groups is None or heads == groups:
        return tensor
    if heads % groups:
        raise ValueError(
            "The query's number of heads must be a multiple of the key's. "
            f"Received: query.shape={tuple(query.shape)}, "
            f"key.shape={tuple(tensor.shape)}"
        )
    return ops.repeat(tensor, heads // groups, axis=2)


def _per_query(live, dtype):
    """`(B, N, T, 1)` bools as a `(B, T, N, 1)` factor of 0s and 1s."""
    return ops.transpose(ops.cast(live, dtype), (0, 2, 1, 3))
