"""Estimator settings that the benchmarks compare by name.

Free of TensorFlow, so that the scripts `benchmarks/gpu.sh` runs import
it on a machine that has only JAX.
"""

# Activity perturbation in which every unit's estimate is its exact local
# gradient: a block after every layer with trainable variables, one loss
# per channel and position, random-sign tangents (`u² = 1`). The
# benchmarks' layer-local methods start from it.
LAYER_LOCAL_OPTIONS = dict(
    perturbation="activations",
    local_losses="layers",
    local_loss_groups="channels",
    local_loss_patches="positions",
    direction="rademacher",
)
