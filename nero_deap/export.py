"""Exported models: weights + phenotype + normalisation, loadable without pickled code.

A ``.pt`` file holds only tensors, strings, numbers and lists, and is read
with ``torch.load(..., weights_only=True)``, which refuses anything that
could run code.  The network is rebuilt from its phenotype text.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import torch
from torch import nn

from .logbook import write_bytes_atomic
from .network import build_network
from .phenotype import Phenotype

FORMAT = "nero-deap-model/1"


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
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    return buffer.getvalue()


def save_model(model: nn.Module, path: Union[str, Path], *, num_classes: int, in_shape: tuple,
               mean: tuple, std: tuple, info: dict = None) -> Path:
    return write_bytes_atomic(path, model_bytes(model, num_classes=num_classes, in_shape=in_shape, mean=mean,
                                                std=std, info=info))


def load_model(path: Union[str, Path], map_location: str = "cpu") -> nn.Module:
    """A ready model in eval mode that takes [0,1] images (normalisation is inside)."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not a nero-deap model file")
    model = build_network(Phenotype.from_text(blob["phenotype"]), blob["num_classes"], tuple(blob["in_shape"]),
                          tuple(blob["mean"]), tuple(blob["std"]))
    model.load_state_dict(blob["state_dict"])
    model.info = blob.get("info", {})
    return model.to(map_location).eval()
