"""L-inf attacks in [0,1] pixel space: FGSM, PGD-k and AutoAttack.

Hygiene every evaluation attack follows (:func:`attack_mode`): the model is
in eval mode, its parameters are frozen during the attack, and both its
train/eval state and ``requires_grad`` flags are restored afterwards.
Attacks run in float32: reduced-precision gradients can masquerade as
robustness.  That includes TF32, which Ampere/Hopper GPUs use for float32
convolutions by default: :func:`attack_mode` switches it off for
convolutions and matmuls and restores the previous setting afterwards.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nets.network import input_memory_format
from .data import batches
from ..common.errors import ConfigError
from .threat import EPS

# TF32 switches, in torch's new API only (mixing it with ``allow_tf32`` raises on reads)
TF32_FLAGS = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)


@contextmanager
def full_float32():
    """True float32 convolutions and matmuls (no TF32) inside; the previous precision restored after."""
    saved = [flags.fp32_precision for flags in TF32_FLAGS]
    for flags in TF32_FLAGS:
        flags.fp32_precision = "ieee"
    try:
        yield
    finally:
        for flags, value in zip(TF32_FLAGS, saved):
            flags.fp32_precision = value


@contextmanager
def attack_mode(model: nn.Module):
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with full_float32():
            yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin, summed: best wrong logit minus the true one (> 0 means misclassified).

    Why not cross-entropy: its gradient vanishes on saturated or low-confidence
    models, the very ones evolution finds.  On CIFAR-10 (JPEG) models from a
    small search, cross-entropy PGD-20 left 14.8% and 5.5% accuracy where
    AutoAttack left 6% and 0%.  The margin's gradient does not
    shrink with confidence.
    """
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (wrong - true).sum()


