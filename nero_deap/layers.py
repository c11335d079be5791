"""Layers the decoder builds instead of torch's own, where torch's own is slow on the CPU.

Each one computes what its torch counterpart computes (the tests check
values and gradients): to the bit, except :class:`BatchNorm2d`, whose NCHW
kernel sums in another order than the channels_last one (rounding-level
differences, so bf16 CPU trainings are not bit-identical to those of
versions before it).  Only the way they lay out memory or draw random
numbers differs, and each docstring gives the measured reason.  CUDA keeps
torch's own kernels throughout.  :mod:`nero_deap.network` decides where they go.
"""
from __future__ import annotations

import torch
from torch import nn


def dense_layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last when ``x`` is laid out so (and not also plain contiguous, as 1 x 1 maps are), else NCHW."""
    return (torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous() else torch.contiguous_format)


class GlobalAvgPool(torch.autograd.Function):
    """``x.mean(dim=(2, 3))`` whose gradient comes back in ``x``'s memory layout.

    Why: autograd's own mean (and adaptive_avg_pool2d to 1 x 1) hands back an NCHW
    gradient even for a channels_last ``x``, and every layer below it then
    runs its backward on mixed layouts.  On the CPU that is oneDNN's slow path:
    BatchNorm on a 512 x 128 x 15 x 15 bf16 batch took 280 ms instead of
    39 ms (2-core Xeon, torch 2.14.1; BENCHMARKS.md, issue #12); with :class:`Dropout` a
    searched candidate at the default budget trained in 62-83 s instead of 262 s.
    Forward values are those of ``mean``; the gradient's values too.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shape, ctx.layout = x.shape, dense_layout(x)
        return x.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        n, c, h, w = ctx.shape
        return (grad / (h * w))[:, :, None, None].expand(n, c, h, w).contiguous(memory_format=ctx.layout)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask, on the CPU, comes from 15-bit draws, two per 32-bit random number.

    Why: the CPU's random numbers come from one serial Mersenne twister, and
    ``bernoulli_`` spends about 15 ns an element on it whatever the dtype.
    Here each 32-bit draw gives two 15-bit uniforms, and an element is kept
    when its uniform is at least ``round(p * 2**15)``: dropout forward and
    backward on a 512 x 128 x 15 x 15 bf16 batch took 253 ms with
    ``nn.Dropout``, 174 ms with one float uniform per element, 84 ms with
    this (2-core Xeon, torch 2.14.1; ``bench/bench_layers.py``, BENCHMARKS.md,
    issue #12).  Dropout is in most candidates of ``grammars/cnn.grammar``,
    and its mask was 38% of one's training step.  The drop probability is
    ``p`` to within 2e-5, the scaling ``1 / (1 - p)`` in ``x``'s dtype (as
    ``nn.Dropout``); the global RNG stream is used (so paused trainings still
    continue exactly); CUDA keeps the fused native kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.is_cuda or not 0 < self.p < 1:
            return super().forward(x)
        noise = keep_mask(x, self.p).to(x.dtype).div_(1 - self.p)  # as nn.Dropout: 1 / (1 - p) in x's dtype
        return x * noise  # one multiplication forward, one backward, no bool promoted on the way


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A bool tensor shaped and laid out as ``x``, each element True with probability 1 - p (to 2e-5)."""
    n = x.numel()
    draws = torch.empty((n + 1) // 2, dtype=torch.int32, device=x.device).random_()  # 31 random bits each
    keep = (draws.view(torch.int16)[:n] & 0x7FFF) >= round(p * 2 ** 15)  # two 15-bit uniforms per draw
    if dense_layout(x) == torch.channels_last:
        return keep.as_strided(x.shape, x.stride())  # i.i.d. values: any dense layout of them will do
    return keep.view(x.shape)


class Relayout(torch.autograd.Function):
    """``x.contiguous(memory_format=layout)`` whose gradient goes back in ``x``'s own layout.

    Why: autograd's ``contiguous`` hands the gradient back in whatever layout
    it arrived in, so the layer before the change of layout would run its
    backward on mixed layouts (oneDNN's slow path, see :class:`GlobalAvgPool`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
        ctx.layout = dense_layout(x)
        return x.contiguous(memory_format=layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.contiguous(memory_format=ctx.layout), None


def channels_last_batch_norm_is_slow(channels: int) -> bool:
    """Whether the CPU's channels_last BatchNorm is slower than NCHW plus two copies, by channel count.

    ATen's channels_last kernel vectorises over channels 16 at a time; below
    48 channels that are not a multiple of 16 the rest runs scalar.  BatchNorm
    forward + backward on 256 x C x 32 x 32 bf16, channels_last against NCHW
    with a copy each way (2-core Xeon with AMX, torch 2.14.1, ms): C=3 4.4 /
    2.0, C=12 43.1 / 8.5, C=19 36.6 / 11.9, C=24 25.7 / 15.8, C=40 38.8 /
    34.7; but C=16 5.5 / 11.1, C=48 26.2 / 45.2, C=67 65.4 / 68.4
    (``bench/bench_layers.py``, BENCHMARKS.md, issue #12).
    """
    return channels % 16 != 0 and channels < 48


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, on the CPU, runs in NCHW where channels_last is slow for its channel count.

    Why: a candidate whose BatchNorm sees the raw 3-channel image trained
    20-40% slower in channels_last than in NCHW; with this it trains twice
    as fast as it did (3,427-3,732 -> 7,286-7,338 images/s, BENCHMARKS.md;
    :func:`channels_last_batch_norm_is_slow` has the per-layer numbers).  The layout changes through
    :class:`Relayout`, so the layers around it keep one layout forward and
    backward.  Same parameters and state-dict keys as ``nn.BatchNorm2d``.
    """

    def runs_in_nchw(self, x: torch.Tensor) -> bool:
        """Whether this layer changes ``x``'s layout to NCHW (CPU, channels_last, a slow channel count)."""
        return (not x.is_cuda and dense_layout(x) == torch.channels_last
                and channels_last_batch_norm_is_slow(self.num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.runs_in_nchw(x):
            return super().forward(x)
        y = super().forward(Relayout.apply(x, torch.contiguous_format))
        return Relayout.apply(y, torch.channels_last)


TANH_BLOCK = 1 << 18  # elements per float32 block: 1 MiB, resident in a core's L2 cache


def tanh_through_float32(x: torch.Tensor) -> torch.Tensor:
    """``torch.tanh(x)`` for a dense ``x``, taken in float32 a cache-sized block at a time and rounded to
    ``x``'s dtype (as torch's bf16 kernel rounds: the same values, to the bit)."""
    out = torch.empty_like(x)  # same dtype and strides: both walk their storage in the same order
    src = torch.as_strided(x, (x.numel(),), (1,), x.storage_offset())
    dst = torch.as_strided(out, (x.numel(),), (1,), out.storage_offset())
    buf = torch.empty(min(TANH_BLOCK, x.numel()), dtype=torch.float32, device=x.device)
    for i in range(0, x.numel(), TANH_BLOCK):
        block = buf[:min(TANH_BLOCK, x.numel() - i)]
        dst[i:i + TANH_BLOCK].copy_(block.copy_(src[i:i + TANH_BLOCK]).tanh_())
    return out


class _Tanh32(torch.autograd.Function):
    """:func:`tanh_through_float32` forward; backward as torch's own tanh (``tanh_backward`` on the output)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = tanh_through_float32(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        y, = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


class Tanh(nn.Tanh):
    """``nn.Tanh`` that, for bf16 on the CPU, computes in float32 (:func:`tanh_through_float32`): the same
    values, to the bit.

    Why: PyTorch's bf16 tanh kernel on the CPU is slow; float32's is about
    4x faster, and taking it a cache-sized block at a time keeps the casts
    out of memory.  Forward on 128 x 96 x 32 x 32 bf16 channels_last
    (2-core Xeon with AMX, torch 2.14.1): 13.0-15.2 ms torch's, 8.0-8.2 ms
    casting the whole tensor, 7.2-7.9 ms this (``bench/bench_layers.py``,
    BENCHMARKS.md, issue #12); tanh was 16% of a searched candidate's
    training step, and that candidate now trains 3-18% faster.  None of the
    other activations gains by float32.  The backward is ``tanh_backward``
    on the saved output, as autograd's own.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = x.is_contiguous() or dense_layout(x) == torch.channels_last
        if x.dtype != torch.bfloat16 or x.is_cuda or not dense:
            return super().forward(x)
        return _Tanh32.apply(x)
