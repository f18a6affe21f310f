"""Tests of the data module: local copies, the bundled subset, tfds (mocked,
never downloaded) and the error when no source is available."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from keras_fwdgrad.research import datasets


def _write_mnist(folder, n_train=50, n_test=20):
    rng = np.random.default_rng(0)
    np.savez(
        folder / "mnist.npz",
        x_train=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, n_train).astype(np.uint8),
        x_test=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, n_test).astype(np.uint8),
    )


def test_local_folder_by_argument_and_environment(tmp_path, monkeypatch):
    _write_mnist(tmp_path)
    arrays = datasets.load("mnist", data_dir=str(tmp_path))
    assert arrays["x_train"].shape == (50, 28, 28, 1)
    assert arrays["y_test"].dtype == np.int64
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path))
    assert datasets.load("mnist")["x_test"].shape == (20, 28, 28, 1)


def test_bundled_subset_is_real_mnist():
    arrays = datasets.load("mnist", source="bundled")
    assert arrays["x_train"].shape == (10000, 28, 28, 1)
    assert arrays["x_test"].shape == (2000, 28, 28, 1)
    # The first MNIST labels (see keras_fwdgrad/research/data/README.md).
    assert list(arrays["y_train"][:10]) == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert list(arrays["y_test"][:10]) == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_tfds_source_with_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        arrays = datasets.load("mnist", source="tfds")
    assert arrays["x_train"].shape == (12, 28, 28, 1)


def test_clear_error_when_no_source(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets, "_load_tfds", offline)
    with pytest.raises(FileNotFoundError, match=datasets.DATA_DIR_ENV) as info:
        datasets.load("cifar10", data_dir=str(tmp_path))
    assert "cifar10_jpeg.npz" in str(info.value)
    assert "no internet" in str(info.value)


def test_npz_file_and_keras_cache(tmp_path, monkeypatch):
    """`data_dir` may name the `.npz` file itself, and with no folder the
    file `keras.datasets.mnist.load_data()` downloads is used."""
    _write_mnist(tmp_path)
    arrays = datasets.load("mnist", data_dir=str(tmp_path / "mnist.npz"))
    assert arrays["x_train"].shape == (50, 28, 28, 1)
    monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
    (tmp_path / "home" / "datasets").mkdir(parents=True)
    _write_mnist(tmp_path / "home" / "datasets", n_train=7)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    assert datasets.load("mnist")["x_train"].shape == (7, 28, 28, 1)
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match=r"lacks the arrays \['x_train'"):
        datasets.load("mnist", data_dir=str(tmp_path / "wrong.npz"))


def test_error_names_a_missing_module_not_the_network(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'importlib_resources'")

    monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(datasets, "_load_tfds", broken)
    with pytest.raises(FileNotFoundError) as info:
        datasets.load("mnist")
    message = str(info.value)
    assert "importlib_resources" in message and "a module it needs is missing" in message
    assert "internet" not in message


def test_make_datasets_splits_normalizes_and_batches(tmp_path):
    _write_mnist(tmp_path, n_train=100, n_test=30)
    train, val, test = datasets.make_datasets(
        "mnist", batch_size=16, validation_fraction=0.2, data_dir=str(tmp_path)
    )
    x, y = next(iter(train))
    assert x.shape == (16, 28, 28, 1) and x.dtype == "float32"
    assert sum(int(b[1].shape[0]) for b in train) == 80
    assert sum(int(b[1].shape[0]) for b in val) == 20
    assert sum(int(b[1].shape[0]) for b in test) == 30
    # Normalized with MNIST's statistics: uniform pixels have mean
    # (0.5 - 0.1307) / 0.3081 = 1.2.
    all_x = np.concatenate([b[0].numpy() for b in train])
    assert abs(all_x.mean() - 1.2) < 0.05


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "svhn"}, "`name`"),
        ({"name": "mnist", "source": "web"}, "`source`"),
        ({"name": "cifar10", "source": "bundled"}, "only available for MNIST"),
    ],
)
def test_load_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        datasets.load(**kwargs)


def test_test_subset_is_not_the_first_examples(tmp_path):
    """A class-sorted test split (like some CIFAR-10 copies) must not give
    a one-class test subset."""
    x = np.zeros((1000, 4, 4, 3), "uint8")
    y_sorted = np.repeat(np.arange(10), 100)
    np.savez(tmp_path / "cifar10.npz", x_train=x, y_train=y_sorted, x_test=x, y_test=y_sorted)
    _, _, test = datasets.make_datasets(
        "cifar10", data_dir=str(tmp_path), source="local", test_size=200
    )
    labels = np.concatenate([b.numpy() for _, b in test])
    assert len(labels) == 200
    # 200 draws without replacement from 10 classes of 100: every class
    # appears (P(a class missing) < 10·(0.9)^200 ≈ 7e-9).
    assert set(labels) == set(range(10))