LOSSES = {"ce": lambda logits, y: F.cross_entropy(logits.float(), y, reduction="sum"), "margin": margin_loss}


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> tuple:
    """(logits, d loss / d x) with one forward and one backward pass; ``loss`` is a key of :data:`LOSSES`."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(LOSSES[loss](logits, y), x)
    return logits.detach(), grad


def zero_gradient_share(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """The share of images whose margin-loss input gradient is exactly zero everywhere, or not finite.

    Why: FGSM, PGD and the search's masking audit all follow the input
    gradient, so a network that shatters it (rounding or quantising its input,
    a step function anywhere on the path) looks robust to every one of them
    alike: a CIFAR-10 model with ``round()`` on its input scored 0.227 under
    FGSM and 0.217 under the margin PGD-20 audit, and was not flagged, while
    AutoAttack's black-box Square left 0.02.  The margin loss (best wrong
    logit minus the true one) is used because its gradient vanishes only
    where the network is flat in its input; cross-entropy's also underflows
    to zero on confidently classified images of a healthy model (a softmax
    saturated in float32).  Cost: one forward and one backward pass per
    image, a twenty-first of margin PGD-20's.
    """
    flat = 0
    with attack_mode(model):
        for xb, yb in batches(x_u8, y, batch_size, memory_format=input_memory_format(model)):
            _, grad = input_gradient(model, xb, yb, loss="margin")
            grad = grad.flatten(1)
            flat += int(((grad == 0).all(1) | ~torch.isfinite(grad).all(1)).sum())
    return flat / max(1, len(y))


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    _, grad = input_gradient(model, x, y)
    return (x + eps * grad.sign()).clamp_(0, 1)


def clean_and_fgsm_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = EPS) -> tuple:
    """Correct counts, clean and under FGSM, sharing the clean forward pass."""
    logits, grad = input_gradient(model, x, y)
    with torch.no_grad():
        x_adv = (x + eps * grad.sign()).clamp_(0, 1)
        adv_logits = model(x_adv)
    return int((logits.argmax(1) == y).sum()), int((adv_logits.argmax(1) == y).sum())


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = EPS, alpha: float = 2 / 255,
        steps: int = 20, random_start: bool = True, generator: Optional[torch.Generator] = None,
        loss: str = "ce") -> torch.Tensor:
    """Madry et al.'s PGD: random start in the eps-ball, ``steps`` signed-gradient steps on ``loss``."""
    delta = torch.zeros_like(x)
    if random_start:
        delta = (torch.rand(x.shape, device=x.device, generator=generator) * 2 - 1) * eps
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        _, grad = input_gradient(model, x_adv, y, loss)
        x_adv = torch.min(torch.max(x_adv + alpha * grad.sign(), x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()


def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = EPS,
            alpha: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """FGSM with random start (Wong et al. 2020), step 1.25 eps: for adversarial training."""
    alpha = 1.25 * eps if alpha is None else alpha
    delta = (torch.rand(x.shape, device=x.device, generator=generator) * 2 - 1) * eps
    _, grad = input_gradient(model, (x + delta).clamp(0, 1), y)
    delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


# ---------------------------------------------------------------- evaluation
def accuracy_clean_fgsm(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, eps: float = EPS,
                        batch_size: int = 500) -> tuple:
    """(clean accuracy, FGSM accuracy) over uint8 images, as fractions."""
    clean = adv = 0
    with attack_mode(model):
        for xb, yb in batches(x_u8, y, batch_size, memory_format=input_memory_format(model)):
            c, a = clean_and_fgsm_correct(model, xb, yb, eps)
            clean, adv = clean + c, adv + a
    n = max(1, len(y))
    return clean / n, adv / n


def accuracy_pgd(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, eps: float = EPS, steps: int = 20,
                 alpha: float = 2 / 255, restarts: int = 1, batch_size: int = 500, seed: int = 0,
                 loss: str = "ce") -> float:
    """Robust accuracy under PGD; with restarts an example counts only if it survives all.

    An example already misclassified clean counts as broken whatever the
    attack does (the margin attack may otherwise walk it back)."""
    generator = torch.Generator(device=x_u8.device).manual_seed(seed)
    robust = 0
    with attack_mode(model):
        for xb, yb in batches(x_u8, y, batch_size, memory_format=input_memory_format(model)):
            with torch.no_grad():
                alive = model(xb).argmax(1) == yb
            for _ in range(restarts):
                x_adv = pgd(model, xb, yb, eps, alpha, steps, True, generator, loss)
                with torch.no_grad():
                    alive &= model(x_adv).argmax(1) == yb
            robust += int(alive.sum())
    return robust / max(1, len(y))


AUTOATTACK = ("apgd-ce", "apgd-t", "fab-t", "square")  # the standard version's attacks, in its order
# Passes per attacked image in the standard version (Linf): APGD-CE 100 steps; APGD-T 9 target classes x 100
# steps; FAB-T 9 targets x 100 steps, each about two gradients; Square 5,000 queries, forward passes only.
GRADIENT_PASSES = {"apgd-ce": 100, "apgd-t": 900, "fab-t": 1800, "square": 0}
FORWARD_PASSES = {"apgd-ce": 0, "apgd-t": 0, "fab-t": 0, "square": 5000}


def pass_seconds(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, batch: int = 32) -> tuple:
    """(seconds of one forward+backward, of one forward) per image, timed on a batch of ``x_u8`` (best of 3)."""
    import time

    x, y = next(batches(x_u8[:batch], y[:batch], batch, memory_format=input_memory_format(model)))
    timings = {"gradient": [], "forward": []}
    with attack_mode(model):
        for _ in range(3):
            for kind in timings:
                if x.is_cuda:
                    torch.cuda.synchronize(x.device)
                start = time.perf_counter()
                if kind == "gradient":
                    input_gradient(model, x, y)
                else:
                    with torch.no_grad():
                        model(x)
                if x.is_cuda:
                    torch.cuda.synchronize(x.device)
                timings[kind].append(time.perf_counter() - start)
    return min(timings["gradient"]) / len(y), min(timings["forward"]) / len(y)


def autoattack_seconds(per_image: tuple, n: int, survivors: float = 1.0, iterations: Optional[int] = None,
                       classes: int = 10) -> float:
    """Expected seconds of AutoAttack on ``n`` images: APGD-CE attacks them all, the later attacks only what
    still stands, ``survivors`` of them (1.0: every one, an upper bound; PGD-20's accuracy is a good guess,
    since APGD-CE breaks at least what PGD-20 does).  ``iterations`` and ``classes`` as for
    :func:`accuracy_autoattack` (the targeted attacks try ``classes - 1`` targets, at most 9)."""
    gradient, forward = per_image
    scale = 1.0 if iterations is None else iterations / 100  # the reduced run's steps, queries and targets
    targets = (min(9, classes - 1) if iterations is None else min(2, classes - 1)) / 9
    passes = {a: GRADIENT_PASSES[a] * scale * (targets if a in ("apgd-t", "fab-t") else 1) for a in AUTOATTACK}
    queries = FORWARD_PASSES["square"] * (1 if iterations is None else 10 * iterations / 5000)
    first = n * passes["apgd-ce"] * gradient
    rest = sum(passes[a] for a in AUTOATTACK[1:]) * gradient + queries * forward
    return first + n * survivors * rest


def accuracy_autoattack(model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, eps: float = EPS,
                        n: Optional[int] = None, seed: int = 0, batch_size: int = 500,
                        echo: Callable = lambda message: None, iterations: Optional[int] = None) -> dict:
    """Standard AutoAttack (pyautoattack) on the first ``n`` examples, one attack at a time.

    Its standard sequence, APGD-CE, APGD-T, FAB-T, then Square, each on what
    the ones before left standing: the same attacks, settings and final number
    as ``run_standard_evaluation`` with all four, but ``echo`` gets a line after
    each (on a CPU one attack can take an hour) and a progress bar shows on a
    terminal.  ``square_extra`` counts errors only the black-box Square found
    after the white-box attacks, a sign of gradient masking.  ``iterations``
    (tests and quick checks only) runs the same four attacks with that many
    iterations (Square: ten times as many queries) instead of the standard
    budgets: fast, but no longer the standard AutoAttack number.
    """
    import logging
    import time

    from pyautoattack import AutoAttack
    from tqdm import tqdm

    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    if n is not None:
        x_u8, y = x_u8[:n], y[:n]
    x = x_u8.float() / 255.0
    with attack_mode(model):
        if iterations is None:
            aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device=x.device)
        else:
            aa = AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=list(AUTOATTACK), seed=seed,
                            device=x.device)
            aa.apgd.n_iter = aa.apgd_targeted.n_iter = aa.fab.n_iter = iterations
            aa.apgd.n_restarts = aa.apgd_targeted.n_restarts = aa.fab.n_restarts = 1
            aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = 2
            aa.square.n_queries = 10 * iterations
        with torch.no_grad():
            logits = [model(xb) for xb, _ in batches(x_u8, y, batch_size, memory_format=input_memory_format(model))]
            ok = torch.cat([out.argmax(1) for out in logits]) == y
        # the targeted attacks aim at the runners-up: never more targets than wrong classes (a 5-class set
        # once failed with an IndexError inside APGD-T)
        wrong = logits[0].shape[1] - 1 if logits else 9
        if wrong < 3:
            raise ConfigError(f"AutoAttack needs at least 4 classes (its targeted DLR loss reads the 3rd and 4th "
                              f"largest logits), this data has {wrong + 1}; pass --aa-n 0 to skip it")
        aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, wrong)
        aa.fab.n_target_classes = min(aa.fab.n_target_classes, wrong)
        clean_ok, white_ok = ok.clone(), ok
        bar = tqdm(AUTOATTACK, desc="    AutoAttack", unit="attack", leave=False, disable=not sys.stderr.isatty())
        for attack in bar:
            idx = torch.nonzero(ok).flatten()
            start = time.perf_counter()
            if len(idx):
                aa.attacks_to_run = [attack]
                _, y_adv = aa.run_standard_evaluation(x[idx], y[idx], batch_size=batch_size)
                ok[idx] = y_adv == y[idx]
            if attack == "fab-t":
                white_ok = ok.clone()
            bar.set_postfix(robust=f"{int(ok.sum())}/{len(y)}")
            echo(f"      AutoAttack {attack}: {int(ok.sum())} of {len(y)} still correct "
                 f"({time.perf_counter() - start:.0f} s on {len(idx)})")
    total = max(1, len(y))
    return {"n": len(y), "clean": float(clean_ok.float().sum()) / total,
            "whitebox": float(white_ok.float().sum()) / total, "autoattack": float(ok.float().sum()) / total,
            "square_extra": int((white_ok & ~ok).sum())}
