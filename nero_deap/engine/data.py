"""Deterministic train/validation splits and on-device batching of uint8 image tensors.

The train/validation split is stratified and seeded (default 45,000/5,000 on
CIFAR-10).  Fitness uses validation only; the test split is for ``final``.
Images stay uint8 on the device until a batch is drawn (a quarter of the
memory of float32; normalisation happens inside the model, so attacks work
in [0,1] pixel space).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .sources import DataError, RawData


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
    epoch that was paused (:mod:`nero_deap.engine.train`'s snapshots), drawing from
    ``generator`` exactly what the uninterrupted epoch would have drawn.

    Every batch is dense in ``memory_format`` (the layout of the model it feeds,
    see :func:`nero_deap.nets.network.input_memory_format`).  The uint8 -> float
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
