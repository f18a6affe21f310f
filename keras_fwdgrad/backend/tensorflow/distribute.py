"""`tf.distribute` specifics of forward-gradient training.

Under `all_reduce="directional_derivatives"` every replica draws the same
directions, so replicas all-reduce only the K directional derivatives and
each applies the identical update without the optimizer's own gradient
all-reduce. This module holds that all-reduce, the guarded (NaN-skipping)
update under strategies that synchronize through `merge_call`, and the
workarounds for Keras 3.15 under `MultiWorkerMirroredStrategy`.
"""

import tensorflow as tf

from keras_fwdgrad import _compat


def num_replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def shares_directions(model):
    """Whether replicas draw the same directions and all-reduce only the
    directional derivatives. Activity perturbation always all-reduces
    gradients: its per-example tangents live on each replica's examples."""
    return model.all_reduce == "directional_derivatives" and model.perturbation == "weights"


def reduces_directional_derivatives(model):
    return (
        shares_directions(model)
        and num_replicas() > 1
        and tf.distribute.get_replica_context() is not None
    )


def all_reduce_directional_derivatives(d, loss):
    """Sums the replicas' directional derivatives.

    Each replica's loss is already divided by the number of replicas, so
    the sum of the local derivatives is the derivative of the mean loss
    over the global batch. A non-finite local loss poisons the sum, so
    every replica skips.
    """
    d = tf.where(tf.reduce_all(tf.math.is_finite(loss)), d, float("nan"))
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, d)


def guarded_apply(model, grads, variables, finite, weights, saved_weights):
    """Applies `grads` if `finite`, else restores `weights` (non-trainable
    state) and changes nothing. Returns 1 for a skipped step, else 0."""
    if shares_directions(model) and num_replicas() > 1:
        # The gradients are identical on every replica already.
        with _compat.gradients_used_as_given(model.optimizer):
            return _guarded_apply(model, grads, variables, finite, weights, saved_weights)
    return _guarded_apply(model, grads, variables, finite, weights, saved_weights)


def _guarded_apply(model, grads, variables, finite, weights, saved_weights):
    optimizer = model.optimizer
    if _compat.strategy_supports_no_merge_call():

        def apply():
            optimizer.apply(grads, variables)
            return tf.constant(0, dtype="int64")

        def skip():
            for w, value in zip(weights, saved_weights):
                w.assign(value)
            return tf.constant(1, dtype="int64")

        return tf.cond(finite, apply, skip)
    return _apply_across_replicas(model, grads, variables, finite)


def _apply_across_replicas(model, grads, variables, finite):
    """The guarded update under a strategy that synchronizes through
    `merge_call` (e.g. `MirroredStrategy` on CPUs): a `cond` whose branch
    synchronizes replicas must run in cross-replica context, as Keras'
    `LossScaleOptimizer` does it."""
    context = tf.distribute.get_replica_context()
    if not shares_directions(model):
        # Replicas must agree on skipping: one flag per replica.
        bad = context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, "float32"))
        finite = tf.equal(bad, 0.0)

    def cross_replica(distribution, grads, finite):
        agreed = distribution.experimental_local_results(finite)[0]

        def apply():
            distribution.extended.call_for_each_replica(
                model.optimizer.apply, args=(grads, variables)
            )

        tf.cond(agreed, apply, lambda: None)

    context.merge_call(cross_replica, args=(grads, finite))
    # Under a strategy, a skipped step leaves weights and optimizer state
    # untouched; BatchNormalization statistics keep that step's update.
    return 1 - tf.cast(finite, "int64")


def unscale_loss(loss):
    """Undoes Keras' division of the loss by the number of replicas."""
    replicas = num_replicas()
    if replicas > 1:
        loss = loss * tf.cast(replicas, loss.dtype)
    return loss


def multi_worker_logs(strategy, logs):
    """Keras (3.15) averages the logs of a `MultiWorkerMirroredStrategy`
    step with `strategy.reduce("MEAN", value, axis=0)`, which fails on
    scalars; as `[1]` tensors they reduce to the same scalar mean."""
    if not _compat.is_multi_worker(strategy):
        return logs
    return {k: tf.reshape(v, [1]) for k, v in logs.items()}


def all_reduce_bytes(model, num_replicas):
    """See `ForwardGradientModel.all_reduce_bytes_per_step`."""
    if num_replicas <= 1:
        return 0
    itemsize = tf.as_dtype(model.trainable_variables[0].dtype).size
    if shares_directions(model):
        return model.num_directions * itemsize
    params = sum(int(tf.size(v)) for v in model.trainable_variables)
    return params * itemsize + 4
