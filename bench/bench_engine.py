"""Training-engine benchmark: nero-deap's engine vs the machine's convolution limit and a plain-PyTorch loop.

    python bench/bench_engine.py [--data PATH/cifar10-jpeg.zip] [--epochs 2]
                                 [--train-subset N] [--test-n N] [--device auto] [--accelerate auto]
                                 [--profile] [--compile] [--skip-baseline] [--skip-limit]
                                 [--repeats N] [--interleave ROUNDS [--interleave-csv PATH]]

Three measurements on the same fixed reference architecture (written as a
phenotype of our grammar, ``grammars/reference/engine-reference.txt``):

* the convolution limit: the convolutions of exactly this network (their
  shapes recorded by hooks, at its batch size), forward and backward
  (input and weight gradients; the first layer's input needs none), in bf16
  channels_last and in float32 NCHW, timed alone.  Their FLOPs over their
  time is what the machine does on this network's convolutions; the
  per-shape table shows how that varies with shape;
* nero-deap's engine: images/s, and its FLOP/s counted as the project does
  (3 x the forward FLOPs per image: forward, input and weight gradients) as
  a fraction of that limit in the engine's own precision;
* the baseline most people write: a DataLoader over the images,
  augmentation with torchvision on the CPU, float32, no channels_last.

Everything runs with freed memory kept for reuse (:mod:`nero_deap.engine.memory`,
the engine's own setting), the baseline included: the setting is
process-wide, and without it the limit's own big tensors page-fault on
every call.  ``--repeats`` measures the engine several more times, each run
bracketed by the limit before and after (:func:`bracketed_shares`): on a
shared VM both drift by tens of percent between minutes.  ``--interleave``
times the limit in slices between the engine's own training steps
(:func:`interleaved_shares`), so both see the same machine, and prints the
engine's time per image outside convolutions, the figure the VM's phase
hardly moves; ``--interleave-csv`` keeps every step, with a plot of share
against limit beside it.

``--compile`` adds the engine on the same network wrapped in ``torch.compile``
(inductor): the seconds compiling costs, the steady images/s, and how many
training images it takes to repay the compile (issue #12: per-candidate
compilation counts only if it pays within one candidate's budget).

``--profile`` adds where the engine's time goes (torch.profiler over a few
steps, grouped by operator).  On CUDA the same runs on the GPU.  A
benchmark, not a test.
"""
import argparse
import bisect
import contextlib
import io
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nero_deap.engine.attacks import accuracy_clean_fgsm  # noqa: E402
from nero_deap.cli import add_accelerate_option  # noqa: E402
from nero_deap.store.config import ACCELERATE  # noqa: E402
from nero_deap.engine.datasets import load_raw  # noqa: E402
from nero_deap.engine.data import make_splits
from nero_deap.nets import native  # noqa: E402
from nero_deap.commands.evaluate import read_phenotype  # noqa: E402
from nero_deap.engine.memory import keep_freed_memory  # noqa: E402
from nero_deap.nets.network import build_network  # noqa: E402
from nero_deap.search.parallel import claim_device  # noqa: E402
from nero_deap.space.phenotype import Phenotype  # noqa: E402
from nero_deap.engine.train import (TrainSettings, batch_size_of, make_optimizer, train, use_cudnn_benchmark,  # noqa: E402
                             warmup_then_decay)

REFERENCE = read_phenotype(str(Path(__file__).resolve().parent.parent / "grammars" / "reference" /
                                "engine-reference.txt")).to_text()


def loader_workers(device: str) -> int:
    """The baseline's DataLoader workers: 2 on the CPU (more would take cores from the training itself), up to 8
    beside a GPU, which 2 workers of CPU augmentation would leave waiting (the speed-up would measure them)."""
    return min(8, os.cpu_count() or 2) if device.startswith("cuda") else 2


