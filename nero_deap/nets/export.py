"""Exported models: weights + phenotype + normalisation, loadable without pickled code.

A ``.pt`` file holds only tensors, strings, numbers and lists, and is read
with ``torch.load(..., weights_only=True)``, which refuses anything that
could run code.  The network is rebuilt from its phenotype text, after
:func:`~nero_deap.nets.network.plan_network` has checked it against the decoder's
limits: a small file cannot make the loader allocate gigabytes.  Every way a
file can be wrong is a :class:`ModelFileError` naming the file.

Each file also records the SHA-256 of its content (``sha256``: phenotype,
shapes, normalisation and every tensor's bytes), checked on load: a model
file with one flipped byte in its weights once loaded without a word and
``final`` scored it.  Files written before the hash load as they are.
"""
from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path
from typing import Union

import torch
from torch import nn

from ..common.files import write_bytes_atomic
from ..space.phenotype import Phenotype
from .network import NetworkError, build_network

FORMAT = "nero-deap-model/1"


class ModelFileError(ValueError):
    """Not a loadable nero-deap model file; the message names the file and why."""


def model_bytes(model: nn.Module, *, num_classes: int, in_shape: tuple, mean: tuple, std: tuple,
                info: dict = None) -> bytes:
    """The model file's content, in memory: what a worker sends back to be saved."""
    blob = {
        "format": FORMAT,
        "phenotype": model.phenotype_text,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "num_classes": int(num_classes),
        "in_shape": [int(s) for s in in_shape],
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "info": {str(k): v for k, v in (info or {}).items() if isinstance(v, (str, int, float, bool))},
    }
    blob["sha256"] = content_digest(blob)
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    return buffer.getvalue()


def content_digest(blob: dict) -> str:
    """SHA-256 of what a model file means: its phenotype, shapes, normalisation and each tensor's name, dtype,
    shape and bytes, in name order."""
    h = hashlib.sha256()
    for key in ("phenotype", "num_classes", "in_shape", "mean", "std"):
        h.update(f"{key}={blob.get(key)!r}\n".encode())
    state = blob.get("state_dict")
    for name in sorted(state) if isinstance(state, dict) else ():
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            h.update(f"{name}: not a tensor\n".encode())
            continue
        h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_model(model: nn.Module, path: Union[str, Path], *, num_classes: int, in_shape: tuple,
               mean: tuple, std: tuple, info: dict = None) -> Path:
    return write_bytes_atomic(path, model_bytes(model, num_classes=num_classes, in_shape=in_shape, mean=mean,
                                                std=std, info=info))


def load_model(path: Union[str, Path, bytes], map_location: str = "cpu") -> nn.Module:
    """A ready model in eval mode that takes [0,1] images (normalisation is inside).

    ``path`` may also be the file's content (bytes), as workers send it back."""
    source = io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else path
    if isinstance(path, (bytes, bytearray)):
        path = "<model bytes>"
    try:
        blob = torch.load(source, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read model file: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - unpickling errors of any kind: not our file, or not safe
        raise ModelFileError(f"{path}: not a nero-deap model file ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a nero-deap model file")
    if "sha256" in blob and blob["sha256"] != content_digest(blob):
        raise ModelFileError(f"{path}: damaged model file: its content does not match the SHA-256 recorded when "
                             f"it was written")
    try:
        phenotype = Phenotype.from_text(_field(blob, "phenotype", str))
        num_classes = _field(blob, "num_classes", int)
        in_shape = tuple(_field(blob, "in_shape", list))
        mean, std = tuple(_field(blob, "mean", list)), tuple(_field(blob, "std", list))
        if not (len(mean) == len(std) == (in_shape[0] if in_shape else -1)):
            raise ValueError("mean and std need one value per input channel")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in mean + std) or min(std) <= 0:
            raise ValueError(f"mean {list(mean)} and std {list(std)} must be finite numbers, std > 0")
        state = _field(blob, "state_dict", dict)
        model = build_network(phenotype, num_classes, in_shape, mean, std)  # checks limits before allocating
        model.load_state_dict(state)
        check_loaded(model, mean, std)
    except (ValueError, TypeError, RuntimeError) as exc:  # NetworkError is a ValueError
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        kind = "the decoder refuses its network" if isinstance(exc, NetworkError) else "corrupt model file"
        raise ModelFileError(f"{path}: {kind}: {why}"[:400]) from None
    info = blob.get("info", {})
    model.info = info if isinstance(info, dict) else {}
    return model.to(map_location).eval()


def check_loaded(model: nn.Module, mean: tuple, std: tuple) -> None:
    """ValueError unless every weight and buffer is finite and the normalisation inside the model is the one
    the file declares: a NaN weight or a zero std once loaded silently and scored chance in ``final``."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} holds non-finite values")
    norm = model.normalize
    if not (torch.allclose(norm.mean.flatten(), norm.mean.new_tensor(mean))
            and torch.allclose(norm.std.flatten(), norm.std.new_tensor(std))):
        raise ValueError("normalize.mean/std in the weights differ from the file's mean and std")


def _field(blob: dict, key: str, kind: type):
    value = blob.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"field {key!r} is missing or not a {kind.__name__}")
    return value
