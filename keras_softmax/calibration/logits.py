"""The logits of a trained classifier: the tensor its softmax normalises.

`logits_model` gives a model of them, for `fit_temperature` or any other
use; `calibrate` rebuilds the classifier on them. `logits_of` finds them
for the heads it supports, and says which those are when it meets another.
"""

import keras

from keras_softmax import _keras_internals
from keras_softmax.head import StableSoftmaxHead
from keras_softmax.layer import StableSoftmax
from keras_softmax.softmax import stable_softmax


def logits_model(model: keras.Model) -> keras.Model:
    """A model with the inputs of `model` whose output is its logits.

    The logits are what the last softmax of `model` normalises: what
    `fit_temperature` needs, and what `model.predict` never shows. A
    softmax's own temperature `T` is left out: the logits are those it
    divides by `T`, so the temperature that `fit_temperature` fits to them
    (and `calibrate` applies) replaces `T`, rather than multiplying it.
    The new model shares its layers and weights with `model`, except for a
    last layer it copies, whose weights it copies as they are now.

    The last layer of `model` must be one of:

    - a layer whose activation is `"stable_softmax"`, `"softmax"` or a
      `StableSoftmax`, e.g. `Dense(C, activation="stable_softmax")`: a copy
      of the layer, with its weights and no activation, gives the logits;
    - a `StableSoftmax`, `Softmax` or softmax `Activation` layer over the
      last axis: its input is the logits;
    - a `StableSoftmaxHead`: a `Dense` copy of it, with its kernel and
      bias, gives the logits, `inputs @ kernel + bias` (its activation is
      linear, but it applies the softmax itself);
    - a layer with a linear activation, e.g. `Dense(C)`: its output is the
      logits.

    Args:
        model: A built Sequential or functional `keras.Model` with one
            output.

    Returns:
        A functional `keras.Model` named `f"{model.name}_logits"`.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import keras_softmax
    >>> from keras_softmax.calibration import logits_model
    >>> model = keras.Sequential(
    ...     [keras.Input((2,)), keras.layers.Dense(3, activation="stable_softmax")]
    ... )
    >>> x = np.ones((1, 2), "float32")
    >>> logits = logits_model(model).predict(x, verbose=0)
    >>> probabilities = keras_softmax.stable_softmax(logits)
    >>> bool(np.allclose(probabilities, model.predict(x, verbose=0)))
    True
    """
    inputs, logits = logits_of(model, "logits_model")
    return keras.Model(inputs, logits, name=f"{model.name}_logits")


def logits_of(model, caller: str):
    """`(inputs, logits)`: the symbolic inputs and logits of `model`.

    Errors name `caller`, the public function that was called.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "`model` must be a keras.Model. "
            f"Received: model of type {type(model).__name__}"
        )
    try:
        outputs = model.outputs
    except (AttributeError, ValueError) as error:
        raise ValueError(
            "`model` must be a built Sequential or functional model; call it "
            f"or build it first. Received: model={model.name!r}"
        ) from error
    if not outputs or len(outputs) != 1:
        raise ValueError(
            "`model` must have exactly one output. "
            f"Received: {len(outputs or ())} outputs"
        )
    # A Sequential model has one input, and no `input` until it is called.
    inputs = model.inputs[0] if isinstance(model, keras.Sequential) else model.input
    return inputs, _head_logits(model, outputs[0], caller)


def _head_logits(model, output, caller):
    """The logits that the last layer of `model` turns into `output`."""
    head = _keras_internals.operation_of(output)
    activation = getattr(head, "activation", None)
    rank = len(output.shape)

    if isinstance(head, (StableSoftmax, keras.layers.Softmax)):
        _check_last_axis(head.axis, rank, head, caller)
        return _input_of(head, caller)
    if isinstance(head, keras.layers.Activation) and _is_softmax(activation):
        return _input_of(head, caller)
    if isinstance(head, StableSoftmaxHead):
        # Its activation is linear, yet it applies the softmax itself: its
        # logits are those of a `Dense` with its weights.
        config = head.get_config()
        for argument in ("tied_to", "logit_soft_cap"):
            value = config.pop(argument)
            if value is not None:
                raise ValueError(
                    f"`{caller}` copies a StableSoftmaxHead into a `Dense`, "
                    f"which has no `{argument}`: pass a model whose output is "
                    f"the head's logits. Received: {argument}={value!r}"
                )
        del config["temperature"]
        return _linear_copy(model, head, keras.layers.Dense, config, caller)
    if _is_softmax(activation):
        if isinstance(activation, StableSoftmax):
            _check_last_axis(activation.axis, rank, head, caller)
        return _linear_copy(model, head, type(head), head.get_config(), caller)
    if activation is keras.activations.linear:
        return output
    described = "no activation" if activation is None else f"activation {activation}"
    raise ValueError(
        f"`{caller}` supports a model whose last layer has the activation "
        "`stable_softmax` or `softmax` (e.g. Dense(C, activation="
        "'stable_softmax')), is a StableSoftmax, Softmax or softmax Activation "
        "layer or a StableSoftmaxHead, or has a linear activation (its output "
        "is then the logits). "
        f"Received: last layer {head.name!r} ({type(head).__name__}) with "
        f"{described}"
    )


def _linear_copy(model, head, layer_class, config, caller):
    """The output of a `layer_class(**config)` copy of `head`, unactivated.

    The copy has the head's weights and takes its input.
    """
    config = dict(config, activation="linear")
    config["name"] = free_name(model, f"{head.name}_logits")
    copy = layer_class.from_config(config)
    logits = copy(_input_of(head, caller))
    # The head's own weights: a StableSoftmax activation brings its
    # temperature variable to the layer's weights too.
    activation = getattr(head, "activation", None)
    activation_weights = {id(w) for w in getattr(activation, "weights", ())}
    own = [w for w in head.weights if id(w) not in activation_weights]
    copy.set_weights([keras.ops.convert_to_numpy(w) for w in own])
    return logits


def _is_softmax(activation):
    return (
        activation is stable_softmax
        or activation is keras.activations.softmax
        or isinstance(activation, StableSoftmax)
    )


def _check_last_axis(axis, rank, head, caller):
    if axis not in (-1, rank - 1):
        raise ValueError(
            f"`{caller}` needs the softmax over the last axis. "
            f"Received: layer {head.name!r} with axis={axis!r}"
        )


def _input_of(layer, caller):
    try:
        return layer.input
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"`{caller}` needs the last layer to be called once, on one "
            f"input. Received: layer {layer.name!r}"
        ) from error


def free_name(model, name):
    # Functional models need unique layer names; Keras picks one otherwise.
    taken = {layer.name for layer in model.layers}
    return None if name in taken else name
