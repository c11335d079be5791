"""Phenotype -> ``torch.nn.Module``.

Rules the decoder applies (documented because they shape the search space):

* **Normalisation first.** The model's first operation is ``(x - mean) / std``
  with the dataset's constants, so models (and every attack) take [0,1] pixels.
* **Merging several inputs** (skip connections): every input is brought to
  the smallest spatial size among them by adaptive average pooling, then
  they are concatenated along channels.  If the layer is an ``fc`` (or any
  input is already flat) all inputs are globally average-pooled and
  concatenated as vectors.
* **Flattening.** The first ``fc`` sees globally average-pooled features
  (not a raw flatten: that keeps parameter counts sane on 32x32 inputs).
* **Repair.** A conv or pooling layer that would shrink the map below 1x1
  (``valid`` padding, kernel larger than the map), or that meets a flat
  input, becomes the identity.  It never crashes.
* **Padding** ``same`` pads (asymmetrically if needed) so the output is
  ``ceil(size / stride)``, like Keras; ``valid`` pads nothing.
* **Output layer.** Its width is the dataset's class count whatever the
  grammar says; ``act:softmax`` there means "logits" (the loss applies it).
* ``batch-norm:True`` on a conv (or a hidden fc) inserts BatchNorm before its activation.
* **Dialects.** Layer types and keys are first rewritten to one vocabulary
  (:mod:`nero_deap.dialect`: Fast-DENSER's and EvoDENSS's names, e.g.
  ``layer:pooling pooling-type:avg`` or ``layer:pool_avg`` for ``pool-avg``);
  an unknown type or key makes the candidate invalid.

Parameter count and forward FLOPs (2 x multiply-adds of conv and fc layers)
are computed at build time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dialect import NetworkError, canonical_layer
from .phenotype import Phenotype


ACTIVATIONS = {
    "linear": nn.Identity, "none": nn.Identity, "softmax": nn.Identity, "relu": nn.ReLU, "elu": nn.ELU,
    "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "selu": nn.SELU, "silu": nn.SiLU,
    "swish": nn.SiLU, "leaky-relu": nn.LeakyReLU, "leaky_relu": nn.LeakyReLU, "lrelu": nn.LeakyReLU,
    "softplus": nn.Softplus, "mish": nn.Mish, "hardswish": nn.Hardswish, "relu6": nn.ReLU6,
}


def activation(name) -> nn.Module:
    key = str(name).lower()
    if key not in ACTIVATIONS:
        raise NetworkError(f"unknown activation {name!r} (known: {', '.join(sorted(ACTIVATIONS))})")
    return ACTIVATIONS[key]()


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


@dataclass
class Shape:
    """Build-time shape: (c, h, w) for feature maps, (c,) once flat."""

    c: int
    h: int = 0
    w: int = 0

    @property
    def flat(self) -> bool:
        return self.h == 0


def merge(tensors: list, target: Shape) -> torch.Tensor:
    """Apply the merge rule of the module docstring to a node's inputs."""
    if target.flat:
        parts = [t.mean(dim=(2, 3)) if t.dim() == 4 else t for t in tensors]
    else:
        parts = [t if t.shape[-2:] == (target.h, target.w) else F.adaptive_avg_pool2d(t, (target.h, target.w))
                 for t in tensors]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class EvolvedNet(nn.Module):
    """A DAG of layers; node i reads the outputs listed in ``inputs[i]`` (-1 = normalised image)."""

    def __init__(self, normalize: Normalize, nodes: list, inputs: list, targets: list, phenotype_text: str):
        super().__init__()
        self.normalize = normalize
        self.nodes = nn.ModuleList(nodes)
        self.inputs = inputs
        self.targets = targets
        self.phenotype_text = phenotype_text
        self.params = sum(p.numel() for p in self.parameters())
        self.flops = 0
        self.memory_format = torch.contiguous_format  # the layout of its conv weights; see use_memory_format

    def use_memory_format(self, memory_format: torch.memory_format) -> "EvolvedNet":
        """Lay the weights out in ``memory_format`` (channels_last for bf16 speed) and expect inputs so."""
        self.to(memory_format=memory_format)
        self.memory_format = memory_format
        return self

    def forward(self, x):
        # Inputs in another layout than the weights crash oneDNN's CPU convolution (see data.batches);
        # a no-op when the caller already feeds this layout, as every batch from data.batches does.
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        outs = [self.normalize(x)]
        for node, ins, target in zip(self.nodes, self.inputs, self.targets):
            outs.append(node(merge([outs[i + 1] for i in ins], target)))
        return outs[-1]


def input_memory_format(model: nn.Module) -> torch.memory_format:
    """The layout a model wants its image batches in (contiguous NCHW for any other module)."""
    return getattr(model, "memory_format", torch.contiguous_format)


def _int(layer: dict, *keys, default=None) -> int:
    for key in keys:
        if key in layer:
            value = layer[key]
            value = value[0] if isinstance(value, list) else value
            return int(value)
    if default is None:
        raise NetworkError(f"layer {layer.get('layer')!r} needs one of {keys}")
    return default


def _same_pad(size: int, k: int, s: int) -> tuple:
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2, out


