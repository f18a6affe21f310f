"""One training step's forward-gradient estimate.

`estimate(model, x, y, sample_weight)` draws the step's K directions, runs
the forward-mode passes (through `keras_fwdgrad.layer_rules`, or
`tf.autodiff.ForwardAccumulator` over the whole model), restores the
non-trainable state between passes, all-reduces the directional
derivatives under a strategy, clips them and forms the forward gradient.
`model` is a `ForwardGradientModel`; this module reads its configuration
and never changes its weights.
"""

import tensorflow as tf

from keras_fwdgrad import _compat
from keras_fwdgrad.backend.tensorflow import activity
from keras_fwdgrad.activity import estimates as activity_estimates
from keras_fwdgrad import connectivity
from keras_fwdgrad.backend.tensorflow import distribute
from keras_fwdgrad import layer_rules
from keras_fwdgrad import stream
from keras_fwdgrad import tangents
from keras_fwdgrad import trainer
from keras_fwdgrad.backend.tensorflow import forward_mode_fixes
from keras_fwdgrad.ops import clip_directional_derivative
from keras_fwdgrad.ops import forward_gradient
from keras_fwdgrad.ops import jvp


def sample_directions(model, k=0, structured=False):
    """Direction `k` of `model`'s current step, one component per trainable
    variable (compact `tangents` types where the family has them, if
    `structured`)."""
    return stream.sample(model, model.direction_step, k, structured)


def uses_layer_rules(model):
    return model.layer_rules and layer_rules.supports(model.model)


def _rules_pass(model, x, y, sample_weight, vs):
    """One pass through `keras_fwdgrad.layer_rules` carrying the K
    directions `vs` at once.

    Returns:
        `(y_pred, losses, ds)`: the predictions, and the loss and its
        directional derivative (before any loss scaling) per direction.

    Raises:
        `layer_rules.NeedsSeparatePasses` if K > 1 and a layer has no rule
        for several tangents.
    """
    variables = model.trainable_variables
    k = len(vs)
    tangent_of = {
        id(var): ts[0] if k == 1 else tangents.several(ts) for var, *ts in zip(variables, *vs)
    }
    compute_dtype = model.model.compute_dtype

    def standardize(t):
        t = tf.convert_to_tensor(t)
        if t.dtype.is_floating and t.dtype != compute_dtype:
            # As `Layer.__call__` casts floating inputs.
            t = tf.cast(t, compute_dtype)
        return t

    x = tf.nest.map_structure(standardize, x)
    # Losses from `add_loss` of the previous call would be stale.
    _compat.clear_losses(model)
    y_pred, y_dot = layer_rules.dual_call(
        model.model,
        x,
        None,
        lambda var: tangent_of.get(id(var)),
        training=True,
        num_tangents=k,
    )
    if y_dot is None:
        y_dot = tf.zeros(
            tf.concat([[k * tf.shape(y_pred)[0]], tf.shape(y_pred)[1:]], 0), y_pred.dtype
        )
    batch = tf.shape(y_pred)[0]
    # A softmax or sigmoid output whose logits Keras' cross-entropy reads.
    logits = layer_rules.logits_tangent(y_pred)
    losses, ds = [], []
    for i, v in enumerate(vs):
        block = slice(i * batch, (i + 1) * batch)
        primals, duals = [y_pred], [y_dot[block]]
        if logits is not None and logits[1] is not None:
            primals.append(logits[0])
            duals.append(logits[1][block])
        for var, t in zip(variables, v):
            # Weight regularizers read the variables in `compute_loss`.
            if getattr(var, "regularizer", None) is not None:
                primals.append(var.value)
                duals.append(tangents.to_dense(t))
        with tf.autodiff.ForwardAccumulator(primals, duals) as acc:
            loss = model.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
        losses.append(loss)
        ds.append(acc.jvp(loss, unconnected_gradients=tf.UnconnectedGradients.ZERO))
    return y_pred, losses, ds


def _accumulator_pass(model, x, y, sample_weight, v):
    """One pass of `tf.autodiff.ForwardAccumulator` over the whole model."""
    out = {}

    def loss_fn():
        out["y_pred"] = model(x, training=True)
        out["loss"] = model.compute_loss(
            x=x, y=y, y_pred=out["y_pred"], sample_weight=sample_weight, training=True
        )
        return out["loss"]

    _, d = jvp(loss_fn, model.trainable_variables, [tangents.to_dense(t) for t in v])
    return out["y_pred"], out["loss"], d


