"""Table I of the second paper: its tuned hyperparameters and test losses.

Rike and Førland tune the learning rate η0, the decay k of
η_i = η0·e^(−ik), Nesterov's momentum and Adam's β1, β2 separately for
forward gradient and backpropagation, retrain the best of each for 50
epochs (MNIST) or 100 (CIFAR-10), batch 64, and report the test loss.
Their forward gradients cap the directional derivative at 1 and clip the
gradient's global norm to 1.

`ROWS` holds every row, one dict each, with the keys `gradient`
(`"forward"` or `"backprop"`), `model` (`"mlp"`, `"cnn"` or `"vgg"`),
`dataset`, `optimizer` (`"sgd"`, `"nesterov"` or `"adam"`),
`learning_rate`, `decay`, `momentum`, `beta_1`, `beta_2`, `epochs` and
`test_loss`, as the paper prints them: a setting the optimizer does not
have (momentum outside Nesterov, β's outside Adam) is 0 and unused.
`row()` finds one row, `rows()` one model's.

Example:

```python
from keras_fwdgrad.research import table1

paper = table1.row("mlp", "forward", "adam")
paper["learning_rate"], paper["test_loss"]  # (0.0005, 0.283)
```
"""

MODELS = ("mlp", "cnn", "vgg")
DATASETS = {"mlp": "mnist", "cnn": "mnist", "vgg": "cifar10"}

# The columns, as the paper prints them.
COLUMNS = (
    "gradient",
    "model",
    "optimizer",
    "learning_rate",
    "decay",
    "momentum",
    "beta_1",
    "beta_2",
    "epochs",
    "test_loss",
)
_TABLE = (
    ("forward", "mlp", "sgd", 0.000464, 1e-5, 0.0, 0.0, 0.0, 50, 0.332),
    ("backprop", "mlp", "sgd", 0.1, 0.0, 0.0, 0.0, 0.0, 50, 0.000),
    ("forward", "mlp", "nesterov", 0.000320, 1e-5, 0.367, 0.0, 0.0, 50, 0.270),
    ("backprop", "mlp", "nesterov", 0.1, 0.0, 0.5, 0.0, 0.0, 50, 0.000),
    ("forward", "mlp", "adam", 0.0005, 5e-5, 0.0, 0.99, 0.999, 50, 0.283),
    ("backprop", "mlp", "adam", 0.0001, 0.0, 0.0, 0.9, 0.999, 50, 0.000),
    ("forward", "cnn", "sgd", 0.000398, 1e-5, 0.0, 0.0, 0.0, 50, 0.548),
    ("backprop", "cnn", "sgd", 0.1, 0.0, 0.0, 0.0, 0.0, 50, 0.000),
    ("forward", "cnn", "nesterov", 0.0001, 1e-4, 0.9, 0.0, 0.0, 50, 0.559),
    ("backprop", "cnn", "nesterov", 0.01, 0.0, 0.783, 0.0, 0.0, 50, 0.000),
    ("forward", "cnn", "adam", 0.00025, 1e-4, 0.0, 0.9, 0.9999, 50, 0.669),
    ("backprop", "cnn", "adam", 0.000236, 0.0, 0.0, 0.9, 0.999, 50, 0.000),
    ("forward", "vgg", "sgd", 0.000433, 1e-6, 0.0, 0.0, 0.0, 100, 6.955),
    ("backprop", "vgg", "sgd", 0.01, 1e-4, 0.0, 0.0, 0.0, 100, 1.685),
)
ROWS = tuple(dict(zip(COLUMNS, values), dataset=DATASETS[values[1]]) for values in _TABLE)


def row(model, gradient, optimizer):
    """Table I's row for one model, gradient and optimizer.

    Args:
        model: `"mlp"`, `"cnn"` or `"vgg"`.
        gradient: `"forward"` or `"backprop"`.
        optimizer: `"sgd"`, `"nesterov"` or `"adam"` (the VGG has only
            `"sgd"`).

    Returns:
        A new dict with the keys listed in the module's docstring.

    Raises:
        ValueError: if Table I has no such row.
    """
    for r in ROWS:
        if (r["model"], r["gradient"], r["optimizer"]) == (model, gradient, optimizer):
            return dict(r)
    have = sorted({(r["model"], r["gradient"], r["optimizer"]) for r in ROWS})
    raise ValueError(
        "Table I has no row for "
        f"model={model!r}, gradient={gradient!r}, optimizer={optimizer!r}; it has {have}"
    )


def rows(model):
    """Table I's rows of one model, in the paper's order (new dicts)."""
    if model not in MODELS:
        raise ValueError(f"`model` must be one of {MODELS}; got {model!r}")
    return [dict(r) for r in ROWS if r["model"] == model]