def _spatial(shape: Shape, k: int, s: int, padding: str, pad_value: float):
    """Padding module and output size for a k x k, stride-s window; None if it cannot fit."""
    if str(padding).lower() == "same":
        top, bottom, h = _same_pad(shape.h, k, s)
        left, right, w = _same_pad(shape.w, k, s)
        pad = nn.ConstantPad2d((left, right, top, bottom), pad_value) if top + bottom + left + right else None
        return pad, h, w
    if shape.h < k or shape.w < k:
        return None
    return None, (shape.h - k) // s + 1, (shape.w - k) // s + 1


def _conv(layer: dict, shape: Shape):
    if shape.flat:
        return nn.Identity(), shape, 0
    k = _int(layer, "filter-shape", "kernel-size", default=3)
    s = max(1, _int(layer, "stride", default=1))
    fit = _spatial(shape, k, s, layer.get("padding", "same"), 0.0)
    if fit is None:
        return nn.Identity(), shape, 0
    pad, h, w = fit
    filters = max(1, _int(layer, "num-filters"))
    use_bn = bool(layer.get("batch-norm", False))
    parts = [pad] if pad is not None else []
    parts.append(nn.Conv2d(shape.c, filters, k, s, bias=bool(layer.get("bias", True))))
    if use_bn:
        parts.append(nn.BatchNorm2d(filters))
    parts.append(activation(layer.get("act", "linear")))
    flops = 2 * k * k * shape.c * filters * h * w
    return nn.Sequential(*parts), Shape(filters, h, w), flops


def _pool(layer: dict, shape: Shape, kind: str):
    if shape.flat:
        return nn.Identity(), shape, 0
    k = max(1, _int(layer, "kernel-size", "filter-shape", default=2))
    s = max(1, _int(layer, "stride", default=k))
    fit = _spatial(shape, k, s, layer.get("padding", "valid"), float("-inf") if kind == "max" else 0.0)
    if fit is None:
        return nn.Identity(), shape, 0
    pad, h, w = fit
    pool = nn.MaxPool2d(k, s) if kind == "max" else nn.AvgPool2d(k, s)
    return (nn.Sequential(pad, pool) if pad is not None else pool), Shape(shape.c, h, w), 0


def _fc(layer: dict, shape: Shape, units: int, output: bool = False):
    layers = [nn.Linear(shape.c, units, bias=bool(layer.get("bias", True)))]
    if layer.get("batch-norm") is True and not output:
        layers.append(nn.BatchNorm1d(units))
    layers.append(activation(layer.get("act", "linear")))
    return nn.Sequential(*layers), Shape(units), 2 * shape.c * units


def _layer(layer: dict, shape: Shape, out_units):
    """Build one canonical layer (:func:`~nero_deap.dialect.canonical_layer`)."""
    kind = layer["layer"]
    if kind == "conv":
        return _conv(layer, shape)
    if kind in ("pool-max", "pool-avg"):
        return _pool(layer, shape, kind[-3:])
    if kind == "batch-norm":
        return (nn.BatchNorm1d(shape.c) if shape.flat else nn.BatchNorm2d(shape.c)), shape, 0
    if kind == "dropout":
        rate = float(layer.get("rate", 0.5))
        return nn.Dropout(min(max(rate, 0.0), 0.95)), shape, 0
    if kind == "fc":
        units = out_units if out_units is not None else max(1, _int(layer, "num-units"))
        return _fc(layer, Shape(shape.c), units, output=out_units is not None)
    return nn.Identity(), shape, 0  # identity


def _merged_shape(shapes: list, layer: dict) -> Shape:
    if layer["layer"] == "fc" or any(s.flat for s in shapes):
        return Shape(sum(s.c for s in shapes))
    return Shape(sum(s.c for s in shapes), min(s.h for s in shapes), min(s.w for s in shapes))


def build_network(phenotype: Phenotype, num_classes: int = 10, in_shape: tuple = (3, 32, 32),
                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> EvolvedNet:
    """Decode a phenotype; the last layer becomes the ``num_classes``-way output."""
    if not phenotype.layers:
        raise NetworkError("phenotype has no layers")
    shapes = [Shape(*in_shape)]
    nodes, inputs, targets, flops = [], [], [], 0
    last = len(phenotype.layers) - 1
    for i, layer in enumerate(phenotype.layers):
        layer = canonical_layer(layer)
        ins = list(layer.get("input", [i - 1]))
        if not ins or any(not -1 <= j < i for j in ins):
            raise NetworkError(f"layer {i} has invalid inputs {ins}")
        target = _merged_shape([shapes[j + 1] for j in ins], layer)
        node, out, node_flops = _layer(layer, target, num_classes if i == last else None)
        if i == last and not out.flat:  # output must be logits: force an fc head
            node, out, node_flops = _fc(layer, Shape(target.c), num_classes, output=True)
            target = Shape(target.c)
        nodes.append(node)
        inputs.append(ins)
        targets.append(target)
        shapes.append(out)
        flops += node_flops
    net = EvolvedNet(Normalize(mean, std), nodes, inputs, targets, phenotype.to_text())
    net.flops = int(flops)
    return net
