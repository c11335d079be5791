"""The datasets registry: what each ``--data`` spec names, and how it is read.

Adding a standard dataset touches this module (an entry of
:data:`STANDARD_DATASETS`) and its test, nothing else.

* ``cifar10`` (or ``cifar10:ROOT``): the official CIFAR-10 python batches
  (torchvision's ``cifar-10-batches-py``), downloaded through torchvision
  when absent and online;
* ``cifar100``, ``svhn``, ``mnist``, ``fashion-mnist`` (each also
  ``NAME:ROOT``, default ``<cache>/NAME``): torchvision's on-disk formats,
  downloaded by torchvision's dataset class first when absent and online;
  offline, the error says what to pass instead:

  * ``cifar100``: ``cifar-100-python/{train,test,meta}`` pickles, the 100 fine
    labels; read with the data-only unpickler, which cannot run code;
  * ``svhn``: ``{train,test}_32x32.mat`` (MATLAB, read with SciPy); label 10
    means digit 0, as torchvision maps it; the ``extra`` split is not used;
  * ``mnist`` / ``fashion-mnist``: ``MNIST/raw`` / ``FashionMNIST/raw`` IDX
    files (``.gz`` too): one-channel 28x28 images, which the decoder, the
    attacks, the final stage and model export handle like any other shape;

* a directory or ``.zip`` laid out ``train/<class>/*`` and ``test/<class>/*``
  (e.g. ``cifar10-jpeg.zip``), decoded once and cached
  (:mod:`nero_deap.engine.sources`);
* ``synthetic`` (or ``synthetic:N`` for N training images): small,
  deterministic, learnable; for tests and try-outs.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .sources import (DataError, RawData, cache_dir, ensure_downloaded, image_folder, official_cifar10,
                      read_cifar_pickle, synthetic)

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
DIGITS = [str(d) for d in range(10)]


def _torchvision(cls_name: str, root: Path, **splits) -> Callable:
    """A download step: torchvision's dataset class with download=True, once per split keyword set."""
    def fetch():
        import torchvision

        cls = getattr(torchvision.datasets, cls_name)
        for kwargs in splits.values():
            cls(str(root), download=True, **kwargs)
    return fetch


# ------------------------------------------------------------------ CIFAR-100
def cifar100(root: Path) -> RawData:
    folder = root / "cifar-100-python"
    files = [folder / n for n in ("train", "test", "meta")]
    ensure_downloaded("CIFAR-100", folder, all(f.exists() for f in files),
                      _torchvision("CIFAR100", root, train={"train": True}))

    def read(path: Path, convert):
        return read_cifar_pickle(path, convert, "an official CIFAR-100 python file")

    def images(d: dict) -> tuple:
        return (np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32),
                np.asarray(d[b"fine_labels"], dtype=np.int64))

    (train_x, train_y), (test_x, test_y) = read(files[0], images), read(files[1], images)
    classes = read(files[2], lambda d: [c.decode() for c in d[b"fine_label_names"]])
    return RawData(train_x, train_y, test_x, test_y, classes)


# ----------------------------------------------------------------------- SVHN
def svhn(root: Path) -> RawData:
    files = [root / f"{split}_32x32.mat" for split in ("train", "test")]
    ensure_downloaded("SVHN", root, all(f.exists() for f in files),
                      _torchvision("SVHN", root, train={"split": "train"}, test={"split": "test"}))
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("reading SVHN's .mat files needs SciPy: pip install scipy") from None

    def load(path: Path) -> tuple:
        try:
            mat = loadmat(str(path))
            x = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1))  # HWCN -> NCHW
            y = np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10  # 10 is the digit 0
        except (KeyError, ValueError, OSError) as exc:
            raise DataError(f"{path}: not an SVHN .mat file ({exc.__class__.__name__}: {exc})") from None
        if len(x) != len(y):
            raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
        return x, y

    (train_x, train_y), (test_x, test_y) = load(files[0]), load(files[1])
    return RawData(train_x, train_y, test_x, test_y, DIGITS)


# ---------------------------------------------------------- MNIST and Fashion
IDX_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (LeCun's MNIST format), plain or gzipped."""
    raw = (gzip.decompress if path.suffix == ".gz" else bytes)(path.read_bytes())
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape}, the file holds {body.size} bytes")
    return body.reshape(shape)


def _idx_dataset(title: str, cls_name: str, subdir: str, classes: list) -> Callable:
    def load(root: Path) -> RawData:
        folder = root / subdir / "raw"

        def find(stem: str):
            return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.exists()), None)
        ensure_downloaded(title, folder, all(find(stem) for stem in IDX_FILES.values()),
                          _torchvision(cls_name, root, train={"train": True}, test={"train": False}))
        arrays = {key: read_idx(find(stem)) for key, stem in IDX_FILES.items()}
        for split in ("train", "test"):
            x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                raise DataError(f"{folder}: {split} images {x.shape} do not match labels {y.shape}")
        return RawData(arrays["train_x"][:, None].copy(), arrays["train_y"].astype(np.int64),
                       arrays["test_x"][:, None].copy(), arrays["test_y"].astype(np.int64), list(classes))
    return load


STANDARD_DATASETS = {
    "cifar100": cifar100,
    "svhn": svhn,
    "mnist": _idx_dataset("MNIST", "MNIST", "MNIST", DIGITS),
    "fashion-mnist": _idx_dataset("Fashion-MNIST", "FashionMNIST", "FashionMNIST", FASHION_CLASSES),
}


def standard_dataset(name: str, root: Path) -> RawData:
    """The dataset ``name`` (a key of :data:`STANDARD_DATASETS`) from torchvision's layout under ``root``."""
    return STANDARD_DATASETS[name](Path(root))


MIN_SYNTHETIC = 20  # two images per class: enough for a stratified train/validation split
MAX_SYNTHETIC = 1_000_000


def load_raw(spec: str, cache: Optional[str] = None) -> RawData:
    """Resolve a ``--data`` spec (see the module docstring); ``cache`` overrides
    :func:`~nero_deap.engine.sources.cache_dir`."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        text = spec.split(":", 1)[1] if ":" in spec else "600"
        if not (text.isdigit() and MIN_SYNTHETIC <= int(text) <= MAX_SYNTHETIC):
            raise DataError(f"--data {spec!r}: synthetic:N needs a whole number N of training images "
                            f"in [{MIN_SYNTHETIC}, {MAX_SYNTHETIC}]")
        n = int(text)
        return synthetic(n_train=n, n_test=max(50, n // 3))
    if spec == "cifar10" or spec.startswith("cifar10:"):
        root = Path(spec.split(":", 1)[1]) if ":" in spec else cache_dir(cache) / "cifar10"
        return official_cifar10(root)
    name, _, root_text = spec.partition(":")
    if name in STANDARD_DATASETS:
        return standard_dataset(name, Path(root_text).expanduser() if root_text else cache_dir() / name)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"--data {spec!r}: no such file or directory (use cifar10, {', '.join(STANDARD_DATASETS)}, "
                        "synthetic, or a directory/.zip with train/<class>/* and test/<class>/*)")
    if not (path.is_dir() or path.is_file()):  # /dev/zero or a FIFO: hashing it would never end
        raise DataError(f"--data {spec!r}: not a directory or a regular file")
    if path.is_dir() and (path / "cifar-10-batches-py").is_dir():
        return official_cifar10(path, download=False)
    return image_folder(path, cache)


