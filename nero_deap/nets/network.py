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
  input, becomes the identity.  A filter or unit count, kernel size or
  stride below 1 is raised to 1 (``filter-shape:0`` is a 1x1 conv).
* **Limits.** Before anything is allocated, :func:`plan_network` refuses
  (:class:`NetworkError`, so the search scores the candidate ``invalid``
  with the reason) more than :data:`MAX_LAYERS` layers, widths above
  :data:`MAX_WIDTH`, kernels or strides above :data:`MAX_WINDOW`, more than
  :data:`MAX_PARAMS` parameters or :data:`MAX_FLOPS` FLOPs per image, and
  values that are not numbers.  Within them the decoder never crashes.
* **Padding** ``same`` pads (asymmetrically if needed) so the output is
  ``ceil(size / stride)``, like Keras; ``valid`` pads nothing.
* **Output layer.** Its width is the dataset's class count whatever the
  grammar says; ``act:softmax`` there means "logits" (the loss applies it).
* ``batch-norm:True`` on a conv (or a hidden fc) inserts BatchNorm before its activation.
* **Dialects.** Layer types and keys are first rewritten to one vocabulary
  (:mod:`nero_deap.space.dialect`: Fast-DENSER's and EvoDENSS's names, e.g.
  ``layer:pooling pooling-type:avg`` or ``layer:pool_avg`` for ``pool-avg``);
  an unknown type or key makes the candidate invalid.

Parameter count and forward FLOPs (2 x multiply-adds of conv and fc layers)
are computed at build time.

