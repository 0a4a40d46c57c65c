"""Regenerate the small real datasets embedded in ``rotvq/lab/_data/``.

Usage::

    python tools/make_embedded_data.py            # (re)write rotvq/lab/_data/*.npz
    python tools/make_embedded_data.py --check    # exit 1 if the committed files differ

Needs scikit-learn (and Pillow, which scikit-learn uses to read its sample JPEGs) in the
*development* environment only: rotvq itself never imports scikit-learn; its loaders
(:mod:`rotvq.lab.datasets`) read the ``.npz`` files written here.

What is written (all pixel values ``uint8``; every random choice uses a fixed seed):

``digits.npz``
    ``images`` (1797, 8, 8), values 0..16, from ``sklearn.datasets.load_digits`` (a copy of
    the test set of the UCI "Optical Recognition of Handwritten Digits" data);
    ``labels`` (1797,) digit 0..9; ``is_test`` (1797,) bool, a stratified 80/20 split
    (20 % of each class, rounded, seed 0).
``patches.npz``
    ``patches`` (3000, 8, 8, 3) RGB patches cut from ``china.jpg`` and ``flower.jpg``
    (``sklearn.datasets.load_sample_images``, 427 x 640 pixels each), 1500 per image at
    uniformly random positions (seed 0); ``labels`` (3000,) source image (0 china,
    1 flower); ``is_test`` (3000,) bool.  The split is spatial, so no test pixel appears in
    a training patch: training patches lie entirely in columns 0..511 of their image and
    test patches entirely in columns 512..639 (1200 / 300 patches per image).

Both files also hold 0-d string arrays ``source`` and ``license``.  The zip members are
written with a fixed timestamp, so regenerating with the same library versions gives
byte-identical files (JPEG decoding may differ across Pillow/libjpeg versions; ``--check``
then reports the difference).
"""
from __future__ import annotations

import argparse
import io
import pathlib
import sys
import zipfile

import numpy as np

DATA_DIR = pathlib.Path(__file__).resolve().parents[1] / "rotvq" / "lab" / "_data"
SEED = 0
PATCH = 8  # patch side in pixels
PATCHES_PER_IMAGE = 1500
TEST_PER_IMAGE = 300
SPLIT_COLUMN = 512  # training patches left of this column, test patches right of it

DIGITS_SOURCE = (
    "UCI ML 'Optical Recognition of Handwritten Digits' (E. Alpaydin, C. Kaynak, 1998), "
    "test-set copy bundled with scikit-learn as sklearn.datasets.load_digits"
)
DIGITS_LICENSE = "distributed with scikit-learn under the BSD-3-Clause licence"
PATCHES_SOURCE = (
    "8x8 RGB patches of china.jpg and flower.jpg (Flickr; credited to danielbuechele, "
    "flower.jpg linked to user vultilion), bundled with scikit-learn as load_sample_images"
)
PATCHES_LICENSE = (
    "Creative Commons Attribution 2.0 (https://creativecommons.org/licenses/by/2.0/), "
    "as stated in sklearn/datasets/images/README.txt"
)


def make_digits() -> dict[str, np.ndarray]:
    """Digits as uint8 images with a stratified, seeded 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)  # (1797, 8, 8), exact: values are integers 0..16
    if not np.array_equal(images, bunch.images):
        raise RuntimeError("digits are not integers in 0..255")
    labels = bunch.target.astype(np.uint8)
    rng = np.random.default_rng(SEED)
    is_test = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        n_test = int(round(0.2 * len(members)))
        is_test[rng.permutation(members)[:n_test]] = True
    return {
        "images": images,
        "labels": labels,
        "is_test": is_test,
        "source": np.array(DIGITS_SOURCE),
        "license": np.array(DIGITS_LICENSE),
    }


def make_patches() -> dict[str, np.ndarray]:
    """RGB patches with a spatial train/test split (no shared pixels)."""
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images  # [china, flower], each (427, 640, 3) uint8
    rng = np.random.default_rng(SEED)
    patches, labels, is_test = [], [], []
    for label, image in enumerate(images):
        height, width, _ = image.shape
        n_train = PATCHES_PER_IMAGE - TEST_PER_IMAGE
        regions = [(0, SPLIT_COLUMN, n_train, False), (SPLIT_COLUMN, width, TEST_PER_IMAGE, True)]
        for lo, hi, count, test in regions:
            rows = rng.integers(0, height - PATCH + 1, size=count)
            cols = rng.integers(lo, hi - PATCH + 1, size=count)
            for r, c in zip(rows, cols):
                patches.append(image[r : r + PATCH, c : c + PATCH])
            labels += [label] * count
            is_test += [test] * count
    return {
        "patches": np.stack(patches).astype(np.uint8),  # (3000, 8, 8, 3)
        "labels": np.array(labels, dtype=np.uint8),
        "is_test": np.array(is_test, dtype=bool),
        "source": np.array(PATCHES_SOURCE),
        "license": np.array(PATCHES_LICENSE),
    }


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A compressed ``.npz`` (readable by ``np.load``) with fixed zip timestamps."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue(), compresslevel=9)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    files = {"digits.npz": make_digits(), "patches.npz": make_patches()}
    status = 0
    for name, arrays in files.items():
        path = DATA_DIR / name
        data = npz_bytes(arrays)
        if args.check:
            same = path.exists() and path.read_bytes() == data
            print(f"{path.name}: {'up to date' if same else 'DIFFERS'}")
            status |= not same
        else:
            DATA_DIR.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            print(f"wrote {path.name}: {len(data):,} bytes")
    return status


if __name__ == "__main__":
    sys.exit(main())
