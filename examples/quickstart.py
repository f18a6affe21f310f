"""Quick start: train a Keras model with forward gradients, then with backprop.

Top to bottom: build an ordinary Keras classifier, wrap it in
`ForwardGradientModel`, `compile()` and `fit()` it as usual, evaluate it,
and train the same architecture with backpropagation for comparison. Runs
offline on the MNIST subset shipped with the package (10,000 training
digits), in well under a minute on 2 CPU cores.

    python examples/quickstart.py
    python examples/quickstart.py --epochs 5 --num-directions 8
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
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def compile_fit_evaluate(model, data, epochs):
    """Compiles and fits `model` as any Keras model; returns its test
    accuracy and the seconds `fit` took."""
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    start = time.perf_counter()
    model.fit(data["x_train"], data["y_train"], batch_size=64, epochs=epochs, verbose=2)
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(data["x_test"], data["y_test"], verbose=0)
    return accuracy, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-directions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = datasets.load("mnist", source="bundled")

    # 1. Wrap the model: each step estimates the gradient from
    #    `num_directions` random directions in forward mode, no backward pass.
    keras.utils.set_random_seed(args.seed)
    model = ForwardGradientModel(
        build_classifier(),
        direction="rademacher",
        num_directions=args.num_directions,
        seed=args.seed,
    )
    # 2. Compile and fit as usual, with a stock optimizer.
    forward_acc, forward_s = compile_fit_evaluate(model, data, args.epochs)

    # 3. The same architecture with backpropagation, for comparison.
    keras.utils.set_random_seed(args.seed)
    backprop_acc, backprop_s = compile_fit_evaluate(build_classifier(), data, args.epochs)

    # 4. The trained Keras model is `model.model`: save or deploy it as usual.
    print(f"{'method':<18}{'test accuracy':>14}{'fit seconds':>13}")
    print(f"{'forward gradient':<18}{forward_acc:>14.3f}{forward_s:>13.1f}")
    print(f"{'backprop':<18}{backprop_acc:>14.3f}{backprop_s:>13.1f}")


if __name__ == "__main__":
    main()