def plain_pytorch(model, learning, x_u8, y, epochs, device):
    """The baseline: DataLoader + torchvision CPU augmentation + float32."""
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    augment = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])

    class Images(Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return augment(x_u8[i]).float() / 255.0, y[i]

    loader = DataLoader(Images(), batch_size=int(learning["batch_size"]), shuffle=True,
                        num_workers=loader_workers(device), drop_last=False, persistent_workers=True,
                        pin_memory=device.startswith("cuda"))
    optimizer = make_optimizer(model.parameters(), learning)
    total = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_decay(total, 0.1))
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def conv_shapes(model, batch: int, image_shape: tuple) -> list:
    """(batch, in channels, height, width, conv module, needs input grad) of every Conv2d, in forward order."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((tuple(args[0].shape), mod)))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(2, *image_shape))
    for h in hooks:
        h.remove()
    return [((batch,) + shape[1:], mod, i > 0) for i, (shape, mod) in enumerate(seen)]


def conv_call(shape: tuple, conv, input_grad: bool, device: str, dtype) -> tuple:
    """(forward FLOPs, a function doing one forward + backward of ``conv``'s convolution on a batch of
    ``shape``), its tensors allocated once."""
    layout = torch.channels_last if dtype == torch.bfloat16 else torch.contiguous_format
    x = torch.rand(shape, device=device, dtype=dtype).contiguous(memory_format=layout).requires_grad_(input_grad)
    w = conv.weight.detach().to(device, dtype).contiguous(memory_format=layout).requires_grad_(True)
    kw = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups}
    out = F.conv2d(x, w, **kw)
    grad = torch.rand_like(out)
    flops = 2 * out.numel() * (w.shape[1] * w.shape[2] * w.shape[3])
    wrt = (x, w) if input_grad else (w,)  # autograd.grad: no accumulation into .grad, as in a training step
    return flops, lambda: torch.autograd.grad(F.conv2d(x, w, **kw), wrt, grad)


def time_conv(shape: tuple, conv, input_grad: bool, device: str, dtype, repeats: int = 10) -> tuple:
    """(forward FLOPs, seconds) of one forward + backward of ``conv``'s convolution on a batch of ``shape``."""
    flops, fn = conv_call(shape, conv, input_grad, device, dtype)
    return flops, median_seconds(fn, device, repeats)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, device: str, repeats: int = 10, warmup: int = 3) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` calls (the first calls
    pick kernels and allocate)."""
    times = []
    for i in range(warmup + repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


SEED = [0]  # --seed: the weights' and the training order's seed of every run here


def fresh_model(phenotype, data, device: str):
    """The network of ``phenotype`` as every measurement here starts it: seed ``--seed`` (0), on ``device``."""
    torch.manual_seed(SEED[0])
    return build_network(phenotype, 10, data.image_shape, data.mean, data.std).to(device)


def time_engine(model, phenotype, data, epochs: int, fast: bool) -> float:
    """Seconds nero-deap's engine takes to train ``model`` for ``epochs`` on ``data`` (already on the device;
    ``train`` waits for a GPU to finish)."""
    start = time.perf_counter()
    train(model, phenotype.learning, data.train_x, data.train_y,
          TrainSettings(epochs=epochs, accelerate=fast, seed=SEED[0]))
    return time.perf_counter() - start


def warm_up(phenotype, data, fast: bool) -> None:
    """On CUDA, one untimed training over a full batch and the timed runs' ragged last batch.

    cuDNN autotunes every convolution shape on first use (``cudnn.benchmark``) and CUDA loads kernels lazily:
    seconds that would otherwise land in the first timed run, when two epochs of CIFAR-10 take a few seconds
    on a big GPU.  On the CPU the first run's extra cost is small against the run and is left in, as in the
    CPU rows measured before this function existed.
    """
    if not data.train_x.is_cuda:
        return
    n = len(data.train_y)
    batch = batch_size_of(phenotype.learning, n, TrainSettings().max_batch_size)
    ragged = n % batch if n % batch > 1 else 0
    model = fresh_model(phenotype, data, str(data.train_x.device))
    train(model, phenotype.learning, data.train_x[:batch + ragged], data.train_y[:batch + ragged],
          TrainSettings(epochs=1, accelerate=fast))


def conv_limit(model, batch: int, image_shape: tuple, device: str, dtype) -> float:
    """Print the per-shape table; return this network's convolutions' FLOP/s (3 x forward FLOPs / time)."""
    total_flops = total_s = 0.0
    for shape, conv, input_grad in conv_shapes(model, batch, image_shape):
        flops, seconds = time_conv(shape, conv, input_grad, device, dtype)
        total_flops, total_s = total_flops + 3 * flops, total_s + seconds
        print(f"    conv {shape[1]:>4}->{conv.out_channels:<4} {conv.kernel_size[0]}x{conv.kernel_size[1]} "
              f"stride {conv.stride[0]} on {shape[2]}x{shape[3]}, batch {shape[0]}: "
              f"{3 * flops / seconds / 1e9:8.0f} GFLOP/s  ({seconds * 1e3:.1f} ms fwd+bwd)")
    return total_flops / total_s


def profile_engine(model, phenotype, data, settings) -> None:
    """Where the engine's time goes: a few steps under torch.profiler, operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if data.train_x.is_cuda else [])
    steps = 3 * int(phenotype.learning.get("batch_size", 128))
    x, y = data.train_x[:steps], data.train_y[:steps]
    train(model, phenotype.learning, x, y, settings)  # warm-up
    with profile(activities=activities) as prof:
        train(model, phenotype.learning, x, y, settings)
    key = "self_device_time_total" if data.train_x.is_cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=40))


STEADY_DRIFT = 0.15  # a round whose limit moved more than this between before and after is unsteady


def bracketed_shares(phenotype, reference, splits, on_device, batch: int, device: str, fast: bool, rounds: int,
                     epochs: int) -> list:
    """The engine's share of the convolution limit, ``rounds`` times, each engine run bracketed by the limit.

    Why: on a shared VM the limit itself moved by a factor of two from one minute to the next (BENCHMARKS.md:
    rounds from 45 to 103%), so a share against a limit timed once, before the engine, says as much about the
    VM's phase as about the engine.  Here the limit is timed before and after every engine run (the after of
    one round is the before of the next), the share is taken against their mean, and a round whose two limits
    differ by more than ``STEADY_DRIFT`` of their mean is marked unsteady: the median over steady rounds is
    the figure to quote, with how many rounds were steady.
    """
    dtype = torch.bfloat16 if fast else torch.float32
    n = len(on_device.train_y)

    def limit_now() -> float:
        with contextlib.redirect_stdout(io.StringIO()):
            return conv_limit(reference, batch, splits.image_shape, device, dtype)

    before, shares, steady = limit_now(), [], []
    for i in range(rounds):
        model = fresh_model(phenotype, splits, device)
        seconds = time_engine(model, phenotype, on_device, epochs, fast)
        after = limit_now()
        limit = (before + after) / 2
        drift = abs(after - before) / limit
        shares.append(3 * model.flops * n * epochs / seconds / limit)
        if drift <= STEADY_DRIFT:
            steady.append(shares[-1])
        print(f"  round {i + 1}: limit {before / 1e9:.0f} GFLOP/s before, {after / 1e9:.0f} after "
              f"({drift:.0%} apart{'' if drift <= STEADY_DRIFT else ': unsteady'}), "
              f"engine {n * epochs / seconds:.0f} images/s = {shares[-1]:.0%}")
        before = after
    print(f"median share of the convolution limit over {rounds} rounds: {statistics.median(shares):.0%}; "
          f"over the {len(steady)} steady rounds (limits within {STEADY_DRIFT:.0%}): "
          + (f"{statistics.median(steady):.0%}" if steady else "none"))
    return shares


SLICE, TIMED = "bench_engine: convolution limit slice", "bench_engine: its timed call"  # for --interleave-profile


class ConvSlices:
    """The convolution limit in slices: each call runs every convolution of the network forward and backward
    twice in a row, and adds the second run's FLOPs (3 x forward) and seconds to running totals.

    Why twice: the limit is what the machine does on these convolutions warm, as :func:`time_conv`'s median
    of repeated calls has it; a slice's first call finds the caches full of the engine's data.
    """

    def __init__(self, reference, batch: int, image_shape: tuple, device: str, dtype) -> None:
        self.calls = [conv_call(shape, conv, input_grad, device, dtype)
                      for shape, conv, input_grad in conv_shapes(reference, batch, image_shape)]
        self.device, self.flops, self.seconds = device, 0.0, 0.0

    def __call__(self) -> None:
        with torch.autocast(device_type=self.device.split(":")[0], enabled=False), \
                torch.profiler.record_function(SLICE):
            for flops, fn in self.calls:
                fn()
                sync(self.device)
                start = time.perf_counter()
                with torch.profiler.record_function(TIMED):
                    fn()
                    sync(self.device)
                self.seconds += time.perf_counter() - start
                self.flops += 3 * flops


def interleaved_steps(phenotype, splits, on_device, fast: bool, epochs: int, slices: ConvSlices,
                      profile: bool = False) -> tuple:
    """Train once with a slice of the limit before every step; (the model, one row per step: images, the
    engine's seconds from this step's start to the next's, the slice's FLOPs and its seconds).  The last
    step has no next mark and is left out of the rows (not of the model's training).

    The hook fires before every forward pass in training mode: one per step, as the engine trains here
    (adversarial training would add the attack's forward passes).  It waits for the device first, so on a
    GPU the step's queued kernels count as the engine's time, not the hook's; that wait also empties the
    queue the engine keeps full between its steps, so on a GPU the engine's time here is an upper bound.
    """
    marks, hooked = [], [0.0]  # (engine clock: wall clock less the hook's time, slices' totals, images)

    def hook(module, args) -> None:
        if module.training:
            sync(slices.device)
            start = time.perf_counter()
            marks.append((start - hooked[0], slices.flops, slices.seconds, len(args[0])))
            slices()
            hooked[0] += time.perf_counter() - start

    model = fresh_model(phenotype, splits, slices.device)
    handle = model.register_forward_pre_hook(hook)
    try:
        with profiled_convolutions() if profile else contextlib.nullcontext():
            time_engine(model, phenotype, on_device, epochs, fast)
    finally:
        handle.remove()
    if len(marks) < 2:
        raise SystemExit("--interleave needs at least two training steps a round: more images or epochs")
    return model, [(m[3], n[0] - m[0], n[1] - m[1], n[2] - m[2]) for m, n in zip(marks, marks[1:])]


CPU_CONVOLUTIONS = ("aten::mkldnn_convolution", "aten::convolution_backward")  # their names in a CPU profile


@contextlib.contextmanager
def profiled_convolutions():
    """Profile what runs inside (on the CPU); print the engine's convolutions' time against the slices'.

    Why: the time per image outside convolutions assumes the engine's own convolutions run at the limit
    measured beside them.  This checks it: both are timed by the same profiler; the engine's convolutions
    are those outside every slice, the limit's those inside a slice's timed calls (one per convolution, as
    a step has; the untimed warm-up calls count for neither).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield
    events = prof.events()
    slices, timed_calls = (sorted((e.time_range.start, e.time_range.end) for e in events if e.name == name)
                           for name in (SLICE, TIMED))
    convolutions = [(e.time_range.start, e.self_cpu_time_total) for e in events if e.name in CPU_CONVOLUTIONS]
    engine = sum(t for start, t in convolutions if not within(start, slices))
    timed = sum(t for start, t in convolutions if within(start, timed_calls))
    print(f"    profiled: the engine's convolutions took {engine / 1e6:.3f} s, the slices' timed calls "
          f"{timed / 1e6:.3f} s: {engine / timed:.2f}x the limit's time")


def within(start: float, spans: list) -> bool:
    """Whether ``start`` falls inside one of ``spans`` (sorted (start, end) pairs that never overlap)."""
    i = bisect.bisect_right(spans, (start, float("inf"))) - 1
    return i >= 0 and start <= spans[i][1]


def share_parts(rows: list) -> tuple:
    """(limit FLOP/s, engine seconds per image) of step rows (images, engine seconds, slice FLOPs, slice
    seconds), pooled: the share is then FLOPs per image / seconds per image / limit."""
    images, engine_s = sum(r[0] for r in rows), sum(r[1] for r in rows)
    limit = sum(r[2] for r in rows) / sum(r[3] for r in rows)
    return limit, engine_s / images


def interleaved_shares(phenotype, reference, splits, on_device, batch: int, device: str, fast: bool, rounds: int,
                       epochs: int, csv_path: str = "", profile: bool = False) -> list:
    """The engine's share of the convolution limit, the two timed in alternation, step by step.

    Why: bracketing each engine run by the limit (:func:`bracketed_shares`) showed the limit moving by up
    to 2.3x within one minute on this VM, so engine and limit, timed a dozen seconds apart, saw different
    machines.  Here a forward pre-hook on the model runs one slice of the limit (every convolution of the
    network, warm, forward and backward, :class:`ConvSlices`) before each training step: the two alternate
    every few hundred milliseconds, so a phase of the VM that lasts seconds weighs on both alike.  The
    slices are not free for the engine (each evicts its data from the caches, as the engine's own layers
    evict each other's), so the share is, if anything, slightly low.

    Each round prints the share and the engine's time per image *outside* convolutions: its time per image
    less what its convolutions take at the limit measured beside it.  At the end a least-squares line over
    all steps, engine seconds per image against (FLOPs per image / the step's limit): a slope near 1 says
    the engine's convolutions run at the limit, its intercept is the time outside them (BENCHMARKS.md: on
    the CPU, slopes 0.95 and 1.04 and 0.8 ms, and the share falls as the VM's convolutions get faster).
    """
    dtype = torch.bfloat16 if fast else torch.float32
    slices = ConvSlices(reference, batch, splits.image_shape, device, dtype)
    for _ in range(3):  # the first calls pick kernels and allocate
        slices()
    shares, rows = [], []
    for i in range(rounds):
        slices.flops = slices.seconds = 0.0
        model, steps = interleaved_steps(phenotype, splits, on_device, fast, epochs, slices,
                                         profile and not device.startswith("cuda"))
        flops = 3 * model.flops  # per image, forward and backward
        limit, per_image = share_parts(steps)
        shares.append(flops / per_image / limit)
        step_limits = [f / t for _, _, f, t in steps]
        print(f"  round {i + 1}: limit {limit / 1e9:.0f} GFLOP/s (steps {min(step_limits) / 1e9:.0f}-"
              f"{max(step_limits) / 1e9:.0f}), engine {1 / per_image:.0f} images/s = {shares[-1]:.0%}; "
              f"outside convolutions {(per_image - flops / limit) * 1e3:.2f} ms per image")
        rows += [(i + 1, j + 1) + step for j, step in enumerate(steps)]
    print(f"median share of the convolution limit, timed in alternation over {rounds} rounds: "
          f"{statistics.median(shares):.0%} (rounds {', '.join(f'{x:.0%}' for x in shares)})")
    x = [flops * t / f for *_, f, t in rows]  # seconds per image the convolutions take at the step's limit
    y = [s / n for _, _, n, s, _, _ in rows]
    if len(set(x)) > 2:  # a line through fewer points says nothing
        slope, intercept = statistics.linear_regression(x, y)
        print(f"over all {len(rows)} steps: engine s/image = {slope:.3f} x convolutions' s/image at the limit "
              f"+ {intercept * 1e3:.2f} ms (correlation {statistics.correlation(x, y):.2f})")
    if csv_path:
        with open(csv_path, "w") as out:
            out.write("round,step,images,engine_s,slice_flops,slice_s,flops_per_image\n")
            out.writelines(f"{r},{j},{n},{s!r},{f},{t!r},{flops}\n" for r, j, n, s, f, t in rows)
        plot_interleaved(rows, flops, csv_path.rsplit(".", 1)[0] + ".png")
        print(f"per step: {csv_path} and its plot beside it")
    return shares


def plot_interleaved(rows: list, flops: float, path: str) -> None:
    """Share against the limit, one point per training step, and the curve a constant time outside
    convolutions (the median step's) would draw: how the share depends on the VM's phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [share_parts([row[2:]]) for row in rows]
    limits = [limit for limit, _ in parts]
    shares = [flops / per_image / limit for limit, per_image in parts]
    outside = statistics.median(per_image - flops / limit for limit, per_image in parts)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([x / 1e9 for x in limits], shares, s=8, alpha=0.6, label="one training step")
    curve = [min(limits) + (max(limits) - min(limits)) * k / 50 for k in range(51)]
    ax.plot([x / 1e9 for x in curve], [flops / x / (flops / x + outside) for x in curve], color="k",
            label=f"{outside * 1e3:.2f} ms per image outside convolutions")
    ax.axhline(0.65, ls=":", color="grey", label="issue #12's target, 65%")
    ax.set(xlabel="convolution limit beside the step (GFLOP/s)", ylabel="engine's share of the limit")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compile_payback(phenotype, data, device: str, fast: bool, epochs: int) -> None:
    """Time the engine on a ``torch.compile``-d copy: compile cost, steady speed, break-even images.

    The first ``train`` call compiles (forward and backward graphs); a second
    call on the same compiled module, with a fresh optimiser, reuses them and
    gives the steady speed.  Both train ``epochs`` epochs.  The eager speed it
    is compared with comes from a warm process too (one more eager training
    here, not the first of the process: that one pays cuDNN's autotuning and
    lazy initialisation).  Inductor's on-disk caches are off, so the cost is
    a cold compile's, as for a new architecture.
    """
    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = True
    n = len(data.train_y)
    eager_s = time_engine(fresh_model(phenotype, data, device), phenotype, data, epochs, fast)
    model = fresh_model(phenotype, data, device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model)
    times = []
    for run in range(2):
        model.load_state_dict(initial)  # same parameter objects: the second run reuses the compiled graphs
        times.append(time_engine(compiled, phenotype, data, epochs, fast))
        if run == 0:  # accuracy at equal epochs with the eager run
            clean, fgsm = accuracy_clean_fgsm(model.float(), data.test_x, data.test_y)
    first, steady = times
    compile_s = max(0.0, first - steady)
    per_image_eager, per_image_compiled = eager_s / (n * epochs), steady / (n * epochs)
    print(f"{'torch.compile':>14}: {n * epochs / steady:9.0f} images/s steady (eager, warm {n * epochs / eager_s:.0f}), "
          f"compiling cost {compile_s:.1f} s, test clean {clean:.4f}  FGSM {fgsm:.4f}")
    if per_image_compiled < per_image_eager:
        print(f"{'':>16}pays for itself after {compile_s / (per_image_eager - per_image_compiled):,.0f} "
              f"training images")
    else:
        print(f"{'':>16}never pays: slower than eager at steady state")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("NERO_DEAP_CIFAR10_ZIP", "cifar10"),
                   help="a --data spec (default $NERO_DEAP_CIFAR10_ZIP, else cifar10)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=0)
    p.add_argument("--test-n", type=int, default=0, help="score on a stratified test subset (0 = all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--phenotype", default=None, help="another network: phenotype text or file (default: the reference)")
    p.add_argument("--skip-limit", action="store_true", help="skip the convolution-limit microbenchmark")
    p.add_argument("--profile", action="store_true", help="print where the engine's time goes")
    p.add_argument("--compile", action="store_true",
                   help="also time the engine under torch.compile: compile seconds, steady speed, break-even")
    p.add_argument("--repeats", type=int, default=1,
                   help="then this many more rounds of (limit, engine) back to back, and their median share: "
                        "a shared VM's speed drifts by tens of percent between minutes")
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="then this many rounds of the engine with the limit timed in alternation, step by step: "
                        "the share that a VM's drift cannot skew")
    p.add_argument("--interleave-csv", default="", metavar="PATH", help="--interleave's steps as CSV")
    p.add_argument("--interleave-profile", action="store_true",
                   help="on the CPU, profile each --interleave round: do the engine's convolutions run at the limit?")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the training order")
    add_accelerate_option(p, default="auto")
    args = p.parse_args()
    SEED[0] = args.seed
    device = claim_device(args.device)
    keep_freed_memory()
    splits = make_splits(load_raw(args.data), train_subset=args.train_subset or None,
                         test_subset=args.test_n or None)
    phenotype = read_phenotype(args.phenotype) if args.phenotype else Phenotype.from_text(REFERENCE)
    n = len(splits.train_y)
    print(f"device={device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}), "
          f"train images={n}, epochs={args.epochs}, accelerate={args.accelerate}, seed={args.seed}, "
          f"torch {torch.__version__}\n{native.status()}")
    fast = ACCELERATE[args.accelerate]
    fast = device.startswith("cuda") if fast is None else fast
    if fast and device.startswith("cuda"):
        use_cudnn_benchmark()  # as the engine has it: the limit must not be timed with worse algorithms
    torch.manual_seed(0)
    reference = build_network(phenotype, 10, splits.image_shape, splits.mean, splits.std)
    batch = int(phenotype.learning.get("batch_size", 128))
    limits = {}
    if not args.skip_limit:
        float32 = "float32 NCHW" + (" (cuDNN's default: TF32 convolutions)" if device.startswith("cuda") else "")
        for label, dtype in (("bf16 channels_last", torch.bfloat16), (float32, torch.float32)):
            print(f"  convolution limit, {label}: this network's convolutions alone, forward + backward")
            limits[dtype] = conv_limit(reference, batch, splits.image_shape, device, dtype)
            print(f"    all of them: {limits[dtype] / 1e9:.0f} GFLOP/s")
    on_device = splits.to(device)
    warm_up(phenotype, on_device, fast)
    results = {}
    for name in ("nero-deap", "plain-pytorch"):
        if name == "plain-pytorch" and args.skip_baseline:
            continue
        model = fresh_model(phenotype, splits, device)
        if name == "nero-deap":
            seconds = time_engine(model, phenotype, on_device, args.epochs, fast)
        else:
            start = time.perf_counter()
            plain_pytorch(model, phenotype.learning, splits.train_x, splits.train_y, args.epochs, device)
            seconds = time.perf_counter() - start
        clean, fgsm = accuracy_clean_fgsm(model.float(), on_device.test_x, on_device.test_y)
        results[name] = seconds
        print(f"{name:>14}: {n * args.epochs / seconds:9.0f} images/s  {seconds / args.epochs:8.2f} s/epoch  "
              f"test clean {clean:.4f}  FGSM {fgsm:.4f}  ({model.params:,} params"
              + (f", DataLoader with {loader_workers(device)} workers)" if name == "plain-pytorch" else ")"))
        achieved = 3 * model.flops * n * args.epochs / seconds
        limit = limits.get(torch.bfloat16 if fast and name == "nero-deap" else torch.float32)
        if limit:
            print(f"{'':>16}{achieved / 1e9:9.0f} GFLOP/s = {achieved / limit:.0%} of the "
                  f"{'bf16' if fast and name == 'nero-deap' else 'float32'} convolution limit "
                  f"({limit / 1e9:.0f} GFLOP/s)")
    if len(results) == 2:
        print(f"speed-up of nero-deap over plain PyTorch: {results['plain-pytorch'] / results['nero-deap']:.2f}x")
    if args.repeats > 1 and not args.skip_limit:
        bracketed_shares(phenotype, reference, splits, on_device, batch, device, fast, args.repeats, args.epochs)
    if args.interleave:
        interleaved_shares(phenotype, reference, splits, on_device, batch, device, fast, args.interleave,
                           args.epochs, args.interleave_csv, args.interleave_profile)
    if args.compile:
        compile_payback(phenotype, on_device, device, fast, args.epochs)
    if args.profile:
        profile_engine(fresh_model(phenotype, splits, device), phenotype, on_device,
                       TrainSettings(epochs=1, accelerate=fast))


if __name__ == "__main__":
    main()
