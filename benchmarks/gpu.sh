#!/usr/bin/env bash
# The GPU measurement, on a machine with JAX (and its CUDA libraries) but
# no TensorFlow and no network, through the Keras JAX backend.
#
# Usage: benchmarks/gpu.sh WHEELS_DIR MNIST_NPZ [OUT_DIR]
#   WHEELS_DIR  wheels of what the machine lacks (keras, namex, optree for
#               its Python), installed with `pip --no-index --no-deps`;
#   MNIST_NPZ   mnist.npz (x_train, y_train, x_test, y_test);
#   OUT_DIR     defaults to benchmarks/results/gpu.
#
# Runs, in this order and in under 10 minutes on one H200:
#   1. the step-cost table (benchmarks/jax_step_costs.py): MLP and MNIST CNN
#      at batch 64 and 1024, CIFAR-10 VGG at 64 and 256, every direction
#      family against backprop;
#   2. activity perturbation's step cost under fit against backprop and the
#      papers' estimator (benchmarks/activity_step_time.py, MLP and MNIST
#      CNN, jit on);
#   3. the papers' MLP at the second paper's budget (50 epochs of the full
#      MNIST training set, benchmarks/mnist_mlp_budget.py), backprop, the
#      papers' forward gradient and activity perturbation with one local
#      loss per unit and random-sign tangents (its time to 95 % test
#      accuracy).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels="${1:?WHEELS_DIR}"
mnist="${2:?MNIST_NPZ}"
out="${3:-benchmarks/results/gpu}"
mkdir -p "$out"

site="$(mktemp -d)"
pip install -q --no-index --no-deps --target "$site" "$wheels"/*.whl
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export KERAS_BACKEND=jax
python -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)"

python benchmarks/jax_step_costs.py --out "$out/step_costs.json" 2>&1 | tee "$out/step_costs.txt"
python benchmarks/activity_step_time.py --models mlp cnn --jit on --rounds 3 --steps 10 \
    --out "$out/activity_step_time.json" 2>&1 | tee "$out/activity_step_time.txt"
python benchmarks/mnist_mlp_budget.py --mnist "$mnist" --epochs 50 \
    --out "$out/mnist_mlp_budget.json" 2>&1 | tee "$out/mnist_mlp_budget.txt"
