"""Where raw datasets come from: synthetic data, image folders and zips, CIFAR-format pickles, downloads.

Every source yields a :class:`RawData`: uint8 N x C x H x W images and int64
labels for train and test, with the class names.  Image folders and zips are
decoded once and cached as uint8 ``.npy`` under the cache directory
(``$NERO_DEAP_CACHE``, default ``~/.cache/nero-deap/data``), keyed by the source's
SHA-256, because decoding CIFAR-10's 60,000 JPEGs takes far longer than
loading the arrays back.  Pickled formats are read by the data-only
unpickler (:mod:`nero_deap.common.safe_pickle`), which cannot run code.
Which ``--data`` spec names which source is :mod:`nero_deap.engine.datasets`'s job.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..common.cache import user_cache
from ..common.safe_pickle import restricted_load

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



def cache_dir(fallback: Optional[str] = None) -> Path:
    """``$NERO_DEAP_CACHE`` where this process has it, else ``fallback``, else ``data/`` in
    :func:`~nero_deap.common.cache.user_cache` (``~/.cache/nero-deap/data``).

    The search sends the launching host's cache directory as ``fallback``:
    ssh does not pass the environment on, so a worker on another host would
    otherwise ignore the directory the user chose.  A host that sets its own
    ``$NERO_DEAP_CACHE`` (local scratch on a cluster node, say) keeps it.
    """
    own = os.environ.get("NERO_DEAP_CACHE")
    return Path(own or fallback or user_cache() / "data")



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


CACHE_ARRAYS = ("train_x", "train_y", "test_x", "test_y")
MANIFEST = "manifest.json"  # {"format": 1, "sha256": {file name: hex digest}}, written last


class _BadCache(Exception):
    """A cache folder that cannot be trusted; the message says why."""


def _check_raw(data: RawData) -> None:
    """What every source promises (module docstring): uint8 N x C x H x W images with as many int64 labels,
    the same C x H x W in train and test, labels in 0..len(classes)-1; :class:`_BadCache` if not."""
    if not (isinstance(data.classes, list) and data.classes and all(isinstance(c, str) for c in data.classes)
            and len(set(data.classes)) == len(data.classes)):
        raise _BadCache("classes.json is not a list of distinct class names")
    for split in ("train", "test"):
        x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        if x.dtype != np.uint8 or x.ndim != 4 or not x.shape[0]:
            raise _BadCache(f"{split}_x is {x.dtype} {x.shape}, not uint8 N x C x H x W images")
        if y.dtype != np.int64 or y.shape != (x.shape[0],):
            raise _BadCache(f"{split}_y is {y.dtype} {y.shape}, not {x.shape[0]} int64 labels")
        if y.min() < 0 or y.max() >= len(data.classes):
            raise _BadCache(f"{split}_y holds labels outside 0..{len(data.classes) - 1}")
    if data.train_x.shape[1:] != data.test_x.shape[1:]:
        raise _BadCache(f"train_x {data.train_x.shape[1:]} and test_x {data.test_x.shape[1:]} differ in C x H x W")


def _read_cache(root: Path) -> RawData:
    """The arrays cached in ``root``, each file checked against the manifest's SHA-256 and the arrays against
    :func:`_check_raw`; :class:`_BadCache` (why) if anything is missing, altered or malformed."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise _BadCache(f"no {MANIFEST} (written by an earlier version, or half written)") from None
    except (OSError, ValueError) as exc:
        raise _BadCache(f"unreadable {MANIFEST} ({type(exc).__name__})") from None
    digests = manifest.get("sha256") if isinstance(manifest, dict) else None
    files = [f"{n}.npy" for n in CACHE_ARRAYS] + ["classes.json"]
    if not isinstance(digests, dict) or sorted(digests) != sorted(files):
        raise _BadCache(f"{MANIFEST} does not list {', '.join(files)}")
    blobs = {}
    for name in files:
        try:
            blobs[name] = (root / name).read_bytes()
        except OSError as exc:
            raise _BadCache(f"cannot read {name} ({exc.strerror or exc})") from None
        if hashlib.sha256(blobs[name]).hexdigest() != digests[name]:
            raise _BadCache(f"{name} does not match its SHA-256 in {MANIFEST}")
    try:
        arrays = [np.load(io.BytesIO(blobs.pop(f"{n}.npy")), allow_pickle=False) for n in CACHE_ARRAYS]
        classes = json.loads(blobs["classes.json"])
    except (OSError, ValueError, EOFError, TypeError) as exc:  # not .npy, truncated, pickled, bad JSON
        raise _BadCache(f"unreadable ({type(exc).__name__})") from None
    if not all(isinstance(a, np.ndarray) for a in arrays):  # an .npz archive under an .npy name
        raise _BadCache("an array file is not a single .npy array")
    data = RawData(*arrays, classes)
    _check_raw(data)
    return data


def _valid_cache(root: Path) -> bool:
    try:
        _read_cache(root)
    except _BadCache:
        return False
    return True


def _write_cache(root: Path, data: RawData) -> None:
    """Store ``data`` in ``root`` atomically: a temporary folder beside it, renamed into place, removed on any
    failure; a full or read-only disk is a :class:`DataError` naming the cache folder."""
    tmp = None
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tmp-"))
        for n in CACHE_ARRAYS:
            np.save(tmp / f"{n}.npy", getattr(data, n), allow_pickle=False)
        (tmp / "classes.json").write_text(json.dumps(data.classes))
        digests = {p.name: _file_digest(p) for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"format": 1, "sha256": digests}, indent=1))
        if root.is_dir() and _valid_cache(root):  # another process cached it meanwhile: keep that one
            return
        if root.is_dir() or root.is_symlink() or root.exists():  # an untrusted cache: moved aside, then removed
            stale = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tmp-stale-"))
            try:
                os.replace(root, stale / "old")
            except FileNotFoundError:  # another process moved it first
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:  # another process cached it first
            pass
    except OSError as exc:
        raise DataError(f"{root}: cannot write the decoded data cache ({exc.strerror or exc}); free space there "
                        "or point NERO_DEAP_CACHE at another folder") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(key: str, build, cache: Optional[str] = None) -> RawData:
    """Return the cached arrays for ``key``, building and storing them once.

    A cache that fails its checks (:func:`_read_cache`: a manifest of SHA-256s written at caching time, dtypes,
    shapes, label range) is rebuilt from the source, with a warning naming the folder.
    """
    root = cache_dir(cache) / key
    if root.exists() or root.is_symlink():
        try:
            return _read_cache(root)
        except _BadCache as exc:
            warnings.warn(f"{root}: data cache not usable ({exc}); rebuilding it from the source", stacklevel=3)
    data = build()
    _write_cache(root, data)
    return data


def image_folder(path: Path, cache: Optional[str] = None) -> RawData:
    """A directory or zip with ``train/<class>/*`` and ``test/<class>/*``, cached by content hash."""
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
