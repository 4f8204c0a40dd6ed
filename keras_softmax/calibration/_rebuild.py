"""Reading the logits off a trained classifier, for `calibrate` to rebuild it.

`calibrate` needs the symbolic tensor that the model's softmax normalises:
`logits_of` finds it for the heads it supports, and says which those are
when it meets another.
"""

import keras

from keras_softmax.layer import StableSoftmax
from keras_softmax.softmax import stable_softmax


def logits_of(model):
    """`(inputs, logits)`: the symbolic inputs and logits of `model`."""
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
    return inputs, _head_logits(model, outputs[0])


def _head_logits(model, output):
    """The logits that the last layer of `model` turns into `output`."""
    head = output._keras_history.operation
    activation = getattr(head, "activation", None)
    rank = len(output.shape)

    if isinstance(head, (StableSoftmax, keras.layers.Softmax)):
        _check_last_axis(head.axis, rank, head)
        return _input_of(head)
    if isinstance(head, keras.layers.Activation) and _is_softmax(activation):
        return _input_of(head)
    if _is_softmax(activation):
        if isinstance(activation, StableSoftmax):
            _check_last_axis(activation.axis, rank, head)
        # The same layer, weights and all, but without its activation.
        config = head.get_config()
        config["activation"] = "linear"
        config["name"] = free_name(model, f"{head.name}_logits")
        copy = type(head).from_config(config)
        logits = copy(_input_of(head))
        # The head's own weights: a StableSoftmax activation brings its
        # temperature variable to the layer's weights too.
        activation_weights = {id(w) for w in getattr(activation, "weights", ())}
        own = [w for w in head.weights if id(w) not in activation_weights]
        copy.set_weights([keras.ops.convert_to_numpy(w) for w in own])
        return logits
    if activation is keras.activations.linear:
        return output
    described = "no activation" if activation is None else f"activation {activation}"
    raise ValueError(
        "`calibrate` supports a model whose last layer has the activation "
        "`stable_softmax` or `softmax` (e.g. Dense(C, activation="
        "'stable_softmax')), is a StableSoftmax, Softmax or softmax Activation "
        "layer, or has a linear activation (its output is then the logits). "
        f"Received: last layer {head.name!r} ({type(head).__name__}) with "
        f"{described}"
    )


def _is_softmax(activation):
    return (
        activation is stable_softmax
        or activation is keras.activations.softmax
        or isinstance(activation, StableSoftmax)
    )


def _check_last_axis(axis, rank, head):
    if axis not in (-1, rank - 1):
        raise ValueError(
            "`calibrate` needs the softmax over the last axis. "
            f"Received: layer {head.name!r} with axis={axis!r}"
        )


def _input_of(layer):
    try:
        return layer.input
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"`calibrate` needs the last layer to be called once, on one "
            f"input. Received: layer {layer.name!r}"
        ) from error


def free_name(model, name):
    # Functional models need unique layer names; Keras picks one otherwise.
    taken = {layer.name for layer in model.layers}
    return None if name in taken else name
