"""Single-layer timings behind the engine's layout and dropout choices (issue #12; BENCHMARKS.md).

    python bench/bench_layers.py [--device cpu] [--skip-compile]

Three questions, each timed alone, forward and backward, bf16, on a
512 x C x 15 x 15 batch (what a searched candidate trained: C = 128) and a
256 x C x 32 x 32 one:

* BatchNorm's cost when its gradient arrives in another memory layout than
  its input (what global average pooling used to do: ``network.GlobalAvgPool``),
  and how it depends on the channel count;
* dropout's mask drawn by ``bernoulli_`` (``nn.Dropout``), by a float
  uniform per element, and by two 15-bit uniforms per 32-bit draw
  (``network.Dropout``);
* BatchNorm + ReLU under ``torch.compile`` against eager (``--skip-compile``
  leaves it out: it compiles for tens of seconds).

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
from nero_deap.memory import keep_freed_memory  # noqa: E402
from nero_deap.network import Dropout  # noqa: E402

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
          f"network.Dropout (two 15-bit uniforms per draw) {ms(lambda: ours(x).backward(g), device):.1f}")


def batchnorm_relu_compiled(device: str) -> None:
    block = nn.Sequential(nn.BatchNorm2d(128), nn.ReLU()).to(device=device, memory_format=CL)
    compiled = torch.compile(block)
    x, g = batch((256, 128, 32, 32), CL, device, True), batch((256, 128, 32, 32), CL, device)
    eager_ms = ms(lambda: block(x).backward(g), device)
    compiled_ms = ms(lambda: compiled(x).backward(g), device)
    print(f"BatchNorm2d + ReLU forward + backward, 256 x 128 x 32 x 32 bf16 channels_last, ms: "
          f"eager {eager_ms:.1f}   torch.compile {compiled_ms:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-compile", action="store_true")
    args = p.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    print(f"device={args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    batchnorm_layouts(args.device)
    dropout_masks(args.device)
    if not args.skip_compile:
        batchnorm_relu_compiled(args.device)


if __name__ == "__main__":
    main()
