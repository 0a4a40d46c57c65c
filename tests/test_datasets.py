"""Tests for rotvq.lab.datasets: embedded data, and MNIST / CIFAR-10 readers on tiny generated files."""
from __future__ import annotations

import ast
import gzip
import importlib.abc
import importlib.util
import pathlib
import pickle
import struct
import sys

import numpy as np
import pytest
import torch

from rotvq.lab.datasets import LabeledData, load_cifar10, load_digits, load_mnist, load_patches



# ---------------------------------------------------------------------------------- digits

def test_digits_shapes_dtypes_ranges():
    full, train, test = load_digits(), load_digits("train"), load_digits("test")
    assert isinstance(full, LabeledData)
    assert full.x.shape == (1797, 64) and full.x.dtype == torch.float32
    assert train.x.shape == (1438, 64) and test.x.shape == (359, 64)
    assert full.labels.dtype == torch.int64 and full.labels.shape == (1797,)
    assert set(full.labels.tolist()) == set(range(10))
    assert float(full.x.min()) == 0.0 and float(full.x.max()) == 1.0


def test_digits_split_is_a_stratified_partition():
    full, train, test = load_digits(), load_digits("train"), load_digits("test")
    # the two splits together are the whole data set, as multisets of (image, label) rows
    rows = lambda d: sorted(map(tuple, torch.cat([d.x * 16, d.labels[:, None]], 1).long().tolist()))  # noqa: E731
    assert rows(full) == sorted(rows(train) + rows(test))
    fraction = test.labels.bincount(minlength=10).double() / full.labels.bincount(minlength=10).double()
    assert torch.all((fraction > 0.18) & (fraction < 0.22))
    # fixed split: the same call twice gives the same tensors
    assert torch.equal(load_digits("test").x, test.x)


def test_digits_raw_values_dtype_and_image_layout():
    raw = load_digits(normalize=False, dtype=torch.float64)
    assert raw.x.dtype == torch.float64
    assert torch.equal(raw.x, raw.x.round()) and raw.x.max() == 16
    images = load_digits("train", flatten=False)
    assert images.x.shape == (1438, 1, 8, 8)
    assert torch.equal(images.x.reshape(1438, 64), load_digits("train").x)


def test_digit_images_look_like_digits():
    # a real-data sanity check: the class means differ clearly (not noise, not shuffled labels)
    x, labels = load_digits()
    means = torch.stack([x[labels == k].mean(0) for k in range(10)])
    distances = torch.cdist(means, means)
    assert distances[~torch.eye(10, dtype=bool)].min() > 0.5


@pytest.mark.parametrize("bad", ["validation", "TRAIN", 0])
def test_bad_split_raises(bad):
    with pytest.raises(ValueError, match="split"):
        load_digits(bad)
    with pytest.raises(ValueError, match="split"):
        load_patches(bad)


def test_integer_dtype_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        load_digits(dtype=torch.int64)


# --------------------------------------------------------------------------------- patches

def test_patches_shapes_and_ranges():
    train, test = load_patches("train"), load_patches("test")
    assert train.x.shape == (2400, 192) and test.x.shape == (600, 192)
    assert train.x.dtype == torch.float32
    assert 0.0 <= float(train.x.min()) and float(train.x.max()) <= 1.0
    assert train.labels.bincount().tolist() == [1200, 1200]
    assert float(train.x.std()) > 0.1  # natural images, not a constant
    images = load_patches("test", flatten=False)
    assert images.x.shape == (600, 3, 8, 8)
    assert torch.equal(images.x.reshape(600, -1), test.x)  # channel-major flattening


def test_patches_grayscale_is_luma():
    rgb = load_patches("test", flatten=False, dtype=torch.float64)
    gray = load_patches("test", flatten=False, grayscale=True, dtype=torch.float64)
    assert gray.x.shape == (600, 1, 8, 8)
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    assert (gray.x[:, 0] - torch.einsum("nchw,c->nhw", rgb.x, weights)).abs().max() < 1e-12
    assert load_patches(grayscale=True).x.shape == (3000, 64)


# ---------------------------------------------------------------------- the embedded files

