"""MNIST and CIFAR-10 as `tf.data` pipelines, with offline fallbacks.

Data comes, in order of preference, from:

1. a local folder given as `data_dir=` or in the environment variable
   `KERAS_FWDGRAD_DATA_DIR`, holding `mnist.npz` (keys `x_train`,
   `y_train`, `x_test`, `y_test`, the layout `keras.datasets.mnist`
   downloads) or `cifar10_jpeg.npz` (each split's JPEG files end to end
   in `train_jpeg`/`test_jpeg`, image `i` from byte `offsets[i]` to
   `offsets[i + 1]` of `train_offsets`/`test_offsets`, labels in
   `y_train`/`y_test`) or `cifar10.npz` (uint8 arrays with the same keys
   as MNIST); `data_dir` may also name such an `.npz` file itself;
2. Keras' own download of MNIST (`~/.keras/datasets/mnist.npz`, or under
   `KERAS_HOME`), left by `keras.datasets.mnist.load_data()`;
3. tensorflow-datasets (`tfds.load`), which downloads on first use;
4. for MNIST only, and only when asked with `source="bundled"`, the real
   10,000/2,000-digit subset shipped inside this package.

When none is available the error says how to provide the data.
"""

import os

import numpy as np
import tensorflow as tf

DATA_DIR_ENV = "KERAS_FWDGRAD_DATA_DIR"
SOURCES = ("auto", "local", "tfds", "bundled")
NAMES = ("mnist", "cifar10")

# Per-channel statistics of the training sets, used for normalization.
_MEAN_STD = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_BUNDLED = os.path.join(os.path.dirname(__file__), "data", "mnist_small.npz")


def _check(name, source):
    if name not in NAMES:
        raise ValueError(f"`name` must be one of {NAMES}. Received: name={name!r}")
    if source not in SOURCES:
        raise ValueError(f"`source` must be one of {SOURCES}. Received: source={source!r}")


_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _load_npz_file(path):
    with np.load(path) as d:
        missing = [k for k in _KEYS if k not in d]
        if missing:
            raise ValueError(
                f"{path!r} lacks the arrays {missing}; expected {list(_KEYS)} "
                "(the layout of `keras.datasets.mnist`'s mnist.npz)."
            )
        return {k: d[k] for k in _KEYS}


def _keras_cache(name):
    """Where `keras.datasets.<name>.load_data()` keeps its download (MNIST
    only: Keras stores CIFAR-10 as pickled batches)."""
    if name != "mnist":
        return None
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    path = os.path.join(home, "datasets", "mnist.npz")
    return path if os.path.exists(path) else None


def _load_local(name, data_dir):
    if os.path.isfile(data_dir):
        return _load_npz_file(data_dir)
    if name == "mnist":
        path = os.path.join(data_dir, "mnist.npz")
        if not os.path.exists(path):
            return None
        return _load_npz_file(path)
    plain = os.path.join(data_dir, "cifar10.npz")
    if os.path.exists(plain):
        return _load_npz_file(plain)
    jpeg = os.path.join(data_dir, "cifar10_jpeg.npz")
    if not os.path.exists(jpeg):
        return None
    with np.load(jpeg) as d:
        return {
            "x_train": _decode_jpegs(d["train_jpeg"], d["train_offsets"]),
            "y_train": d["y_train"],
            "x_test": _decode_jpegs(d["test_jpeg"], d["test_offsets"]),
            "y_test": d["y_test"],
        }


def _decode_jpegs(blob, offsets):
    blob = blob.tobytes()
    images = [
        tf.io.decode_jpeg(
            blob[offsets[i] : offsets[i + 1]],
            channels=3,
            dct_method="INTEGER_ACCURATE",
        )
        for i in range(len(offsets) - 1)
    ]
    return np.stack([img.numpy() for img in images])


def _load_tfds(name, data_dir):
    import tensorflow_datasets as tfds

    arrays = {}
    for split in ("train", "test"):
        ds = tfds.load(name, split=split, as_supervised=True, data_dir=data_dir)
        images, labels = zip(*tfds.as_numpy(ds))
        arrays[f"x_{split}"] = np.stack(images)
        arrays[f"y_{split}"] = np.asarray(labels)
    return arrays