def _disconnected_variables(model, x, y, sample_weight):
    """Once per model: raises if an op without a derivative cuts a trainable
    variable from the loss (`keras_fwdgrad.connectivity`); returns the ids
    of the variables the loss does not use. Skipped under a strategy with
    several replicas."""
    if model._connectivity_checked or distribute.num_replicas() > 1:
        return model._disconnected

    def loss_fn(x, y, sample_weight):
        y_pred = model.model(x, training=True)
        return model.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )

    cut = connectivity.check_connected(
        loss_fn,
        model.trainable_variables,
        (x, y, sample_weight),
        layer_names=[layer.name for layer in _compat.all_layers(model.model)],
    )
    model._disconnected = tuple(id(v) for v, c in zip(model.trainable_variables, cut) if c)
    model._connectivity_checked = True
    return model._disconnected


def estimate(model, x, y, sample_weight, xla=False):
    """Runs the K forward-mode passes of one step.

    Args:
        model: A built `ForwardGradientModel`.
        x, y, sample_weight: One batch.
        xla: Whether the step is XLA-compiled. Packed sign directions are
            kept packed only then: XLA fuses each unpacking into its
            consumer, elsewhere every unpacking is a full-size op, so they
            are unpacked once.

    Returns:
        A `keras_fwdgrad.trainer.Estimate`.
    """
    if model.perturbation == "activations":
        return _activity_passes(model, x, y, sample_weight)
    disconnected = _disconnected_variables(model, x, y, sample_weight)
    with (
        forward_mode_fixes.recurrences_unrolled(model.model),
        forward_mode_fixes.exact_keras_ops(),
    ):
        try:
            loss, y_pred, ds, vs = _passes(model, x, y, sample_weight, xla)
        except ValueError as e:
            if "Cannot unroll a RNN" not in str(e):
                raise
            raise ValueError(
                "In a `tf.function` (graph or XLA), `ForwardGradientModel` "
                "unrolls recurrent layers, since TensorFlow cannot "
                "differentiate their loop in forward mode; that needs a "
                "static sequence length. Give the model's `keras.Input` a "
                "fixed time dimension, or compile with `run_eagerly=True`. "
                f"Original error: {e}"
            ) from e
    forward_mode_fixes.check_traced_ops()
    d = tf.stack(ds)
    if distribute.reduces_directional_derivatives(model):
        d = distribute.all_reduce_directional_derivatives(d, loss)
    d = clip_directional_derivative(d, model.jvp_clip)
    grads = forward_gradient(tf.unstack(d), vs)
    grads = [
        tf.zeros_like(g) if id(var) in disconnected else g
        for g, var in zip(grads, model.trainable_variables)
    ]
    return trainer.Estimate(loss, y_pred, d, grads)


def _activity_passes(model, x, y, sample_weight):
    """The K passes of `keras_fwdgrad.activity`, averaged."""
    restore = _state_restorer(model)
    results = []
    bases = {}
    with (
        forward_mode_fixes.recurrences_unrolled(model.model),
        forward_mode_fixes.exact_keras_ops(),
    ):
        for k in range(model.num_directions):
            restore(k)
            results.append(activity.estimate(model, x, y, sample_weight, k, bases))
    forward_mode_fixes.check_traced_ops()
    losses, y_preds, ds, grads, local, bounded = zip(*results)
    grads = [_mean(gs) for gs in zip(*grads)]
    local = [_mean(ls) for ls in zip(*local)]
    return trainer.Estimate(
        _mean(losses),
        y_preds[0],
        tf.stack(ds),
        grads,
        tuple(local),
        activity_estimates.combined(bounded),
    )


def _mean(values):
    values = list(values)
    return values[0] if len(values) == 1 else tf.add_n(values) / len(values)


def _state_restorer(model):
    """`restore(k)`: before every pass but the first, puts back the
    non-trainable state (BatchNormalization statistics, dropout seed
    state) as it was before the first, so that every direction
    differentiates the same function."""
    state = model.model.non_trainable_variables
    saved = [tf.identity(v.value) for v in state] if model.num_directions > 1 else []

    def restore(k):
        if k > 0:
            for var, value in zip(state, saved):
                var.assign(value)

    return restore


def _passes(model, x, y, sample_weight, xla):
    restore = _state_restorer(model)

    def draw(k):
        v = sample_directions(model, k, structured=True)
        return v if xla else [tangents.unpack_signs(t) for t in v]

    losses, ds, vs = [], [], []
    rules = uses_layer_rules(model)
    if rules and model.num_directions > 1 and layer_rules.supports_batched_tangents(model.model):
        # All K directions in one pass: the primal runs once.
        vs = [draw(k) for k in range(model.num_directions)]
        try:
            y_pred, losses, ds = _rules_pass(model, x, y, sample_weight, vs)
        except layer_rules.NeedsSeparatePasses:
            vs = []
    for k in range(0 if ds else model.num_directions):
        restore(k)
        v = draw(k)
        if rules:
            y_pred, (loss,), (d,) = _rules_pass(model, x, y, sample_weight, [v])
        else:
            y_pred, loss, d = _accumulator_pass(model, x, y, sample_weight, v)
        losses.append(loss)
        ds.append(d)
        vs.append(v)
    return _mean(losses), y_pred, ds, vs
