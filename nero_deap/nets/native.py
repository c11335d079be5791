"""The package's own C kernels (``kernels/cpu_kernels.c``): compiled once per machine, loaded through ctypes.

Why: what keeps the CPU engine from its convolution limit is memory passes
outside the convolutions, BatchNorm first among them (26% of the reference
network's bf16 step, BENCHMARKS.md).  ATen's bf16 channels_last
BatchNorm takes about 30 ms forward + backward on 256 x 128 x 32 x 32 where
the eight passes over memory it needs take about 20; and 21 ms instead of 4
on 24 channels.  No maintained library offers a faster one for torch on the
CPU, so the kernel is ours: plain C over raw pointers, no Python API, no
torch headers, so compiling takes about a second.

The library is built with the machine's C compiler (``$CC``, else ``cc``,
else ``gcc``) for the machine's own CPU (``-march=native``) into a private
cache folder, ``kernels/`` in ``$XDG_CACHE_HOME/nero-deap`` (default
``~/.cache/nero-deap/kernels``), under a name hashing the source, the flags,
the compiler and the CPU's feature flags: hosts of a SCOOP run that share a
home folder each get their own build, and a stale one is never loaded.  A
build is flushed to disk before it is renamed into place, and its size and
SHA-256 are recorded beside it (``<name>.sha256``) and checked before every
load: ``ctypes`` maps a library before any Python check can run, so a
truncated file (a crash or full disk during a build) once killed every bf16
CPU run with SIGBUS until the cache was deleted by hand.  A library that
fails the check is rebuilt; temporary files of a killed build are removed.  Where no compiler works, or
``NERO_DEAP_NATIVE=0`` is set, :func:`library` returns None and the layers
fall back to torch's own kernels (:func:`status` says why).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from ..common.cache import user_cache
from ..common.files import write_bytes_atomic

SOURCE = Path(__file__).with_name("kernels") / "cpu_kernels.c"
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC") + (
    # 512-bit vectors where the CPU has them: max-pooling forward 7.0 -> 4.0 ms, BatchNorm backward 15.9 -> 13.5 ms
    # on 256 x 128 x 32 x 32 (gcc 12 picks 256-bit ones by default on this Xeon; BENCHMARKS.md)
    ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ())
DISABLE = "NERO_DEAP_NATIVE"  # "0": never build or load the kernels
_why_not: dict[str, str] = {}

_P = ctypes.c_void_p
_I64, _INT = ctypes.c_int64, ctypes.c_int
_SIGNATURES = {  # name: (argument types, result type), as in cpu_kernels.c; every kernel returns 0, or -1
    "batch_statistics": ((_P, _I64, _I64, ctypes.c_double, _P, _P, _P, _INT), _INT),
    "batch_norm_forward": ((_P, _I64, _I64, _P, _P, ctypes.c_double, _INT, _P, _P, _P, _P, _INT), _INT),
    "batch_norm_backward": ((_P, _P, _I64, _I64, _P, _P, _P, _P, _INT, _P, _P, _P, _INT), _INT),
    "max_pool_forward": ((_P, _I64, _I64, _I64, _I64, _INT, _INT, _INT, _INT, _I64, _I64, _INT, _P, _P, _INT),
                         _INT),
    "max_pool_backward": ((_P, _P, _I64, _I64, _I64, _I64, _INT, _INT, _INT, _INT, _I64, _I64, _P, _INT), _INT),
    "batch_norm_max_pool_forward": ((_P, _I64, _I64, _I64, _I64, _INT, _INT, _P, _P, _P, _P, _INT, _P, _P, _INT),
                                    _INT),
    "batch_norm_max_pool_backward": ((_P, _P, _P, _I64, _I64, _I64, _I64, _INT, _INT, _P, _P, _P, _P, _P, _P, _P,
                                      _INT), _INT),
}


def call(name: str, *args) -> None:
    """Run kernel ``name`` of :func:`library` with ``args`` (tensors as ``data_ptr()``, None as NULL); its
    threads are torch's (``torch.get_num_threads()``, appended).  Raises MemoryError if it ran out."""
    if getattr(library(), name)(*args, torch.get_num_threads()):
        raise MemoryError(f"{name}: out of memory")


