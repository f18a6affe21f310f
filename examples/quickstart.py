"""Quick start: train a Keras model with forward gradients, then with backprop.

Top to bottom: build an ordinary Keras classifier, wrap it in
`ForwardGradientModel` with the estimator that learns (activity
perturbation with one local loss per hidden unit, Ren et al., ICLR 2023),
`compile()` and `fit()` it as usual, evaluate it, and train the same
architecture with backpropagation for comparison. Runs offline on the
MNIST subset shipped with the package (10,000 training and 2,000 test
digits), in about a minute on 2 CPU cores.

    python examples/quickstart.py
    python examples/quickstart.py --epochs 3
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up lines.

import keras  # noqa: E402

from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad.research import datasets  # noqa: E402


def build_classifier():
    """An ordinary Keras model: nothing here is specific to forward
    gradients."""
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = datasets.load("mnist", source="bundled")
    x_train, y_train = data["x_train"], data["y_train"]
    x_test, y_test = data["x_test"], data["y_test"]

    # 1. Wrap the model. Each step perturbs the hidden units' inputs with a
    #    random tangent, reads every unit's directional derivative from one
    #    forward-mode pass (no backward pass), and trains each hidden unit
    #    on a local loss of its own. With random-sign tangents and one loss
    #    per unit, each unit's estimate is its exact local gradient.
    keras.utils.set_random_seed(args.seed)
    model = ForwardGradientModel(
        build_classifier(),
        perturbation="activations",
        local_losses="auto",
        local_loss_groups="channels",
        direction="rademacher",
        seed=args.seed,
    )
    # 2. Compile and fit as usual, with a stock optimizer.
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=64, epochs=args.epochs, verbose=2)
    forward_s = time.perf_counter() - start
    _, forward_acc = model.evaluate(x_test, y_test, verbose=0)

    # 3. The same architecture, seed and settings with backpropagation.
    keras.utils.set_random_seed(args.seed)
    backprop = build_classifier()
    backprop.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    start = time.perf_counter()
    backprop.fit(x_train, y_train, batch_size=64, epochs=args.epochs, verbose=2)
    backprop_s = time.perf_counter() - start
    _, backprop_acc = backprop.evaluate(x_test, y_test, verbose=0)

    # 4. The trained Keras model is `model.model`: save or deploy it as usual.
    print(f"{'method':<18}{'test accuracy':>14}{'fit seconds':>13}")
    print(f"{'forward gradient':<18}{forward_acc:>14.3f}{forward_s:>13.1f}")
    print(f"{'backprop':<18}{backprop_acc:>14.3f}{backprop_s:>13.1f}")


if __name__ == "__main__":
    main()
