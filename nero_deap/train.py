"""Standard (and, for the final stage, adversarial) training from a learning gene.

The learning dict sets the optimiser (``learning:`` gradient-descent/sgd,
adam, adamw, rmsprop), ``lr``, ``momentum``, ``nesterov``, weight decay
(``decay``), Adam betas, RMSprop ``rho`` and ``batch_size``; other dialects'
names (EvoDENSS's ``weight_decay``, RMSprop ``alpha``, ...) are rewritten by
:mod:`nero_deap.dialect` first.  Fast-DENSER's
``early_stop`` and ``epochs`` keys are ignored: the budget is ``epochs``
here, with an optional wall-clock cap.  The schedule is a linear warm-up
followed by linear decay to zero, per step.

Acceleration (``TrainSettings.accelerate``; ``None`` = on for CUDA only):
bf16 autocast, channels_last and cudnn.benchmark.  Off, training is
float32 and, on the CPU, deterministic under the seed.  It can be forced on
for the CPU so the accelerated code path is exercised by the test suite on
machines without a GPU.  Data stays on the training device throughout.
``cudnn.benchmark`` is a process-wide switch: it is set once, by the first
accelerated CUDA training of the process.

An epoch whose last batch would hold a single image drops that image (a
different one each epoch, as batches are shuffled): BatchNorm cannot
normalise one value per channel, which a 1x1 map gives.  With a wall-clock
cap on CUDA, the device is synchronised before each reading of the clock,
so the cap counts the work done, not the work queued.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import EPS, fgsm_rs, pgd
from .data import batches
from .dialect import canonical_learning
from .network import input_memory_format


def set_memory_format(model: nn.Module, memory_format: torch.memory_format) -> None:
    """Weights (and the inputs the model will expect) in ``memory_format``; any ``nn.Module`` works."""
    if hasattr(model, "use_memory_format"):
        model.use_memory_format(memory_format)
    else:
        model.to(memory_format=memory_format)


class Diverged(RuntimeError):
    """Training produced a NaN or infinite loss."""


@dataclass
class TrainSettings:
    epochs: float = 1.0
    max_seconds: Optional[float] = None
    warmup: float = 0.1  # fraction of steps
    seed: int = 0
    adv: Optional[str] = None  # None, "fgsm-rs" or "pgd"
    eps: float = EPS
    pgd_steps: int = 7
    pgd_alpha: float = 2 / 255
    max_batch_size: int = 4096
    accelerate: Optional[bool] = None  # bf16 autocast + channels_last (+ cudnn.benchmark); None = on CUDA


_cudnn_benchmark_set = False


def use_cudnn_benchmark() -> None:
    """Let cuDNN pick its fastest algorithms, once per process (autotuning is per shape, cached)."""
    global _cudnn_benchmark_set
    if not _cudnn_benchmark_set:
        torch.backends.cudnn.benchmark = True
        _cudnn_benchmark_set = True


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches per epoch; a last batch of one image is dropped (see the module docstring)."""
    return n // batch_size + (1 if n % batch_size > 1 or n < batch_size else 0)


def over_time_cap(start: float, max_seconds: Optional[float], device: torch.device) -> bool:
    """Whether training that began at ``start`` (perf_counter) ran past ``max_seconds``.

    On CUDA the device is synchronised first: the CPU runs ahead of the GPU, so
    an unsynchronised clock would measure the work queued, not the work done.
    """
    if max_seconds is None:
        return False
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start > max_seconds


def accelerated(settings: TrainSettings, device: torch.device) -> bool:
    """Whether bf16 autocast and channels_last apply: on CUDA unless switched off."""
    return device.type == "cuda" if settings.accelerate is None else bool(settings.accelerate)


@dataclass
class TrainResult:
    epochs: float
    steps: int
    seconds: float
    capped: bool
    final_loss: float


def _f(learning: dict, key: str, default: float) -> float:
    return float(learning.get(key, default))


def make_optimizer(params, learning: dict) -> torch.optim.Optimizer:
    """The optimiser a (canonicalised, :mod:`nero_deap.dialect`) learning dict names."""
    learning = canonical_learning(learning)
    name = learning["learning"]
    lr = _f(learning, "lr", 0.01)
    decay = _f(learning, "decay", 0.0)
    if name == "gradient-descent":
        momentum = _f(learning, "momentum", 0.9)
        nesterov = bool(learning.get("nesterov", False)) and momentum > 0
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=decay)
    if name in ("adam", "adamw"):
        betas = (min(_f(learning, "beta1", 0.9), 0.9999), min(_f(learning, "beta2", 0.999), 0.9999))
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=betas, weight_decay=decay, amsgrad=bool(learning.get("amsgrad", False)))
    return torch.optim.RMSprop(params, lr=lr, alpha=min(_f(learning, "rho", 0.9), 0.9999), weight_decay=decay,
                               momentum=_f(learning, "momentum", 0.0))


def batch_size_of(learning: dict, n: int, cap: int) -> int:
    size = int(_f(canonical_learning(learning), "batch_size", 128))
    return max(1, min(size, n, cap))


def warmup_then_decay(total_steps: int, warmup: float):
    warm = max(1, int(round(total_steps * warmup)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))
    return factor


def train(model: nn.Module, learning: dict, x_u8: torch.Tensor, y: torch.Tensor,
          settings: TrainSettings) -> TrainResult:
    """Train in place on device-resident uint8 data; raise :class:`Diverged` on NaN/inf."""
    device = x_u8.device
    cuda = device.type == "cuda"
    fast = accelerated(settings, device)
    torch.manual_seed(settings.seed)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    if fast:
        if cuda:
            use_cudnn_benchmark()
        set_memory_format(model, torch.channels_last)
    memory_format = input_memory_format(model)
    optimizer = make_optimizer(model.parameters(), learning)
    bs = batch_size_of(learning, len(y), settings.max_batch_size)
    per_epoch = steps_per_epoch(len(y), bs)
    total_steps = max(1, int(math.ceil(settings.epochs * per_epoch)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_decay(total_steps, settings.warmup))
    start, step, capped = time.perf_counter(), 0, False
    bad = torch.zeros((), dtype=torch.bool, device=device)
    loss = torch.zeros((), device=device)
    model.train()
    while step < total_steps and not capped:
        for xb, yb in batches(x_u8, y, bs, shuffle=True, augment_data=True, generator=generator,
                              memory_format=memory_format):
            if len(yb) == 1 and len(y) > 1:
                continue  # the last batch of one image (only ever the last: see steps_per_epoch)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=fast):
                if settings.adv == "fgsm-rs":  # training-time attack: bf16 is fine (Wong et al. used amp)
                    xb = fgsm_rs(model, xb, yb, settings.eps, generator=generator)
                elif settings.adv == "pgd":
                    xb = pgd(model, xb, yb, settings.eps, settings.pgd_alpha, settings.pgd_steps, True, generator)
                loss = F.cross_entropy(model(xb).float(), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            bad |= ~torch.isfinite(loss.detach())
            if (not cuda or step % 25 == 0) and bool(bad):
                raise Diverged(f"non-finite loss at step {step}")
            if step >= total_steps:
                break
            if over_time_cap(start, settings.max_seconds, device):
                capped = True
                break
    if bool(bad):
        raise Diverged(f"non-finite loss by step {step}")
    if cuda:
        torch.cuda.synchronize(device)
    return TrainResult(step / per_epoch, step, time.perf_counter() - start, capped, float(loss.detach()))