def cache_dir() -> Path:
    """Where built libraries go: ``kernels/`` in nero-deap's cache folder (``~/.cache/nero-deap/kernels``)."""
    return user_cache() / "kernels"


def compiler() -> str | None:
    """The C compiler to use: ``$CC``, else ``cc``, else ``gcc`` on the PATH; None if there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def compiler_command(cc: str) -> list[str]:
    """``cc`` as a command line: ``$CC`` may hold arguments (``gcc -m64``); a path found on the PATH is one word."""
    return shlex.split(cc) if cc == os.environ.get("CC") else [cc]


def cpu_identity() -> str:
    """The machine's architecture and CPU feature flags (what ``-march=native`` compiles for)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {flags.strip()}"


def library_path(cc: str) -> Path:
    """The cached library's path for compiler ``cc``: its name hashes everything the build depends on."""
    version = subprocess.run([*compiler_command(cc), "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), cc, version, cpu_identity()]).encode())
    return cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def private_folder(path: Path) -> None:
    """Create ``path`` (mode 0700); refuse one that another user, or anyone but its owner, may write in.

    Why: a shared library is code; one that someone else could replace must not be loaded."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{path} is writable by others; not loading code from it")


STALE_TEMP_S = 3600  # a build's temporary file older than this was left by a killed build


def manifest_path(target: Path) -> Path:
    """``<library>.sha256``: the size and SHA-256 the build recorded."""
    return target.with_name(target.name + ".sha256")


def fingerprint(path: Path) -> str:
    """``<size> <sha256>`` of the file at ``path``."""
    data = Path(path).read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def verified(target: Path) -> bool:
    """Whether ``target`` is exactly the library its build recorded (size, then content hash), so that loading
    it cannot fault on a truncated or damaged file."""
    try:
        recorded = manifest_path(target).read_text().split()
        if len(recorded) != 2 or target.stat().st_size != int(recorded[0]):
            return False
        return fingerprint(target) == " ".join(recorded)
    except (OSError, ValueError):
        return False


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temporary files of builds killed long ago (a build under way elsewhere is younger)."""
    now = time.time()
    for path in folder.glob("*.tmp"):
        try:
            if now - path.stat().st_mtime > STALE_TEMP_S:
                path.unlink()
        except OSError:
            pass


def build(cc: str, target: Path) -> None:
    """Compile ``SOURCE`` into ``target`` atomically (workers of one host may build at the same time), in a
    folder :func:`private_folder` has checked, and record its size and hash (:func:`verified`)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([*compiler_command(cc), *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True,
                              text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        write_bytes_atomic(manifest_path(target), fingerprint(Path(tmp)).encode())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The kernels, built if needed and loaded once per process; None (see :func:`status`) where unavailable."""
    if os.environ.get(DISABLE, "1") == "0":
        _why_not["reason"] = f"disabled by {DISABLE}=0"
        return None
    cc = compiler()
    if cc is None:
        _why_not["reason"] = "no C compiler (set CC, or install gcc)"
        return None
    try:
        path = library_path(cc)
        private_folder(path.parent)
        remove_stale_temp_files(path.parent)
        if not verified(path):  # missing, truncated, damaged, or built before sizes and hashes were recorded
            build(cc, path)
            if not verified(path):
                raise RuntimeError(f"{path}: the fresh build does not match its recorded hash")
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # a cached build this machine cannot load (a shared home, another glibc): build afresh
            build(cc, path)
            lib = ctypes.CDLL(str(path))
        for name, (args, result) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, result
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, torch's kernels still work: fall back
        _why_not["reason"] = f"could not build or load the kernels: {exc}"
        return None
    return lib


def status() -> str:
    """One line for logs and benchmarks: where the kernels were loaded from, or why they were not."""
    lib = library()
    return f"native kernels: {lib._name}" if lib is not None else f"native kernels off: {_why_not['reason']}"
