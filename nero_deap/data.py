"""Datasets as uint8 tensors, deterministic splits and on-device batching.

Four sources, chosen by the ``--data`` spec:

* ``cifar10`` (or ``cifar10:ROOT``): the official CIFAR-10 python batches
  (torchvision's ``cifar-10-batches-py``), downloaded through torchvision
  when absent and online;
* ``cifar100``, ``svhn``, ``mnist``, ``fashion-mnist`` (each also
  ``NAME:ROOT``): the other standard sets in torchvision's on-disk formats
  (:mod:`nero_deap.datasets`);
* a directory or ``.zip`` laid out ``train/<class>/*`` and ``test/<class>/*``
  (e.g. ``cifar10-jpeg.zip``): decoded once, cached as uint8 ``.npy`` under
  the cache directory (``$NERO_DEAP_CACHE``, default ``~/.cache/nero_deap``),
  keyed by the source's SHA-256;
* ``synthetic`` (or ``synthetic:N`` for N training images): small,
  deterministic, learnable; for tests.

The train/validation split is stratified and seeded (default 45,000/5,000 on
CIFAR-10).  Fitness uses validation only; the test split is for final reports.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm")


class DataError(RuntimeError):
    """Data missing or malformed; the message says what to pass instead.

    ``key`` and ``value``, where a configuration value does not fit the data (``val_size``, ``train_subset``),
    let a caller name the file the value came from (a run's config.toml: ``cli.naming_run_config``).
    """

    def __init__(self, message: str, key: Optional[str] = None, value: object = None):
        super().__init__(message)
        self.key, self.value = key, value


@dataclass
class RawData:
    train_x: np.ndarray  # uint8, N x C x H x W
    train_y: np.ndarray  # int64
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list


@dataclass
class DataSplits:
    """uint8 NCHW images and int64 labels, possibly on a GPU."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list
    mean: tuple
    std: tuple

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple:
        return tuple(self.train_x.shape[1:])

    def to(self, device) -> "DataSplits":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return DataSplits(**moved)


def cache_dir(fallback: Optional[str] = None) -> Path:
    """``$NERO_DEAP_CACHE`` where this process has it, else ``fallback``, else ``~/.cache/nero_deap``.

    The search sends the launching host's cache directory as ``fallback``:
    ssh does not pass the environment on, so a worker on another host would
    otherwise ignore the directory the user chose.  A host that sets its own
    ``$NERO_DEAP_CACHE`` (local scratch on a cluster node, say) keeps it.
    """
    own = os.environ.get("NERO_DEAP_CACHE")
    return Path(own or fallback or Path.home() / ".cache" / "nero_deap")


# ------------------------------------------------------------------ sources
def synthetic(n_train: int = 600, n_test: int = 200, num_classes: int = 10, size: int = 32,
              seed: int = 1234) -> RawData:
    """Class = a colour tint plus a stripe orientation/frequency, under noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    tints = rng.uniform(0.2, 0.8, size=(num_classes, 3)).astype(np.float32)
    angles = np.linspace(0, np.pi, num_classes, endpoint=False)

    def make(n: int):
        y = np.arange(n) % num_classes
        rng.shuffle(y)
        along = np.cos(angles[y])[:, None, None] * xx + np.sin(angles[y])[:, None, None] * yy
        stripes = np.sin(2 * np.pi * 3 * along)
        img = tints[y][:, :, None, None] + 0.2 * stripes[:, None] + rng.normal(0, 0.08, (n, 3, size, size))
        return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), y.astype(np.int64)

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return RawData(train_x, train_y, test_x, test_y, [f"class{i}" for i in range(num_classes)])


def _decode(blob: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _split_entries(names: list) -> dict:
    """Map 'train'/'test' -> [(class, name)] from paths like [prefix/]train/<class>/file."""
    found: dict = {"train": [], "test": []}
    for name in names:
        parts = Path(name).parts
        if not name.lower().endswith(IMAGE_SUFFIXES) or "__MACOSX" in parts or parts[-1].startswith("._"):
            continue
        for i, part in enumerate(parts[:-2]):
            if part in found and i + 2 == len(parts) - 1:
                found[part].append((parts[i + 1], name))
                break
    return found


def _decode_member(read, name: str, source: str) -> np.ndarray:
    from PIL import Image

    try:
        return _decode(read(name))
    except (OSError, ValueError, SyntaxError,  # PIL's errors for truncated or corrupt files
            Image.DecompressionBombError) as exc:  # a small file that claims a huge image (not an OSError)
        raise DataError(f"{source}: cannot decode image {name!r} ({type(exc).__name__}: {exc})"[:300]) from None


def _assemble(entries: dict, read, source: str = "data") -> RawData:
    if not entries["train"] or not entries["test"]:
        raise DataError("image folder needs train/<class>/<image> and test/<class>/<image> entries")
    classes = sorted({c for c, _ in entries["train"]})
    if len(classes) < 2:  # one class scores every network 100% clean and robust: a perfect, meaningless front
        raise DataError(f"{source}: train/ holds one class ({classes[0]!r}); classification needs at least two")
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for split in ("train", "test"):
        items = sorted(entries[split])
        unknown = {c for c, _ in items} - set(index)
        if unknown:
            raise DataError(f"test classes not in train: {sorted(unknown)}")
        images = [_decode_member(read, name, source) for _, name in items]  # serial: faster than threads here
        if len({im.shape for im in images}) != 1:
            raise DataError(f"{split} images have different sizes; resize them first")
        out.append(np.stack(images).transpose(0, 3, 1, 2).copy())
        out.append(np.array([index[c] for c, _ in items], dtype=np.int64))
    return RawData(out[0], out[1], out[2], out[3], classes)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dir_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _load_cached(key: str, build, cache: Optional[str] = None) -> RawData:
    """Return the cached arrays for ``key``, building and storing them once."""
    root = cache_dir(cache) / key
    names = ("train_x", "train_y", "test_x", "test_y")
    if (root / "classes.json").exists():
        arrays = [np.load(root / f"{n}.npy") for n in names]
        return RawData(*arrays, json.loads((root / "classes.json").read_text()))
    data = build()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tmp-"))
    for n in names:
        np.save(tmp / f"{n}.npy", getattr(data, n))
    (tmp / "classes.json").write_text(json.dumps(data.classes))
    try:
        os.replace(tmp, root)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return data


def image_folder(path: Path, cache: Optional[str] = None) -> RawData:
    """A directory or zip with train/<class>/* and test/<class>/*, cached by content hash."""
    if path.is_dir():
        key = "folder-" + _dir_digest(path)[:24]

        def build():
            names = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
            return _assemble(_split_entries(names), lambda n: (path / n).read_bytes(), str(path))
        return _load_cached(key, build, cache)
    key = "zip-" + _file_digest(path)[:24]

    def build_zip():
        with zipfile.ZipFile(path) as zf:
            entries = _split_entries(zf.namelist())
            return _assemble(entries, zf.read, str(path))
    try:
        return _load_cached(key, build_zip, cache)
    except zipfile.BadZipFile:
        raise DataError(f"{path} is not a valid zip file") from None


def _cifar_globals() -> dict:
    """What the official batches name: numpy arrays (and ``_codecs.encode`` for bytes in protocol 2)."""
    import codecs

    from numpy._core.multiarray import _reconstruct

    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = _reconstruct
    return table


def _safe_pickle_load(f) -> object:
    """A CIFAR-format pickle (dicts, lists, bytes, numbers, numpy arrays), read without the power to run code."""
    from .safe_pickle import restricted_load

    return restricted_load(f, _cifar_globals(), encoding="bytes")


def read_cifar_pickle(path: Path, convert, what: str):
    """``convert`` applied to the CIFAR-format pickle at ``path``; a DataError saying it is not ``what``
    when the file is hostile, truncated or of another kind."""
    try:
        with open(path, "rb") as f:
            return convert(_safe_pickle_load(f))
    except Exception as exc:
        raise DataError(f"{path}: not {what} ({exc})") from None


def _read_cifar_batches(folder: Path) -> RawData:
    def read(name: str, convert):
        return read_cifar_pickle(folder / name, convert, "an official CIFAR-10 python batch")

    def images(d: dict) -> tuple:
        return np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(d[b"labels"], np.int64)

    train = [read(f"data_batch_{i}", images) for i in range(1, 6)]
    test_x, test_y = read("test_batch", images)
    classes = read("batches.meta", lambda d: [c.decode() for c in d[b"label_names"]])
    return RawData(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                   test_x, test_y, classes)


def ensure_downloaded(title: str, folder: Path, present: bool, download) -> None:
    """Call ``download()`` (torchvision's) unless the files are ``present``; explain what to pass when that
    is impossible (offline, or ``NERO_DEAP_OFFLINE=1``)."""
    if present:
        return
    if os.environ.get("NERO_DEAP_OFFLINE") == "1" or download is None:
        raise DataError(f"{title} is not in {folder} (downloads disabled); pass --data with a directory "
                        "or .zip laid out train/<class>/* and test/<class>/*")
    try:
        download()
    except Exception as exc:  # offline, proxy, disk ...
        raise DataError(f"{title} is not in {folder} and could not be downloaded ({exc.__class__.__name__}); "
                        "if this machine is offline, pass --data with a directory or .zip laid out "
                        "train/<class>/* and test/<class>/* (e.g. cifar10-jpeg.zip)") from None


def official_cifar10(root: Path, download: bool = True) -> RawData:
    """The official CIFAR-10 python batches under ``root`` (torchvision's layout)."""
    folder = root / "cifar-10-batches-py"

    def fetch():
        import torchvision

        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    ensure_downloaded("CIFAR-10", folder, (folder / "test_batch").exists(), fetch if download else None)
    return _read_cifar_batches(folder)


MIN_SYNTHETIC = 20  # two images per class: enough for a stratified train/validation split
MAX_SYNTHETIC = 1_000_000


def load_raw(spec: str, cache: Optional[str] = None) -> RawData:
    """Resolve a ``--data`` spec (see the module docstring); ``cache`` overrides :func:`cache_dir`."""
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
    from .datasets import STANDARD_DATASETS, standard_dataset

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


# ------------------------------------------------------------------ splits
def stratified_split(labels: np.ndarray, n_val: int, seed: int) -> tuple:
    """Indices (train, val): each class gives its share of ``n_val``; seeded, sorted."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    shares = n_val * counts / counts.sum()
    take = np.floor(shares).astype(int)
    for i in np.argsort(-(shares - take))[: n_val - take.sum()]:
        take[i] += 1
    val = []
    for c, k in zip(classes, take):
        idx = np.flatnonzero(labels == c)
        val.extend(rng.permutation(idx)[:k])
    val = np.sort(np.array(val, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def class_count(labels: np.ndarray) -> int:
    """Classes as the labels number them (0 .. max); 1 for no labels."""
    return int(labels.max()) + 1 if len(labels) else 1


def validation_size(train_labels: np.ndarray, val_size: Optional[int] = None) -> int:
    """The validation size for these training labels (the default if None); DataError if it cannot fit.

    Checked at start-up too, so a run whose split cannot work stops before
    its first candidate instead of scoring every one (0, 0).  At least one
    image per class: a validation split of one image scored 1.0 or 0.0.
    """
    n, classes = len(train_labels), class_count(train_labels)
    if val_size is None:
        val_size = 5000 if n >= 50000 else max(classes, n // 5)
    if not min(classes, n - 1) <= val_size < n:
        raise DataError(f"val_size {val_size} does not fit {n} training images of {classes} classes: "
                        f"it must be in [{classes}, {n - 1}]", "val_size", val_size)
    return int(val_size)


def training_size(train_labels: np.ndarray, val_size: Optional[int] = None,
                  train_subset: Optional[int] = None) -> int:
    """How many images train once validation is carved out and ``train_subset`` applied; DataError for a
    subset below one image per class (every network scored chance) or above what is left (it was ignored
    while config.toml recorded it)."""
    left = len(train_labels) - validation_size(train_labels, val_size)
    classes = class_count(train_labels)
    if train_subset is None:
        return left
    if not classes <= train_subset <= left:
        raise DataError(f"train_subset {train_subset} must be in [{classes}, {left}]: one image per class at least, "
                        f"at most the {left} training images left after validation (leave it out to train on all)",
                        "train_subset", train_subset)
    return int(train_subset)


def make_splits(raw: RawData, val_size: Optional[int] = None, seed: int = 0,
                train_subset: Optional[int] = None, test_subset: Optional[int] = None) -> DataSplits:
    """Carve validation from train; optionally subsample train/test (stratified)."""
    val_size = validation_size(raw.train_y, val_size)
    train_subset = training_size(raw.train_y, val_size, train_subset)
    train_idx, val_idx = stratified_split(raw.train_y, val_size, seed)
    if train_subset < len(train_idx):  # training_size: never None, at most what validation left
        _, keep = stratified_split(raw.train_y[train_idx], train_subset, seed + 1)
        train_idx = train_idx[keep]
    test_idx = np.arange(len(raw.test_y))
    if test_subset is not None and test_subset < len(test_idx):
        _, test_idx = stratified_split(raw.test_y, test_subset, seed + 2)
    # Fixed shuffle: "the first n test images" (AutoAttack's subset, the epsilon sweep) must be a
    # fair sample even when the source lists the test set class by class, as image folders do.
    test_idx = np.random.default_rng(seed + 3).permutation(test_idx)
    test_x, test_y = raw.test_x[test_idx], raw.test_y[test_idx]
    train_x = raw.train_x[train_idx]
    pixels = train_x.reshape(train_x.shape[0], train_x.shape[1], -1).astype(np.float64) / 255.0
    mean = tuple(float(m) for m in pixels.mean(axis=(0, 2)))
    std = tuple(float(s) for s in pixels.std(axis=(0, 2)) + 1e-6)
    t = torch.from_numpy
    return DataSplits(t(train_x), t(raw.train_y[train_idx]), t(raw.train_x[val_idx]), t(raw.train_y[val_idx]),
                      t(np.ascontiguousarray(test_x)), t(np.ascontiguousarray(test_y)), list(raw.classes), mean, std)


# ---------------------------------------------------------------- batching
def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with ``pad``-pixel zero padding and horizontal flip, on x's device."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None]
    cropped = padded[batch, :, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(b, device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


def epoch_order(n: int, device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """The shuffled order of an epoch's ``n`` examples: one draw from ``generator``."""
    return torch.randperm(n, device=device, generator=generator)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False,
            augment_data: bool = False, generator: Optional[torch.Generator] = None,
            dtype: torch.dtype = torch.float32,
            memory_format: torch.memory_format = torch.contiguous_format,
            order: Optional[torch.Tensor] = None, skip: int = 0) -> Iterator:
    """Yield ([0,1] float images, labels) slices of device-resident uint8 data.

    ``order`` (a permutation of the indices) stands in for the shuffle's own
    draw and ``skip`` leaves out the first batches: together they continue an
    epoch that was paused (:mod:`nero_deap.train`'s snapshots), drawing from
    ``generator`` exactly what the uninterrupted epoch would have drawn.

    Every batch is dense in ``memory_format`` (the layout of the model it feeds,
    see :func:`nero_deap.network.input_memory_format`).  The uint8 -> float
    conversion is a copy anyway, so it also lays the batch out: no extra copy.
    Why it matters: :func:`augment` yields channels_last strides, and oneDNN's
    BRGEMM convolution corrupts the heap when handed such an input with NCHW
    weights (segfaults, "corrupted size vs. prev_size"; seen with torch 2.14.1
    / oneDNN 3.12 on AVX-512/AMX Xeons, in 5 of 6 runs of a plain-PyTorch
    reproducer; matches an open PyTorch report of conv2d segfaults in BRGEMM on
    non-contiguous inputs).
    """
    n = len(y)
    if order is None and shuffle:
        order = epoch_order(n, x.device, generator)
    for start in range(skip * batch_size, n, batch_size):
        if order is None:
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        else:
            sel = order[start:start + batch_size]
            xb, yb = x[sel], y[sel]
        if augment_data:
            xb = augment(xb, generator)
        yield xb.to(dtype=dtype, memory_format=memory_format).div_(255.0), yb