After building, three rewrites that change no value and no gradient (the
tests check, to the bit) let the CPU engine skip memory passes:
:func:`defer_relu_past_max_pool`, :func:`fuse_relu_into_batch_norm` and
:func:`fuse_batch_norm_into_max_pool` (measured in BENCHMARKS.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..space.dialect import (LAYER_KEYS, LAYER_TYPE_ALIASES, NetworkError, canonical_layer, canonical_learning, meaning,
                             value_problem)
from ..space.phenotype import Phenotype, parse_value
from .layers import BatchNorm2d, Dropout, GlobalAvgPool, MaxPool2d, Tanh

# Limits checked before anything is allocated (see plan_network).  Generous: Fast-DENSER's own
# CIFAR-10 space tops out near 50M parameters and 100 GFLOPs; these stop hostile or absurd sizes.
MAX_LAYERS = 1000  # nodes in one network
MAX_WIDTH = 16384  # filters of a conv, units of an fc, input channels and sides, classes
MAX_WINDOW = 64  # kernel size and stride of a conv or pooling layer
MAX_PARAMS = 200_000_000  # trainable parameters (800 MB of float32)
MAX_FLOPS = 10**12  # forward FLOPs per image

LAYER_KINDS = sorted(set(LAYER_KEYS) | set(LAYER_TYPE_ALIASES))  # every layer type a grammar may name


ACTIVATIONS = {
    "linear": nn.Identity, "none": nn.Identity, "softmax": nn.Identity, "relu": nn.ReLU, "elu": nn.ELU,
    "gelu": nn.GELU, "tanh": Tanh, "sigmoid": nn.Sigmoid, "selu": nn.SELU, "silu": nn.SiLU,
    "swish": nn.SiLU, "leaky-relu": nn.LeakyReLU, "leaky_relu": nn.LeakyReLU, "lrelu": nn.LeakyReLU,
    "softplus": nn.Softplus, "mish": nn.Mish, "hardswish": nn.Hardswish, "relu6": nn.ReLU6,
}


def term_problem(key: str, value: str) -> str:
    """Why a grammar terminal ``key:value`` would make the decoder refuse every layer using it ('' if fine)."""
    if key == "layer" and value.lower() not in LAYER_KINDS:
        return f"unknown layer type {value!r} (the decoder knows: {', '.join(LAYER_KINDS)})"
    if key == "act" and value.lower() not in ACTIVATIONS:
        return f"unknown activation {value!r} (known: {', '.join(sorted(ACTIVATIONS))})"
    if key == "learning":
        try:
            canonical_learning({"learning": value})
        except NetworkError as exc:
            return str(exc)
    return value_problem(meaning(key), parse_value(value))


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


def resize(t: torch.Tensor, target: Shape) -> torch.Tensor:
    """Average-pool a feature map to the target's size; to 1 x 1 through :class:`GlobalAvgPool` (adaptive
    pooling to 1 x 1 is a ``mean`` inside, with its NCHW gradient)."""
    if (target.h, target.w) == (1, 1):
        return GlobalAvgPool.apply(t)[:, :, None, None]
    return F.adaptive_avg_pool2d(t, (target.h, target.w))


def merge(tensors: list, target: Shape) -> torch.Tensor:
    """Apply the merge rule of the module docstring to a node's inputs."""
    if target.flat:
        parts = [GlobalAvgPool.apply(t) if t.dim() == 4 else t for t in tensors]
    else:
        parts = [t if t.shape[-2:] == (target.h, target.w) else resize(t, target) for t in tensors]
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
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise NetworkError(f"layer {layer.get('layer')!r}: {key} must be a number, got {value!r}")
            return int(value)
    if default is None:
        raise NetworkError(f"layer {layer.get('layer')!r} needs one of {keys}")
    return default


def _float(layer: dict, key: str, default: float) -> float:
    value = layer.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NetworkError(f"layer {layer.get('layer')!r}: {key} must be a number, got {value!r}")
    return float(value)


def _window(layer: dict, *keys, default: int) -> int:
    """A kernel size or stride: raised to 1 if smaller (the repair rule), refused above MAX_WINDOW."""
    value = max(1, _int(layer, *keys, default=default))
    if value > MAX_WINDOW:
        raise NetworkError(f"layer {layer.get('layer')!r}: {keys[0]} {value} exceeds the limit of {MAX_WINDOW}")
    return value


def _width(layer: dict, *keys) -> int:
    """A filter or unit count: raised to 1 if smaller (the repair rule), refused above MAX_WIDTH."""
    value = max(1, _int(layer, *keys))
    if value > MAX_WIDTH:
        raise NetworkError(f"layer {layer.get('layer')!r}: {keys[0]} {value} exceeds the limit of {MAX_WIDTH}")
    return value


@dataclass
class LayerPlan:
    """One node, computed before anything is allocated: ``make()`` builds it."""

    make: Callable[[], nn.Module]
    out: Shape
    flops: int = 0
    params: int = 0


def _identity(shape: Shape) -> LayerPlan:
    return LayerPlan(nn.Identity, shape)


def _same_pad(size: int, k: int, s: int) -> tuple:
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2, out


def _spatial(shape: Shape, k: int, s: int, padding: str):
    """Padding (left, right, top, bottom) and output size for a k x k, stride-s window; None if it cannot fit."""
    if str(padding).lower() == "same":
        top, bottom, h = _same_pad(shape.h, k, s)
        left, right, w = _same_pad(shape.w, k, s)
        return (left, right, top, bottom), h, w
    if shape.h < k or shape.w < k:
        return None
    return (0, 0, 0, 0), (shape.h - k) // s + 1, (shape.w - k) // s + 1


def _pad(pads: tuple, pad_value: float) -> list:
    return [nn.ConstantPad2d(pads, pad_value)] if any(pads) else []


def _conv(layer: dict, shape: Shape) -> LayerPlan:
    if shape.flat:
        return _identity(shape)
    k = _window(layer, "filter-shape", "kernel-size", default=3)
    s = _window(layer, "stride", default=1)
    fit = _spatial(shape, k, s, layer.get("padding", "same"))
    if fit is None:
        return _identity(shape)
    pads, h, w = fit
    filters = _width(layer, "num-filters")
    use_bn, bias = bool(layer.get("batch-norm", False)), bool(layer.get("bias", True))
    act, c = layer.get("act"), shape.c
    activation(act if act is not None else "linear")  # an unknown name fails here, before allocation

    def make():
        left, right, top, bottom = pads
        if left == right and top == bottom:  # the convolution pads by itself: no padded copy of the input
            # nn.Identity keeps the padding module's place, so saved weights' keys (nodes.N.1.weight) still fit
            parts = ([nn.Identity()] if any(pads) else []) + [nn.Conv2d(c, filters, k, s, padding=(top, left),
                                                                           bias=bias)]
        else:
            parts = _pad(pads, 0.0) + [nn.Conv2d(c, filters, k, s, bias=bias)]
        if use_bn:
            parts.append(BatchNorm2d(filters))
        parts.append(activation(act if act is not None else "linear"))
        return nn.Sequential(*parts)

    params = c * filters * k * k + filters * (int(bias) + 2 * int(use_bn))
    return LayerPlan(make, Shape(filters, h, w), 2 * k * k * c * filters * h * w, params)


def _pool(layer: dict, shape: Shape, kind: str) -> LayerPlan:
    if shape.flat:
        return _identity(shape)
    k = _window(layer, "kernel-size", "filter-shape", default=2)
    s = _window(layer, "stride", default=k)
    fit = _spatial(shape, k, s, layer.get("padding", "valid"))
    if fit is None:
        return _identity(shape)
    pads, h, w = fit
    def make():
        pool = MaxPool2d(k, s) if kind == "max" else nn.AvgPool2d(k, s)
        pad = _pad(pads, float("-inf") if kind == "max" else 0.0)
        return nn.Sequential(*pad, pool) if pad else pool

    return LayerPlan(make, Shape(shape.c, h, w))


def _fc(layer: dict, shape: Shape, units: int, output: bool = False) -> LayerPlan:
    bias, use_bn, act, c = bool(layer.get("bias", True)), layer.get("batch-norm") is True and not output, \
        layer.get("act", "linear"), shape.c
    activation(act)

    def make():
        layers = [nn.Linear(c, units, bias=bias)]
        if use_bn:
            layers.append(nn.BatchNorm1d(units))
        layers.append(activation(act))
        return nn.Sequential(*layers)

    return LayerPlan(make, Shape(units), 2 * c * units, c * units + units * (int(bias) + 2 * int(use_bn)))


def _layer(layer: dict, shape: Shape, out_units) -> LayerPlan:
    """Plan one canonical layer (:func:`~nero_deap.space.dialect.canonical_layer`)."""
    kind = layer["layer"]
    if kind == "conv":
        return _conv(layer, shape)
    if kind in ("pool-max", "pool-avg"):
        return _pool(layer, shape, kind[-3:])
    if kind == "batch-norm":
        c = shape.c
        return LayerPlan((lambda: nn.BatchNorm1d(c)) if shape.flat else (lambda: BatchNorm2d(c)), shape, 0, 2 * c)
    if kind == "dropout":
        rate = min(max(_float(layer, "rate", 0.5), 0.0), 0.95)
        return LayerPlan(lambda: Dropout(rate), shape)
    if kind == "fc":
        units = out_units if out_units is not None else _width(layer, "num-units")
        return _fc(layer, Shape(shape.c), units, output=out_units is not None)
    return _identity(shape)  # identity


def _merged_shape(shapes: list, layer: dict) -> Shape:
    if layer["layer"] == "fc" or any(s.flat for s in shapes):
        return Shape(sum(s.c for s in shapes))
    return Shape(sum(s.c for s in shapes), min(s.h for s in shapes), min(s.w for s in shapes))


@dataclass
class NetworkPlan:
    """What :func:`build_network` will build, checked against the limits; nothing allocated yet."""

    layers: list  # LayerPlan per node
    inputs: list
    targets: list
    flops: int
    params: int


def plan_network(phenotype: Phenotype, num_classes: int = 10, in_shape: tuple = (3, 32, 32)) -> NetworkPlan:
    """Shapes, parameters and FLOPs of a phenotype's network, refused (:class:`NetworkError`) beyond the limits.

    Runs before any tensor is allocated, so a hostile model file or a grammar
    with absurd sizes costs nothing; the search scores such a candidate
    ``invalid`` with the reason.
    """
    if not phenotype.layers:
        raise NetworkError("phenotype has no layers")
    if len(phenotype.layers) > MAX_LAYERS:
        raise NetworkError(f"{len(phenotype.layers)} layers exceed the limit of {MAX_LAYERS}")
    if not 1 <= num_classes <= MAX_WIDTH:
        raise NetworkError(f"{num_classes} classes: must be in [1, {MAX_WIDTH}]")
    if len(in_shape) != 3 or not all(isinstance(v, int) and 1 <= v <= MAX_WIDTH for v in in_shape):
        raise NetworkError(f"input shape {tuple(in_shape)} must be 3 sizes in [1, {MAX_WIDTH}]")
    shapes = [Shape(*in_shape)]
    plans, inputs, targets, flops, params = [], [], [], 0, 0
    last = len(phenotype.layers) - 1
    for i, layer in enumerate(phenotype.layers):
        layer = canonical_layer(layer)
        ins = list(layer.get("input", [i - 1]))
        if not ins or any(isinstance(j, bool) or not isinstance(j, int) or not -1 <= j < i for j in ins):
            raise NetworkError(f"layer {i} has invalid inputs {ins}")
        target = _merged_shape([shapes[j + 1] for j in ins], layer)
        plan = _layer(layer, target, num_classes if i == last else None)
        if i == last and (layer["layer"] != "fc" or not plan.out.flat):
            # the output is always num_classes logits: a last layer of any other kind (a conv, a pooling, or a
            # dropout, batch-norm or identity after an fc, whose width is the fc's) becomes the fc head; one
            # left as it was once scored a 67-way classifier on 10 classes as "ok"
            target = Shape(target.c)
            plan = _fc(layer, target, num_classes, output=True)
        plans.append(plan)
        inputs.append(ins)
        targets.append(target)
        shapes.append(plan.out)
        flops, params = flops + plan.flops, params + plan.params
        if params > MAX_PARAMS:
            raise NetworkError(f"more than {MAX_PARAMS:,} parameters by layer {i} (the limit)")
        if flops > MAX_FLOPS:
            raise NetworkError(f"more than {MAX_FLOPS:,} FLOPs per image by layer {i} (the limit)")
    return NetworkPlan(plans, inputs, targets, int(flops), int(params))


def planned_flops(phenotype: Phenotype, in_shape: tuple = (3, 32, 32)) -> int:
    """Forward FLOPs per image of ``phenotype``'s network, 0 when it cannot be built: a cost estimate
    that allocates nothing (the search dispatches the costliest evaluations first by it)."""
    try:
        return plan_network(phenotype, 10, in_shape).flops
    except NetworkError:
        return 0


def build_network(phenotype: Phenotype, num_classes: int = 10, in_shape: tuple = (3, 32, 32),
                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> EvolvedNet:
    """Decode a phenotype; the last layer becomes the ``num_classes``-way output."""
    plan = plan_network(phenotype, num_classes, in_shape)
    nodes = [layer.make() for layer in plan.layers]
    defer_relu_past_max_pool(nodes, plan.inputs)
    fuse_relu_into_batch_norm(nodes)
    fuse_batch_norm_into_max_pool(nodes, plan.inputs, plan.targets)
    net = EvolvedNet(Normalize(mean, std), nodes, plan.inputs, plan.targets, phenotype.to_text())
    net.flops = plan.flops
    return net


def is_max_pool(node: nn.Module) -> bool:
    """A max-pooling node as :func:`_pool` builds it: ``MaxPool2d``, alone or after its padding."""
    return isinstance(node, MaxPool2d) or (isinstance(node, nn.Sequential) and isinstance(node[-1], MaxPool2d))


def defer_relu_past_max_pool(nodes: list, inputs: list) -> None:
    """Where a layer ending in ReLU feeds only a max-pooling layer, apply the ReLU after the pooling instead.

    ``relu(maxpool(x))`` equals ``maxpool(relu(x))`` in values and gradients
    (both ReLU and max are exact; where a window's maximum is positive both
    pick the same element, where it is not both gradients are zero), and the
    ReLU then runs on a quarter of the data (2 x 2 pooling).  Why: ReLU
    forward + backward was 10% of the reference network's training step, 4%
    after this; BatchNorm, ReLU and a 2 x 2 max-pool, forward + backward on
    256 x 128 x 32 x 32 bf16 channels_last, took 116-118 ms, with the ReLU
    behind the pool 97-105 ms (2-core Xeon, torch 2.14.1;
    ``bench/bench_layers.py``, BENCHMARKS.md).  The
    ReLU's place holds an ``nn.Identity`` (neither has weights: state dicts
    are unchanged) and the pool applies it (``MaxPool2d.relu``; its C kernel
    does so with no pass of its own).  Rewrites ``nodes`` in place.
    """
    for j, i in sole_readers(nodes, inputs):
        producer = nodes[i]
        if isinstance(producer, nn.Sequential) and type(producer[-1]) is nn.ReLU:
            producer[-1] = nn.Identity()
        elif is_max_pool(producer) and pool_of(producer).relu:  # a chain of pools passes it on
            pool_of(producer).relu = False
        else:
            continue
        pool_of(nodes[j]).relu = True


def sole_readers(nodes: list, inputs: list) -> list[tuple[int, int]]:
    """(j, i) for every max-pooling node j whose one input is node i, read by nothing else."""
    readers = [0] * len(nodes)
    for ins in inputs:
        for i in ins:
            if i >= 0:
                readers[i] += 1
    return [(j, ins[0]) for j, ins in enumerate(inputs)
            if len(ins) == 1 and ins[0] >= 0 and readers[ins[0]] == 1 and is_max_pool(nodes[j])]


def pool_of(node: nn.Module) -> MaxPool2d:
    """The pooling layer of a max-pooling node (see :func:`is_max_pool`)."""
    return node[-1] if isinstance(node, nn.Sequential) else node


def pooled_relus(net: nn.Module) -> int:
    """How many ReLUs :func:`defer_relu_past_max_pool` moved behind a max-pool (for tests and benchmarks)."""
    return sum(isinstance(m, MaxPool2d) and m.relu for m in net.modules())


def fuse_relu_into_batch_norm(nodes: list) -> None:
    """Where a layer ends in BatchNorm then ReLU, let the BatchNorm apply the ReLU (``BatchNorm2d.relu``).

    Why: the C kernel then applies it on the way out and recomputes its mask
    in the backward from what it reads anyway, saving the ReLU's own five
    passes over memory (two forward, three backward).  The same values and
    gradients to the bit (the tests check).  The ReLU's place holds an
    ``nn.Identity`` (state dicts are unchanged).  Rewrites ``nodes`` in place;
    run after :func:`defer_relu_past_max_pool`, which moves some of these
    ReLUs further still.
    """
    for node in nodes:
        if (isinstance(node, nn.Sequential) and len(node) >= 2 and type(node[-1]) is nn.ReLU
                and isinstance(node[-2], BatchNorm2d)):
            node[-2].relu = True
            node[-1] = nn.Identity()


def fuse_batch_norm_into_max_pool(nodes: list, inputs: list, targets: list) -> None:
    """Where a node's last layer (after any ``nn.Identity``) is BatchNorm and only an unpadded max-pool reads
    it, let the pool apply the BatchNorm (``BatchNorm2d.hand_to``) when both run in C.

    Why: BatchNorm's output and its gradient are then never written nor
    read back: five passes over memory as large as the pool's input.  See
    :class:`nero_deap.nets.layers.MaxPool2d`; the values and gradients are those
    of the two layers apart, to the bit (the tests check).  Run after the
    two ReLU rewrites (a BatchNorm that keeps its ReLU is not handed over).  ``targets`` (the plan's input
    shapes) limit the hand-over to inputs of the planned size: at another, ``merge`` resizes in between.
    """
    for j, i in sole_readers(nodes, inputs):
        if not isinstance(nodes[j], MaxPool2d):  # padded: the padding layer reads the BatchNorm's output
            continue
        layers = [m for m in (nodes[i] if isinstance(nodes[i], nn.Sequential) else [nodes[i]])
                  if type(m) is not nn.Identity]
        if layers and isinstance(layers[-1], BatchNorm2d) and not layers[-1].relu:
            layers[-1].hand_to(nodes[j], (targets[j].h, targets[j].w))


def batch_norms_in_pools(net: nn.Module) -> int:
    """How many BatchNorm layers :func:`fuse_batch_norm_into_max_pool` handed to a max-pool."""
    return sum(isinstance(m, BatchNorm2d) and m.pool is not None for m in net.modules())


def fused_relus(net: nn.Module) -> int:
    """How many ReLUs :func:`fuse_relu_into_batch_norm` gave to a BatchNorm (for tests and benchmarks)."""
    return sum(isinstance(m, BatchNorm2d) and m.relu for m in net.modules())
