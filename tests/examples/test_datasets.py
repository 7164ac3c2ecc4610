from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from orprune.examples.datasets import (
    FASHION_MNIST_ENV,
    fashion_mnist_available,
    load_default,
    load_digits,
    load_fashion_mnist,
)


def _write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


@pytest.fixture
def fake_root(tmp_path):
    """A torchvision-style root with 5 train and 3 test images of known pixels."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {}
    for split, n, prefix in (("train", 5, "train"), ("test", 3, "t10k")):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, compress=split == "train")
        data[split] = (images, labels)
    return tmp_path, data


@pytest.mark.parametrize("split", ["train", "test"])
def test_reads_torchvision_layout(fake_root, split):
    root, data = fake_root
    x, y = load_fashion_mnist(root, split)
    images, labels = data[split]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (len(labels), 1, 28, 28)
    np.testing.assert_allclose(x.numpy()[:, 0] * 255.0, images, atol=1e-4)
    np.testing.assert_array_equal(y.numpy(), labels)


def test_environment_variable(fake_root, monkeypatch):
    root, data = fake_root
    monkeypatch.setenv(FASHION_MNIST_ENV, str(root / "FashionMNIST" / "raw"))
    x, y = load_fashion_mnist(split="test")
    assert x.shape[0] == 3  # the env var is searched before the system-wide install
    np.testing.assert_array_equal(y.numpy(), data["test"][1])


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    assert not fashion_mnist_available(tmp_path)


def test_bad_split(fake_root):
    with pytest.raises(ValueError, match="`split`"):
        load_fashion_mnist(fake_root[0], "validation")


def test_truncated_file_is_rejected(tmp_path):
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, dtype=np.uint8))
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "rb") as handle:
        payload = handle.read()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(payload[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist(tmp_path)


def test_digits():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10))
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    assert len(ytr) + len(yte) == 1797
    assert (torch.bincount(yte) > 0).all()


def test_default_falls_back_to_digits(tmp_path):
    x, y, name = load_default("test", root=tmp_path)
    assert name == "digits" and x.shape[1:] == (1, 8, 8)


@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST is not installed")
def test_real_fashion_mnist():
    x, y = load_fashion_mnist(split="test")
    assert x.shape == (10000, 1, 28, 28)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))
    x, y, name = load_default("train")
    assert name == "fashion-mnist" and x.shape == (60000, 1, 28, 28)
