"""Standard (and, for the final stage, adversarial) training from a learning gene.

The learning dict sets the optimiser (``learning:`` gradient-descent/sgd,
adam, adamw, rmsprop), ``lr``, ``momentum``, ``nesterov``, weight decay
(``decay``), Adam betas, RMSprop ``rho`` and ``batch_size``; other dialects'
names (EvoDENSS's ``weight_decay``, RMSprop ``alpha``, ...) are rewritten by
:mod:`nero_deap.space.dialect` first.  Fast-DENSER's
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
normalise one value per channel, which a 1x1 map gives.  A wall-clock cap
counts the work done, not the work queued, and on CUDA not the first step's
autotuning (:class:`TimeCap`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nets.network import input_memory_format
from ..space.dialect import canonical_learning
from .attacks import fgsm_rs, pgd
from .data import batches, epoch_order
from .memory import keep_freed_memory
from .threat import EPS


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
    pause_at: Optional[float] = None  # stop after this fraction of the step budget, with a snapshot to go on from
    checkpoint_seconds: float = 120.0  # with train(checkpoint=...): a snapshot to it at most this often


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


class TimeCap:
    """Whether training ran past ``max_seconds`` of charged time, measured on work done.

    On the CPU the charged time is the wall clock.  On CUDA the CPU runs ahead of
    the GPU, so an unsynchronised clock would measure the work queued, not the work
    done; a full ``synchronize`` after every step (this class's first version)
    measured it, but left the GPU idle while the CPU launched the next step's
    kernels: most of a small network's step on a fast GPU.  So :meth:`reached` waits
    only for the *previous* step's end (a CUDA event) while the step just queued
    keeps the GPU busy: the cap is read one step late and may overshoot by up to two
    steps.  And the whole first step of each ``train`` call is not charged on CUDA:
    it pays cuDNN's autotuning of every convolution shape and lazy kernel loading
    (seconds for a new architecture), which a short cap would otherwise charge to
    bigger networks.  ``charged`` carries the time a paused training was charged, so
    a continued one (``--fidelity halving``) stops where an uninterrupted one would.
    """

    def __init__(self, max_seconds: Optional[float], device: torch.device, charged: float = 0.0) -> None:
        self.max_seconds, self.device, self.before = max_seconds, device, charged
        self.origin = time.perf_counter() - charged
        self.first, self.previous = device.type == "cuda", None

    def charged(self) -> float:
        return time.perf_counter() - self.origin

    def reached(self) -> bool:
        """Call once after each step."""
        if self.max_seconds is None:
            return False
        if self.first:  # CUDA: the first step, autotuning included, is not charged
            torch.cuda.synchronize(self.device)
            self.origin, self.first = time.perf_counter() - self.before, False
        elif self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
            if self.previous is not None:
                self.previous.synchronize()
            self.previous = done
        return self.charged() > self.max_seconds


def accelerated(settings: TrainSettings, device: torch.device) -> bool:
    """Whether bf16 autocast and channels_last apply: on CUDA unless switched off."""
    return device.type == "cuda" if settings.accelerate is None else bool(settings.accelerate)


@dataclass
class TrainResult:
    epochs: float
    steps: int
    seconds: float  # since the first step, across a pause
    capped: bool
    final_loss: float
    total_steps: int = 0  # the budget in steps
    snapshot: Optional[bytes] = None  # set when training paused (TrainSettings.pause_at) before the budget

    @property
    def budget_fraction(self) -> float:
        """The share of the step budget trained (1.0 when complete or cut by the time cap)."""
        return 1.0 if self.snapshot is None else self.steps / self.total_steps


def _f(learning: dict, key: str, default: float) -> float:
    return float(learning.get(key, default))


def make_optimizer(params, learning: dict) -> torch.optim.Optimizer:
    """The optimiser a (canonicalised, :mod:`nero_deap.space.dialect`) learning dict names."""
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
    """The gene's ``batch_size``, within the data and ``cap``; at least 2 images wherever there are 2.

    A batch of one image is skipped (BatchNorm cannot normalise it: see the module docstring), so a
    ``batch_size`` of 1 or less (a grammar's range may reach it) would skip every batch and never finish.
    """
    size = int(_f(canonical_learning(learning), "batch_size", 128))
    return max(min(2, n), min(size, n, cap))


def warmup_then_decay(total_steps: int, warmup: float):
    warm = max(1, int(round(total_steps * warmup)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))
    return factor


Checkpoint = Callable[[bytes, int, int, float, float], None]  # (snapshot, step, total steps, loss, seconds)


def train(model: nn.Module, learning: dict, x_u8: torch.Tensor, y: torch.Tensor,
          settings: TrainSettings, resume: Optional[bytes] = None,
          checkpoint: Optional[Checkpoint] = None) -> TrainResult:
    """Train in place on device-resident uint8 data; raise :class:`Diverged` on NaN/inf.

    With ``settings.pause_at`` (a fraction of the step budget) training stops
    there and the result carries a :func:`snapshot`; ``train(..., resume=snapshot)``
    on a freshly built model of the same phenotype then finishes the budget
    with the same schedule and RNG streams, so on the CPU the weights equal an
    uninterrupted run's (``--fidelity halving``, tests/test_fidelity.py).

    ``checkpoint``, if given, receives such a snapshot (taken where a pause
    would stop, training going on) every ``settings.checkpoint_seconds``, and
    one more when the budget is done: a long training (``final``'s 50 epochs)
    killed near its end continues from the last one instead of starting over,
    one killed while its model is scored (AutoAttack: an hour on a CPU) is not
    trained again, and the caller can show progress.
    """
    device = x_u8.device
    cuda = device.type == "cuda"
    fast = accelerated(settings, device)
    keep_freed_memory()
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
    pause_step = total_steps if settings.pause_at is None else min(total_steps, max(1, round(settings.pause_at
                                                                                              * total_steps)))
    step, order, position, elapsed, charged, loss_value = 0, None, 0, 0.0, 0.0, float("nan")
    bad = torch.zeros((), dtype=torch.bool, device=device)
    if resume is not None:
        step, order, position, elapsed, charged, loss_value = _restore(resume, model, optimizer, scheduler,
                                                                       generator, device)
        pause_step = total_steps
    resumed_at = step
    loss = torch.full((), loss_value, device=device)
    start, capped = time.perf_counter() - elapsed, False
    last_checkpoint = time.perf_counter()
    cap = TimeCap(settings.max_seconds, device, charged)

    def state_now(seconds: float) -> bytes:  # what a pause hands back, and a checkpoint receives
        return snapshot(model, optimizer, scheduler, generator, step, order, position, seconds,
                        float(loss.detach()), cap.charged())

    model.train()
    while step < pause_step and not capped:
        if order is None:  # a new epoch: the draw batches() makes when it shuffles
            order, position = epoch_order(len(y), device, generator), 0
        for xb, yb in batches(x_u8, y, bs, augment_data=True, generator=generator, memory_format=memory_format,
                              order=order, skip=position):
            position += 1
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
            if cap.reached():  # before the pause: as an uninterrupted run
                capped = True
                break
            if step >= pause_step:
                break
            if checkpoint is not None and time.perf_counter() - last_checkpoint >= settings.checkpoint_seconds:
                if bool(bad):  # never a snapshot of broken weights
                    raise Diverged(f"non-finite loss by step {step}")
                seconds = time.perf_counter() - start
                checkpoint(state_now(seconds), step, total_steps, float(loss.detach()), seconds)
                last_checkpoint = time.perf_counter()
        else:
            order = None  # the epoch ran out
    if bool(bad):
        raise Diverged(f"non-finite loss by step {step}")
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # a last step can break them after
        raise Diverged(f"non-finite weights after step {step}")  # its finite loss; their file would be refused
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    paused = step < total_steps and not capped
    state = state_now(seconds) if paused else None
    if checkpoint is not None and step == total_steps and step > resumed_at:  # the finished weights
        checkpoint(state_now(seconds), step, total_steps, float(loss.detach()), seconds)
    return TrainResult(step / per_epoch, step, seconds, capped, float(loss.detach()), total_steps, state)


SNAPSHOT_KEYS = ("model", "optimizer", "scheduler", "generator", "cpu_rng", "cuda_rng", "step", "order", "position",
                 "seconds", "loss", "charged")


def snapshot(model: nn.Module, optimizer, scheduler, generator: torch.Generator, step: int,
             order: Optional[torch.Tensor], position: int, seconds: float, loss: float,
             charged: Optional[float] = None) -> bytes:
    """Everything a paused training needs to go on exactly: weights, optimiser and schedule state, every
    RNG stream it draws from (the batch generator and the global one dropout uses), the epoch's order and
    how far into it training got.  Plain tensors and numbers, loaded with ``weights_only=True``."""
    import io

    device = next(model.parameters(), torch.empty(0)).device
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "generator": generator.get_state(), "cpu_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None, "step": step,
             "order": None if order is None else order.cpu(), "position": position, "seconds": seconds, "loss": loss,
             "charged": seconds if charged is None else charged}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _load_snapshot(blob: bytes) -> dict:
    """A :func:`snapshot`'s content (``weights_only``: no code runs); ValueError if ``blob`` is not one
    (``charged`` may be missing: snapshots from before it)."""
    import io

    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable or unsafe content: not a snapshot
        raise ValueError("not a training snapshot") from None
    if not isinstance(state, dict) or set(state) - {"charged"} != set(SNAPSHOT_KEYS) - {"charged"}:
        raise ValueError("not a training snapshot")
    return state


def snapshot_step(blob: bytes) -> Optional[int]:
    """The step a :func:`snapshot` was taken at; None if ``blob`` is not one (damaged, or another file)."""
    try:
        step = _load_snapshot(blob)["step"]
    except ValueError:
        return None
    return step if isinstance(step, int) else None


def _restore(blob: bytes, model: nn.Module, optimizer, scheduler, generator: torch.Generator,
             device: torch.device) -> tuple:
    """Load a :func:`snapshot` into freshly made objects; returns (step, order, position, seconds, charged, loss)
    (``charged``: the seconds :class:`TimeCap` counted; snapshots without it, from before it, count all).

    The optimiser's state is loaded after the scheduler was made: making a
    scheduler resets the learning rate to its first step's, and the
    optimiser's saved state holds the rate of the step it paused at.
    """
    state = _load_snapshot(blob)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["cpu_rng"])
    if state["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    order = None if state["order"] is None else state["order"].to(device)
    return state["step"], order, state["position"], state["seconds"], state.get("charged", state["seconds"]), \
        state["loss"]