def test_embedded_files_small(repo_root):
    sizes = [p.stat().st_size for p in (repo_root / "rotvq" / "lab" / "_data").glob("*.npz")]
    assert len(sizes) == 2 and sum(sizes) < 1_000_000


class _BlockSklearn(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sklearn", "PIL"):
            raise ImportError(f"test: {name} is not a runtime dependency")
        return None


def test_loading_does_not_need_scikit_learn(monkeypatch):
    import rotvq.lab.datasets

    tree = ast.parse(pathlib.Path(rotvq.lab.datasets.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "gzip", "importlib", "io", "pathlib", "pickle", "struct",
                        "typing", "numpy", "torch"}
    for name in [m for m in sys.modules if m.split(".")[0] in ("sklearn", "PIL")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BlockSklearn()] + sys.meta_path)
    assert load_digits("test").x.shape == (359, 64)
    assert load_patches("test").x.shape == (600, 192)


def test_embedded_files_regenerate_identically(repo_root):
    pytest.importorskip("sklearn")
    pytest.importorskip("PIL")
    spec = importlib.util.spec_from_file_location("make_embedded_data", repo_root / "tools" / "make_embedded_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.npz_bytes(tool.make_digits()) == (tool.DATA_DIR / "digits.npz").read_bytes()
    assert tool.npz_bytes(tool.make_patches()) == (tool.DATA_DIR / "patches.npz").read_bytes()


# ------------------------------------------------------------------------------------ MNIST

def _write_idx(path: pathlib.Path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def _fake_mnist(folder: pathlib.Path, n_train=5, n_test=3, compress=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_idx_files(tmp_path, compress):
    arrays = _fake_mnist(tmp_path, compress=compress)
    train = load_mnist(tmp_path, "train")
    assert train.x.shape == (5, 784) and train.x.dtype == torch.float32
    assert torch.equal(train.x, torch.from_numpy(arrays["train"][0].reshape(5, -1)).float() / 255)
    assert train.labels.tolist() == arrays["train"][1].tolist()
    test = load_mnist(tmp_path, "test", normalize=False, flatten=False)
    assert test.x.shape == (3, 1, 28, 28)
    assert torch.equal(test.x[:, 0], torch.from_numpy(arrays["t10k"][0]).float())


def test_mnist_torchvision_layout(tmp_path):
    _fake_mnist(tmp_path / "MNIST" / "raw")
    assert load_mnist(tmp_path, "test").x.shape == (3, 784)


def test_mnist_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)train-images-idx3-ubyte.*does not download"):
        load_mnist(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, None)


def test_mnist_corrupt_files(tmp_path):
    _fake_mnist(tmp_path, n_train=5)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8), False)
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        load_mnist(tmp_path, "train")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 16)
    with pytest.raises(ValueError, match="not an IDX file"):
        load_mnist(tmp_path, "test")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">HBBIII", 0, 8, 3, 2, 28, 28) + b"\x00")
    with pytest.raises(ValueError, match="holds 1 data bytes"):
        load_mnist(tmp_path, "test")


# --------------------------------------------------------------------------------- CIFAR-10

def _fake_cifar(folder: pathlib.Path, per_batch=2, protocol=2):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [b"x.png"] * per_batch}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=protocol)
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_reads_python_batches(tmp_path, protocol):
    written = _fake_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    train = load_cifar10(tmp_path, "train")
    assert train.x.shape == (10, 3072)
    assert train.labels.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    test = load_cifar10(tmp_path / "cifar-10-batches-py", "test", normalize=False, flatten=False)
    data = written["test_batch"][0]
    assert test.x.shape == (2, 3, 32, 32)
    c, h, w = 2, 5, 7  # channel-major storage: index c*1024 + h*32 + w
    assert test.x[1, c, h, w] == data[1, c * 1024 + h * 32 + w]


def test_cifar10_missing_batch(tmp_path):
    _fake_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(tmp_path, "train")
    assert load_cifar10(tmp_path, "test").x.shape == (2, 3072)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path / "elsewhere", "test")


class _Exploit:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_cifar10_refuses_code_and_bad_content(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Exploit()}))
    with pytest.raises(ValueError, match="refusing to load builtins.eval"):
        load_cifar10(folder, "test")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        load_cifar10(folder, "test")
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        load_cifar10(folder, "test")
