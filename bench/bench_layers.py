"""Single-layer timings behind the engine's layout and dropout choices (issue #12; BENCHMARKS.md).

    python bench/bench_layers.py [--device cpu] [--skip-compile] [--only memory|native]

Eight questions, each timed alone, forward and backward, bf16, on a
512 x C x 15 x 15 batch (what a searched candidate trained: C = 128) and a
256 x C x 32 x 32 one:

* BatchNorm's cost when its gradient arrives in another memory layout than
  its input (what global average pooling used to do: ``layers.GlobalAvgPool``),
  and how it depends on the channel count;
* dropout's mask drawn by ``bernoulli_`` (``nn.Dropout``), by a float
  uniform per element, and by two 15-bit uniforms per 32-bit draw
  (``layers.Dropout``);
* BatchNorm by channel count: channels_last against NCHW with a copy each
  way (``layers.Relayout``), which ``layers.BatchNorm2d`` picks by
  ``layers.channels_last_batch_norm_is_slow``;
* BatchNorm, ReLU, 2 x 2 max-pooling against BatchNorm, max-pooling, ReLU
  (``network.defer_relu_past_max_pool``);
* each activation in bf16 against casting to float32, applying it there
  and rounding back (``layers.Tanh`` does so for tanh), forward only;
* BatchNorm + ReLU under ``torch.compile`` against eager (``--skip-compile``
  leaves it out: it compiles for tens of seconds);
* the layers outside convolutions against the memory bandwidth: a copy,
  ATen's BatchNorm and max-pooling, and what ATen's elementwise and
  reduction ops would do instead (``--only memory`` runs this one alone);
* the package's C kernels (``nero_deap/native.py``) against torch's:
  BatchNorm by channel count, with and without the ReLU they fuse,
  max-pooling with and without its ReLU, and BatchNorm handed to the
  max-pool that reads it (``--only native``).

Medians of several calls after a warm-up; freed memory is kept, as in the
engine.  A benchmark, not a test.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from bench_engine import median_seconds  # noqa: E402  (bench/ is this script's own folder)
from nero_deap.engine.memory import keep_freed_memory  # noqa: E402
from nero_deap.nets.layers import BatchNorm2d, Dropout, Relayout, Tanh  # noqa: E402

CL, NCHW = torch.channels_last, torch.contiguous_format


def ms(fn, device: str) -> float:
    """Median milliseconds of ``fn()`` over 7 calls after one warm-up call."""
    return 1e3 * median_seconds(fn, device, repeats=7, warmup=1)


def batch(shape: tuple, layout, device: str, grad: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, dtype=torch.bfloat16, device=device).contiguous(memory_format=layout)
    return x.requires_grad_(grad)


def batchnorm_layouts(device: str) -> None:
    print("BatchNorm2d forward + backward, bf16 (input layout / gradient layout), ms:")
    for n, c, hw in ((512, 128, 15), (256, 3, 32), (256, 16, 32), (256, 64, 32), (256, 128, 32)):
        cells = []
        for x_layout, g_layout in ((CL, CL), (CL, NCHW), (NCHW, NCHW)):
            bn = nn.BatchNorm2d(c).to(device=device, memory_format=x_layout)
            x, g = batch((n, c, hw, hw), x_layout, device, True), batch((n, c, hw, hw), g_layout, device)
            cells.append(ms(lambda: bn(x).backward(g), device))
        print(f"  {n} x {c:>3} x {hw} x {hw}: channels_last/channels_last {cells[0]:7.1f}   "
              f"channels_last/NCHW {cells[1]:7.1f}   NCHW/NCHW {cells[2]:7.1f}")


def dropout_masks(device: str) -> None:
    x, g = batch((512, 128, 15, 15), CL, device, True), batch((512, 128, 15, 15), CL, device)
    native, ours = nn.Dropout(0.49).train(), Dropout(0.49).train()
    uniforms = lambda: x * (torch.rand_like(x, dtype=torch.float32) >= 0.49) * (1 / 0.51)  # noqa: E731
    print("dropout 0.49, forward + backward, 512 x 128 x 15 x 15 bf16 channels_last, ms: "
          f"nn.Dropout (bernoulli_) {ms(lambda: native(x).backward(g), device):.1f}   "
          f"a float uniform per element {ms(lambda: uniforms().backward(g), device):.1f}   "
          f"layers.Dropout (two 15-bit uniforms per draw) {ms(lambda: ours(x).backward(g), device):.1f}")


def batchnorm_channels(device: str) -> None:
    print("BatchNorm2d forward + backward, 256 x C x 32 x 32 bf16, channels_last in and out, ms:")
    for c in (1, 3, 4, 8, 12, 16, 19, 24, 32, 40, 48, 64, 67, 96):
        bn = nn.BatchNorm2d(c).to(device=device, memory_format=CL)
        x, g = batch((256, c, 32, 32), CL, device, True), batch((256, c, 32, 32), CL, device)
        via_nchw = lambda: Relayout.apply(bn(Relayout.apply(x, NCHW)), CL)  # noqa: E731
        native, relaid = ms(lambda: bn(x).backward(g), device), ms(lambda: via_nchw().backward(g), device)
        ours = BatchNorm2d(c).to(device=device, memory_format=CL)
        picked = ms(lambda: ours(x).backward(g), device)
        how = "C kernel" if ours.runs_native(x) else "NCHW" if ours.runs_in_nchw(x) else "channels_last"
        print(f"  C={c:>3}: channels_last {native:6.1f}   NCHW + 2 copies {relaid:6.1f}   layers.BatchNorm2d {picked:6.1f} "
              f"({how})")


def relu_behind_pool(device: str) -> None:
    x, g = batch((256, 128, 32, 32), CL, device, True), batch((256, 128, 16, 16), CL, device)
    before = nn.Sequential(nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2, 2)).to(device=device, memory_format=CL)
    after = nn.Sequential(nn.BatchNorm2d(128), nn.MaxPool2d(2, 2), nn.ReLU()).to(device=device, memory_format=CL)
    rounds = [(ms(lambda: before(x).backward(g), device), ms(lambda: after(x).backward(g), device)) for _ in range(3)]
    print("BatchNorm2d, ReLU, 2 x 2 max-pool forward + backward, 256 x 128 x 32 x 32 bf16 channels_last, ms "
          "(3 rounds): ReLU before the pool " + ", ".join(f"{b:.1f}" for b, _ in rounds) +
          "   ReLU after the pool " + ", ".join(f"{a:.1f}" for _, a in rounds))


def activations_via_float32(device: str) -> None:
    import torch.nn.functional as F

    x = batch((128, 96, 32, 32), CL, device)
    print("activation forward, 128 x 96 x 32 x 32 bf16 channels_last, ms: bf16 kernel / via float32 (same values?)")
    for name, fn in (("tanh", torch.tanh), ("sigmoid", torch.sigmoid), ("elu", F.elu), ("gelu", F.gelu),
                     ("silu", F.silu), ("relu", torch.relu), ("leaky_relu", F.leaky_relu), ("mish", F.mish),
                     ("softplus", F.softplus), ("selu", F.selu), ("hardswish", F.hardswish)):
        via = lambda: fn(x.float()).to(x.dtype)  # noqa: E731
        print(f"  {name:>10}: {ms(lambda: fn(x), device):6.1f} / {ms(via, device):6.1f} "
              f"({'identical' if torch.equal(fn(x), via()) else 'differ'})")
    tanh = Tanh()
    print(f"  layers.Tanh: {ms(lambda: tanh(x), device):6.1f}")


def batchnorm_relu_compiled(device: str) -> None:
    block = nn.Sequential(nn.BatchNorm2d(128), nn.ReLU()).to(device=device, memory_format=CL)
    compiled = torch.compile(block)
    x, g = batch((256, 128, 32, 32), CL, device, True), batch((256, 128, 32, 32), CL, device)
    eager_ms = ms(lambda: block(x).backward(g), device)
    compiled_ms = ms(lambda: compiled(x).backward(g), device)
    print(f"BatchNorm2d + ReLU forward + backward, 256 x 128 x 32 x 32 bf16 channels_last, ms: "
          f"eager {eager_ms:.1f}   torch.compile {compiled_ms:.1f}")


def memory_bound_layers(device: str) -> None:
    """Why the work outside convolutions is not cut further (BENCHMARKS.md, "The share timed in alternation"):
    ATen's BatchNorm takes 2-3x what its passes over memory need, but building it from ATen's generic ops is
    slower still; an index-free 2 x 2 max-pool from four strided views is not clearly faster forward."""
    import torch.nn.functional as F

    x, g = batch((256, 128, 32, 32), CL, device), batch((256, 128, 32, 32), CL, device)
    x_grad, y = x.detach().requires_grad_(True), torch.empty_like(x)
    copy = ms(lambda: y.copy_(x), device)
    print(f"256 x 128 x 32 x 32 bf16 channels_last ({x.numel() * 2 / 2 ** 20:.0f} MiB), ms: copy {copy:.1f} "
          f"({2 * x.numel() * 2 / copy / 1e6:.0f} GB/s)")
    bn = nn.BatchNorm2d(128).to(device=device, memory_format=CL)
    print(f"  BatchNorm2d forward {ms(lambda: bn(x), device):.1f}, forward + backward "
          f"{ms(lambda: torch.autograd.grad(bn(x_grad), (x_grad, bn.weight, bn.bias), g), device):.1f} "
          f"(8 passes over memory at the copy's speed: {4 * copy:.1f})")
    dims = (0, 2, 3)
    print(f"  its statistics from ATen ops: sum, float32 accumulation "
          f"{ms(lambda: x.sum(dims, dtype=torch.float32), device):.1f}; var_mean "
          f"{ms(lambda: torch.var_mean(x, dim=dims), device):.1f}")

    def four_views() -> torch.Tensor:  # the maximum of the four corners of every 2 x 2 window
        a, b, c, d = x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]
        return torch.maximum(torch.maximum(a, b), torch.maximum(c, d))

    out, indices = F.max_pool2d_with_indices(x, 2, 2)
    gout = torch.ones_like(out)
    backward = lambda: torch.ops.aten.max_pool2d_with_indices_backward(  # noqa: E731
        gout, x, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)
    print(f"  2 x 2 max-pool: ATen forward (with int64 indices) "
          f"{ms(lambda: F.max_pool2d_with_indices(x, 2, 2), device):.1f}, backward {ms(backward, device):.1f}; "
          f"maximum of four strided views, forward {ms(four_views, device):.1f} "
          f"(same values: {torch.equal(four_views(), out)})")


def native_kernels(device: str) -> None:
    """The C kernels (nero_deap/native.py) against torch's kernels, forward + backward, bf16 channels_last."""
    from nero_deap.nets import native
    from nero_deap.nets.layers import MaxPool2d

    print(native.status())
    grads = lambda layer, x, g: torch.autograd.grad(layer(x), [x] + list(layer.parameters()), g)  # noqa: E731
    print("BatchNorm2d (+ ReLU) forward + backward, ms: torch / C kernel, and with a ReLU after it: "
          "torch BatchNorm then nn.ReLU / C kernel with the ReLU fused")
    for n, c, hw in ((256, 16, 32), (256, 24, 32), (256, 37, 32), (256, 64, 32), (256, 67, 32), (256, 100, 32),
                     (256, 128, 32), (256, 256, 16), (256, 256, 8)):
        x, g = batch((n, c, hw, hw), CL, device, True), batch((n, c, hw, hw), CL, device)
        theirs, ours = nn.BatchNorm2d(c).to(memory_format=CL), BatchNorm2d(c)
        theirs_relu, ours_relu = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()), BatchNorm2d(c)
        ours_relu.relu = True
        cells = [ms(lambda: grads(layer, x, g), device) for layer in (theirs, ours, theirs_relu, ours_relu)]
        print(f"  {n} x {c:>3} x {hw} x {hw}: {cells[0]:6.1f} / {cells[1]:6.1f} ({cells[0] / cells[1]:.2f}x)   "
              f"with ReLU {cells[2]:6.1f} / {cells[3]:6.1f} ({cells[2] / cells[3]:.2f}x)")
    print("max-pooling (+ ReLU) forward + backward, ms: torch / C kernel, and with a ReLU after it")
    for n, c, hw, k, s in ((256, 64, 32, 2, 2), (256, 128, 32, 2, 2), (256, 256, 16, 2, 2), (256, 128, 32, 3, 2),
                           (256, 100, 31, 3, 2)):
        x = batch((n, c, hw, hw), CL, device, True)
        g = batch(tuple(nn.MaxPool2d(k, s)(x).shape), CL, device)
        ours, ours_relu = MaxPool2d(k, s), MaxPool2d(k, s)
        ours_relu.relu = True
        theirs_relu = nn.Sequential(nn.MaxPool2d(k, s), nn.ReLU())
        cells = [ms(lambda: grads(layer, x, g), device) for layer in (nn.MaxPool2d(k, s), ours, theirs_relu, ours_relu)]
        print(f"  {n} x {c:>3} x {hw} x {hw}, {k} x {k} / {s}: {cells[0]:6.1f} / {cells[1]:6.1f} "
              f"({cells[0] / cells[1]:.2f}x)   with ReLU {cells[2]:6.1f} / {cells[3]:6.1f} "
              f"({cells[2] / cells[3]:.2f}x)")
    print("BatchNorm2d, 2 x 2 max-pool, ReLU forward + backward, ms: torch's layers / C kernels apart / "
          "the BatchNorm handed to the pool (network.fuse_batch_norm_into_max_pool)")
    for n, c, hw in ((256, 128, 32), (256, 256, 16), (256, 100, 32)):
        x = batch((n, c, hw, hw), CL, device, True)
        g = batch((n, c, hw // 2, hw // 2), CL, device)
        pairs = []
        for handed in (False, True):
            bn, pool = BatchNorm2d(c), MaxPool2d(2, 2)
            pool.relu = True
            if handed:
                bn.hand_to(pool)
            pairs.append(nn.Sequential(bn, pool))
        theirs = nn.Sequential(nn.BatchNorm2d(c), nn.MaxPool2d(2, 2), nn.ReLU())
        cells = [ms(lambda: grads(layer, x, g), device) for layer in (theirs, *pairs)]
        print(f"  {n} x {c:>3} x {hw} x {hw}: {cells[0]:6.1f} / {cells[1]:6.1f} / {cells[2]:6.1f} "
              f"({cells[0] / cells[2]:.2f}x torch's)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--only", choices=["memory", "native"], help="run one question alone")
    args = p.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    print(f"device={args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.only == "memory":
        return memory_bound_layers(args.device)
    if args.only == "native":
        return native_kernels(args.device)
    batchnorm_layouts(args.device)
    dropout_masks(args.device)
    batchnorm_channels(args.device)
    relu_behind_pool(args.device)
    activations_via_float32(args.device)
    memory_bound_layers(args.device)
    native_kernels(args.device)
    if not args.skip_compile:
        batchnorm_relu_compiled(args.device)


if __name__ == "__main__":
    main()
