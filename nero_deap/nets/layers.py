"""Layers the decoder builds instead of torch's own, where torch's own is slow on the CPU.

Each one computes what its torch counterpart computes (the tests check
values and gradients): to the bit, except :class:`BatchNorm2d`, whose C
kernel (and NCHW path, where the kernel is unavailable) sums in another
order than torch's channels_last one (rounding-level differences, so bf16
CPU trainings are not bit-identical to those of versions before it).  Only
the way they lay out memory or draw random numbers differs, and each
docstring gives the measured reason.  CUDA keeps
torch's own kernels throughout.  :mod:`nero_deap.nets.network` decides where they go.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import native


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
    39 ms (2-core Xeon, torch 2.14.1; BENCHMARKS.md); with :class:`Dropout` a
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
    this (2-core Xeon, torch 2.14.1; ``bench/bench_layers.py``,
    BENCHMARKS.md).  Dropout is in most candidates of ``grammars/cnn.grammar``,
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
    (``bench/bench_layers.py``, BENCHMARKS.md).
    """
    return channels % 16 != 0 and channels < 48


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d``, optionally with the ReLU after it (``relu``), that, training in bf16 channels_last on
    the CPU, runs the package's C kernel.

    Why: BatchNorm was 26% of the reference network's bf16 training step on
    the CPU, ReLU another 5%.  The kernel (:func:`native_batch_norm`) makes the
    eight passes over memory BatchNorm needs and nothing else, the ReLU
    included (its mask is recomputed from the input in the backward):
    BatchNorm forward + backward on a 256 x 128 x 32 x 32 batch 30 -> 20 ms,
    on 256 x 24 x 32 x 32 21 -> 4 ms, on channel counts that are not
    multiples of 16 about 3x faster (2-core Xeon with AMX, torch 2.14.1,
    BENCHMARKS.md).  Where the kernel is not available
    (:func:`nero_deap.nets.native.status`), torch's own runs, in NCHW where
    channels_last is slow for the channel count: a candidate whose BatchNorm
    sees the raw 3-channel image trained 20-40% slower in channels_last than
    in NCHW, and with the change of layout twice as fast as it did
    (3,427-3,732 -> 7,286-7,338 images/s).  The layout changes through
    :class:`Relayout`, so the layers around it keep one layout forward and
    backward.  Same parameters, state-dict keys and running statistics as
    ``nn.BatchNorm2d``; evaluation (running statistics) always runs torch's
    kernel.
    """

    relu = False  # apply a ReLU to the output (network.fuse_relu_into_batch_norm sets it)
    pool = None  # the MaxPool2d that applies this layer for it (network.fuse_batch_norm_into_max_pool sets it)
    pool_input_size = None  # (h, w) the network's plan gives the pool's input: it hands over only at that size

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "") + (", in its max-pool" if self.pool else "")

    def hand_to(self, pool: "MaxPool2d", input_size: tuple[int, int] | None = None) -> None:
        """Let ``pool``, the only reader of this layer's output, apply this layer where both run in C, on inputs
        of ``input_size`` (h, w) when given (at another size the network resizes between the two).

        Plain references, not submodules: parameters and state-dict keys stay where they are."""
        self.__dict__["pool"], pool.__dict__["batch_norm"] = pool, self
        self.__dict__["pool_input_size"] = input_size

    def runs_in_nchw(self, x: torch.Tensor) -> bool:
        """Whether this layer changes ``x``'s layout to NCHW (CPU, channels_last, a slow channel count)."""
        return (not x.is_cuda and dense_layout(x) == torch.channels_last
                and channels_last_batch_norm_is_slow(self.num_features))

    def runs_native(self, x: torch.Tensor) -> bool:
        """Whether this call runs the C kernel: batch statistics on a bf16 channels_last CPU tensor."""
        uses_batch_stats = self.training or self.running_mean is None
        return (uses_batch_stats and runs_native(x) and x.numel() > x.shape[1])

    def hands_over(self, x: torch.Tensor) -> bool:
        """Whether this call leaves the normalising to :attr:`pool` (see :meth:`hand_over`)."""
        return (self.pool is not None and not self.relu and self.pool.tiles(x)
                and self.pool_input_size in (None, tuple(x.shape[-2:])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.__dict__.pop("pending", None)  # one left by a forward that failed before its pool ran
        if self.runs_native(x):
            if self.hands_over(x):
                return self.hand_over(x)
            return self.native_forward(x)
        if not self.runs_in_nchw(x):
            y = super().forward(x)
        else:
            y = Relayout.apply(super().forward(Relayout.apply(x, torch.contiguous_format)), torch.channels_last)
        return torch.relu(y) if self.relu else y

    def native_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training forward through :func:`native_batch_norm`, updating the running statistics as torch does."""
        y, mean, var = native_batch_norm(x, self.weight, self.bias, self.eps, self.relu)
        self.track(mean, var)
        return y

    def hand_over(self, x: torch.Tensor) -> torch.Tensor:
        """Only the batch statistics (and the running ones); ``x`` goes on unnormalised to :attr:`pool`, which
        normalises it as it pools (:class:`_NativeBatchNormMaxPool`)."""
        mean, invstd, var = (torch.empty(self.num_features) for _ in range(3))
        native.call("batch_statistics", x.data_ptr(), x.numel() // x.shape[1], x.shape[1], self.eps,
                    mean.data_ptr(), invstd.data_ptr(), var.data_ptr())
        self.track(mean, var)
        self.__dict__["pending"] = (x, mean, invstd)
        return x

    def track(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Update the running statistics from a batch's mean and unbiased variance, as ``nn.BatchNorm2d``."""
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(var.to(self.running_var.dtype), factor)


def runs_native(x: torch.Tensor) -> bool:
    """Whether ``x`` is what the C kernels take (a 4-D bf16 channels_last CPU tensor) and they are available."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last) and native.library() is not None)


def native_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                      relu: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm (then ReLU, with ``relu``) of a bf16 channels_last CPU tensor by the C kernel,
    differentiable in ``x``, ``weight`` and ``bias``.  Returns the output and the batch's mean and unbiased
    variance (float32)."""
    return _NativeBatchNorm.apply(x, weight, bias, eps, relu)


def _float_parameters(ctx, weight: torch.Tensor | None, bias: torch.Tensor | None) -> tuple:
    """``weight`` and ``bias`` as the C kernels take them (float32, contiguous; None stays None); their own
    dtypes noted on ``ctx`` for :func:`_parameter_grads`."""
    ctx.param_dtypes = tuple(None if t is None else t.dtype for t in (weight, bias))
    return tuple(None if t is None else t.detach().float().contiguous() for t in (weight, bias))


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _channels_last_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def _parameter_grads(ctx, dweight: torch.Tensor, dbias: torch.Tensor, weight_at: int) -> tuple:
    """The weight's and bias's gradients as autograd wants them: in their dtypes, None where not needed."""
    weight_dtype, bias_dtype = ctx.param_dtypes
    return (dweight.to(weight_dtype) if ctx.needs_input_grad[weight_at] else None,
            dbias.to(bias_dtype) if ctx.needs_input_grad[weight_at + 1] else None)


class _NativeBatchNorm(torch.autograd.Function):
    """Forward and backward of :func:`native_batch_norm` (``batch_norm_forward`` / ``_backward`` in C)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, relu):
        channels = x.shape[1]
        w, b = _float_parameters(ctx, weight, bias)
        y = torch.empty_like(x)
        mean, invstd, var = (torch.empty(channels) for _ in range(3))
        native.call("batch_norm_forward", x.data_ptr(), x.numel() // channels, channels, _address(w), _address(b),
                    eps, int(relu), y.data_ptr(), mean.data_ptr(), invstd.data_ptr(), var.data_ptr())
        ctx.save_for_backward(x, w, b, mean, invstd)
        ctx.relu = relu
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _mean, _var):
        x, w, b, mean, invstd = ctx.saved_tensors
        dy, channels = _channels_last_bf16(dy), x.shape[1]
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dweight, dbias = torch.empty(channels), torch.empty(channels)
        native.call("batch_norm_backward", dy.data_ptr(), x.data_ptr(), x.numel() // channels, channels,
                    _address(w), _address(b), mean.data_ptr(), invstd.data_ptr(), int(ctx.relu), _address(dx),
                    dweight.data_ptr(), dbias.data_ptr())
        return (dx, *_parameter_grads(ctx, dweight, dbias, 1), None, None)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d``, optionally with a ReLU after it (``relu``) or the BatchNorm before it, that in bf16
    channels_last on the CPU runs the package's C kernel.

    Why: max-pooling and the ReLU behind it (network.defer_relu_past_max_pool)
    were 16% and 3% of the reference network's bf16 training step on the
    CPU.  torch's kernel writes an int64 index per output (four times the
    output's own bytes), zero-fills the whole input gradient and scatters into
    it; the C kernel keeps a byte per output (the winner's place in its
    window, and whether the ReLU lets its gradient pass) and writes each
    input gradient once.  A BatchNorm whose output only this pool reads
    (network.fuse_batch_norm_into_max_pool) is applied on the way in, and
    its backward takes the pool's output gradient directly: BatchNorm's
    output and its gradient, each as large as the input, are never written.
    Values and gradients are torch's to the bit (the tests check); windows
    that overlap add their gradients in float32.  Only unpadded pooling of
    at most 127 positions a window (the network pads separately) goes to the
    kernel, and only windows that tile the input take the BatchNorm; the
    rest, and CUDA, runs torch's.
    """

    relu = False  # apply a ReLU to the output (network.defer_relu_past_max_pool sets it)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")

    def window(self) -> tuple[int, int, int, int] | None:
        """(kh, kw, sh, sw) where the C kernel can pool this layer's way, else None."""
        pair = nn.modules.utils._pair
        k, s = pair(self.kernel_size), pair(self.stride or self.kernel_size)
        if (pair(self.padding) != (0, 0) or pair(self.dilation) != (1, 1) or self.ceil_mode or self.return_indices
                or k[0] * k[1] > 127):
            return None
        return (*k, *s)

    def tiles(self, x: torch.Tensor) -> bool:
        """Whether this layer's windows tile ``x`` exactly (stride = window, sizes multiples of it) in C."""
        window = self.window()
        return (window is not None and window[:2] == window[2:] and x.dim() == 4 and x.shape[2] >= window[0]
                and x.shape[3] >= window[1] and x.shape[2] % window[0] == 0 and x.shape[3] % window[1] == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.__dict__.get("batch_norm")  # set by BatchNorm2d.hand_to
        handed = bn.__dict__.pop("pending", None) if bn is not None else None
        if handed is not None:
            source, mean, invstd = handed
            if source is not x:
                raise RuntimeError("MaxPool2d: the BatchNorm that hands it its input handed over another tensor")
            return _NativeBatchNormMaxPool.apply(x, bn.weight, bn.bias, mean, invstd, self.window()[:2], self.relu)
        window = self.window()
        if window is not None and runs_native(x) and x.shape[2] >= window[0] and x.shape[3] >= window[1]:
            return _NativeMaxPool.apply(x, window, self.relu)
        y = super().forward(x)
        return torch.relu(y) if self.relu else y


def _pooled_outputs(x: torch.Tensor, oh: int, ow: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty output and ``where`` bytes of a max-pool of ``x`` to ``oh`` x ``ow``, channels_last."""
    shape = (x.shape[0], x.shape[1], oh, ow)
    return (torch.empty(shape, dtype=x.dtype, memory_format=torch.channels_last),
            torch.empty(shape, dtype=torch.uint8, memory_format=torch.channels_last))


class _NativeMaxPool(torch.autograd.Function):
    """Forward and backward of :class:`MaxPool2d` in C (``max_pool_forward`` / ``_backward``)."""

    @staticmethod
    def forward(ctx, x, window, relu):
        n, c, h, w = x.shape
        kh, kw, sh, sw = window
        oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
        y, where = _pooled_outputs(x, oh, ow)
        native.call("max_pool_forward", x.data_ptr(), n, h, w, c, kh, kw, sh, sw, oh, ow, int(relu), y.data_ptr(),
                    where.data_ptr())
        ctx.save_for_backward(where)
        ctx.shape, ctx.window = x.shape, window
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        where, = ctx.saved_tensors
        n, c, h, w = ctx.shape
        dy = _channels_last_bf16(dy)
        dx = torch.empty(ctx.shape, dtype=torch.bfloat16, memory_format=torch.channels_last)
        native.call("max_pool_backward", dy.data_ptr(), where.data_ptr(), n, h, w, c, *ctx.window, where.shape[2],
                    where.shape[3], dx.data_ptr())
        return dx, None, None


class _NativeBatchNormMaxPool(torch.autograd.Function):
    """BatchNorm (training, from its batch statistics) then a tiling max-pool, in C
    (``batch_norm_max_pool_forward`` / ``_backward``): :class:`MaxPool2d` with the BatchNorm handed to it."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, kernel, relu):
        n, c, h, w = x.shape
        kh, kw = kernel
        wt, b = _float_parameters(ctx, weight, bias)
        y, where = _pooled_outputs(x, h // kh, w // kw)
        native.call("batch_norm_max_pool_forward", x.data_ptr(), n, h, w, c, kh, kw, _address(wt), _address(b),
                    mean.data_ptr(), invstd.data_ptr(), int(relu), y.data_ptr(), where.data_ptr())
        ctx.save_for_backward(x, wt, b, mean, invstd, where)
        ctx.kernel = kernel
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, wt, b, mean, invstd, where = ctx.saved_tensors
        n, c, h, w = x.shape
        dy = _channels_last_bf16(dy)
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dweight, dbias = torch.empty(c), torch.empty(c)
        native.call("batch_norm_max_pool_backward", dy.data_ptr(), where.data_ptr(), x.data_ptr(), n, h, w, c,
                    *ctx.kernel, _address(wt), _address(b), mean.data_ptr(), invstd.data_ptr(), _address(dx),
                    dweight.data_ptr(), dbias.data_ptr())
        return (dx, *_parameter_grads(ctx, dweight, dbias, 1), None, None, None, None)


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
    BENCHMARKS.md); tanh was 16% of a searched candidate's
    training step, and that candidate now trains 3-18% faster.  None of the
    other activations gains by float32.  The backward is ``tanh_backward``
    on the saved output, as autograd's own.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = x.is_contiguous() or dense_layout(x) == torch.channels_last
        if x.dtype != torch.bfloat16 or x.is_cuda or not dense:
            return super().forward(x)
        return _Tanh32.apply(x)
