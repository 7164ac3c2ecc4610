"""Small image datasets for calibration, tests and benchmarks, without torchvision.

Fashion-MNIST is read from its gzipped IDX files, found (in this order) under the ``root``
argument, the ``ORPRUNE_FASHION_MNIST`` environment variable, or the Debian package
``dataset-fashion-mnist``. Each root may hold the four files directly or in torchvision's layout
``<root>/FashionMNIST/raw/``. scikit-learn's 8x8 digits ship with scikit-learn and are the
fallback that is always available.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_CLASSES",
    "fashion_mnist_available",
    "find_fashion_mnist",
    "load_default",
    "load_digits",
    "load_fashion_mnist",
    "load_named",
]

#: Environment variable naming a directory with the Fashion-MNIST IDX files.
FASHION_MNIST_ENV = "ORPRUNE_FASHION_MNIST"
#: Where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs the files.
_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# IDX type codes (third byte of the magic number) -> numpy big-endian dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (gzipped or not) into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number).")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{path} is truncated: {len(data) - offset} bytes of data, expected {expected}.")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def _candidate_dirs(root: str | os.PathLike | None) -> list[Path]:
    if root is not None:
        bases = [Path(root)]
    else:
        bases = [Path(os.environ[FASHION_MNIST_ENV])] if os.environ.get(FASHION_MNIST_ENV) else []
        bases.append(_DEBIAN_DIR)
    dirs = []
    for base in bases:
        dirs += [base, base / "FashionMNIST" / "raw", base / "raw"]
    return dirs


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def find_fashion_mnist(root: str | os.PathLike | None = None, split: str = "train") -> tuple[Path, Path] | None:
    """Paths of the image and label files of ``split``, or ``None`` when they are not found."""
    if split not in _FILES:
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}.")
    for directory in _candidate_dirs(root):
        images, labels = (_find_file(directory, stem) for stem in _FILES[split])
        if images is not None and labels is not None:
            return images, labels
    return None


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    """Whether both splits of Fashion-MNIST can be found."""
    return all(find_fashion_mnist(root, split) is not None for split in _FILES)


def load_fashion_mnist(
    root: str | os.PathLike | None = None, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as tensors.

    Parameters
    ----------
    root : path, optional
        A directory holding the gzipped IDX files, directly or as ``<root>/FashionMNIST/raw/``
        (torchvision's layout). Default: ``$ORPRUNE_FASHION_MNIST``, then the Debian package's
        directory.
    split : {"train", "test"}

    Returns
    -------
    images : float32 tensor, shape (N, 1, 28, 28), values in [0, 1]
    labels : int64 tensor, shape (N,)

    Raises
    ------
    FileNotFoundError
        When the files are not found, with how to install them.
    """
    found = find_fashion_mnist(root, split)
    if found is None:
        searched = ", ".join(str(d) for d in _candidate_dirs(root))
        raise FileNotFoundError(
            f"Fashion-MNIST ({split}) not found; searched {searched}. Install it with "
            "`apt-get install dataset-fashion-mnist`, or pass `root` (or set "
            f"${FASHION_MNIST_ENV}) to a directory holding the IDX files, e.g. a torchvision "
            "root containing FashionMNIST/raw/."
        )
    images, labels = (_read_idx(path) for path in found)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"unexpected Fashion-MNIST shapes {images.shape} and {labels.shape}.")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_digits(split: str | None = None, *, test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 handwritten digits as tensors (1797 images).

    Parameters
    ----------
    split : {None, "train", "test"}
        ``None`` returns every image; otherwise a fixed, stratified split.
    test_fraction : float
        Share of the test split.
    seed : int
        Seed of the split.

    Returns
    -------
    images : float32 tensor, shape (N, 1, 8, 8), values in [0, 1]
    labels : int64 tensor, shape (N,)
    """
    from sklearn.datasets import load_digits as sk_load_digits

    if split not in (None, "train", "test"):
        raise ValueError(f"`split` must be None, 'train' or 'test', got {split!r}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must lie in (0, 1), got {test_fraction}.")
    bunch = sk_load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # pixel values are 0..16
    labels = bunch.target.astype(np.int64)
    if split is not None:
        from sklearn.model_selection import train_test_split

        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
        )
        idx = np.sort(train_idx if split == "train" else test_idx)
        images, labels = images[idx], labels[idx]
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)


def load_default(split: str = "train", root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Fashion-MNIST when installed, else the digits.

    Returns
    -------
    images, labels : tensors as in :func:`load_fashion_mnist` / :func:`load_digits`
    name : {"fashion-mnist", "digits"}
    """
    if split not in _FILES:
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}.")
    if find_fashion_mnist(root, split) is not None:
        return (*load_fashion_mnist(root, split), "fashion-mnist")
    return (*load_digits(split), "digits")


def load_named(name: str, root: str | os.PathLike | None = None, split: str = "train") -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(images, labels, name)`` of ``"digits"``, ``"fashion-mnist"`` or ``"auto"`` (:func:`load_default`)."""
    if name == "digits":
        images, labels = load_digits(split)
        return images, labels, "digits"
    if name == "fashion-mnist":
        images, labels = load_fashion_mnist(root, split=split)
        return images, labels, "fashion-mnist"
    if name == "auto":
        return load_default(split, root=root)
    raise ValueError(f"`name` must be 'digits', 'fashion-mnist' or 'auto', got {name!r}.")