def load(name, data_dir=None, source="auto"):
    """Loads a dataset as NumPy arrays.

    Args:
        name: `"mnist"` or `"cifar10"`.
        data_dir: Optional folder with local copies (see the module
            docstring). Defaults to the environment variable
            `KERAS_FWDGRAD_DATA_DIR`, if set.
        source: `"auto"` (local folder if given, else tensorflow-datasets),
            `"local"`, `"tfds"`, or `"bundled"` (the MNIST subset shipped
            with the package). Defaults to `"auto"`.

    Returns:
        A dict with `x_train`, `y_train`, `x_test`, `y_test`: uint8 images
        of shape `[N, H, W, C]` and integer labels.

    Raises:
        ValueError: for an unknown `name` or `source`.
        FileNotFoundError: when the data cannot be found, with instructions.
    """
    _check(name, source)
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
    if source == "bundled":
        if name != "mnist":
            raise ValueError(
                f"`source='bundled'` is only available for MNIST. Received: name={name!r}"
            )
        with np.load(_BUNDLED) as d:
            arrays = {k: d[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        return _standardize(arrays)
    if source in ("auto", "local") and data_dir:
        arrays = _load_local(name, data_dir)
        if arrays is not None:
            return _standardize(arrays)
        if source == "local":
            raise FileNotFoundError(_missing_message(name, data_dir, None))
    if source == "local":
        raise FileNotFoundError(_missing_message(name, None, None))
    if source == "auto" and _keras_cache(name):
        return _standardize(_load_npz_file(_keras_cache(name)))
    try:
        return _standardize(_load_tfds(name, None))
    except Exception as e:  # Any failure to fetch or prepare the dataset.
        raise FileNotFoundError(_missing_message(name, data_dir, e)) from e


def _standardize(arrays):
    out = dict(arrays)
    for split in ("x_train", "x_test"):
        x = np.asarray(out[split])
        if x.ndim == 3:
            x = x[..., np.newaxis]
        out[split] = x
    for split in ("y_train", "y_test"):
        out[split] = np.asarray(out[split]).astype("int64").reshape(-1)
    return out


def _missing_message(name, data_dir, error):
    files = "mnist.npz" if name == "mnist" else "cifar10_jpeg.npz or cifar10.npz"
    lines = [f"Could not load {name!r}."]
    if data_dir:
        lines.append(f"No {files} in data_dir={data_dir!r}.")
    if isinstance(error, ImportError):
        lines.append(
            "tensorflow-datasets could not run: a module it needs is missing "
            f"({type(error).__name__}: {str(error)[:200]}); reinstall keras-fwdgrad "
            "with pip so that its dependencies are installed."
        )
    elif error is not None:
        lines.append(
            f"tensorflow-datasets failed too ({type(error).__name__}: "
            f"{str(error)[:200]}); it downloads the data on first use, which "
            "needs internet access."
        )
    lines.append(
        f"Provide a local copy: put {files} in a folder and pass "
        f"`data_dir=` (or `--data-dir` to the examples) or set "
        f"{DATA_DIR_ENV}=/path/to/folder."
    )
    if name == "mnist":
        lines.append(
            "For a quick offline run, `source='bundled'` uses the "
            "10,000/2,000-digit MNIST subset shipped with keras-fwdgrad."
        )
    return " ".join(lines)


def normalize(name, x):
    """Scales uint8 images to floats with zero mean and unit variance per
    channel (training-set statistics)."""
    mean, std = _MEAN_STD[name]
    x = tf.cast(x, tf.float32) / 255.0
    return (x - tf.constant(mean)) / tf.constant(std)


def make_datasets(
    name,
    batch_size=64,
    validation_fraction=0.1,
    data_dir=None,
    source="auto",
    train_size=None,
    test_size=None,
    seed=0,
    drop_remainder=False,
):
    """Builds train, validation and test `tf.data` pipelines.

    The validation split is held out from the end of the training set (the
    second paper tunes learning rates on it). Training data is shuffled
    each epoch with `seed`; all splits are normalized, batched and
    prefetched.

    Args:
        name: `"mnist"` or `"cifar10"`.
        batch_size: Integer. Defaults to `64` (both papers).
        validation_fraction: Float in `[0, 1)`. Defaults to `0.1`.
        data_dir: See `load()`.
        source: See `load()`.
        train_size: Optional integer, keep only this many training examples
            (before the validation split) for quick runs.
        test_size: Optional integer, keep only this many test examples
            (a fixed random subset, the same for every seed).
        seed: Integer seed of the shuffling. Defaults to `0`.
        drop_remainder: Whether to drop the last, smaller training batch
            of each epoch (every step then has the same shape, so an
            XLA-compiled step compiles once). Defaults to `False`.

    Returns:
        A tuple `(train, validation, test)` of `tf.data.Dataset`s yielding
        `(images, labels)`; `validation` is `None` when
        `validation_fraction` is 0.

    Example:

    ```python
    train, val, test = keras_fwdgrad.research.datasets.make_datasets(
        "mnist", data_dir="/data/shared")
    model.fit(train, validation_data=val, epochs=5)
    ```
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive integer. Received: batch_size={batch_size!r}"
        )
    if not 0 <= validation_fraction < 1:
        raise ValueError(
            "`validation_fraction` must be in [0, 1). "
            f"Received: validation_fraction={validation_fraction!r}"
        )
    arrays = load(name, data_dir=data_dir, source=source)
    x, y = arrays["x_train"], arrays["y_train"]
    if train_size is not None:
        x, y = x[:train_size], y[:train_size]
    x_test, y_test = arrays["x_test"], arrays["y_test"]
    if test_size is not None:
        # A fixed random subset: some copies of the test split are sorted
        # by class, so its first examples would all share one label.
        keep = np.sort(np.random.default_rng(0).permutation(len(x_test))[:test_size])
        x_test, y_test = x_test[keep], y_test[keep]
    num_val = int(round(len(x) * validation_fraction))

    def pipeline(images, labels, shuffle):
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        if shuffle:
            ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size, drop_remainder=shuffle and drop_remainder)
        ds = ds.map(
            lambda a, b: (normalize(name, a), b),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        return ds.prefetch(tf.data.AUTOTUNE)

    train = pipeline(x[: len(x) - num_val], y[: len(x) - num_val], True)
    val = pipeline(x[len(x) - num_val :], y[len(x) - num_val :], False) if num_val else None
    test = pipeline(x_test, y_test, False)
    return train, val, test
