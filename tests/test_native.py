"""Issue #12: the package's C kernels (nero_deap/nets/native.py, nero_deap/nets/kernels/cpu_kernels.c).

BatchNorm in bf16 channels_last on the CPU runs the C kernel when training.
Here: it is built and loaded where a C compiler exists (CI installs one);
its output, input/weight/bias gradients and running statistics match
torch's BatchNorm computed in float64 to bf16 rounding, on channel counts
that do and do not fill a vector; it is deterministic; evaluation and other
dtypes keep torch's kernel; and where it cannot be built, or may not be
loaded, layers fall back to torch with the reason in ``native.status()``.
"""
import os
import subprocess
import sys
import time
import shutil

import pytest
import torch
from torch import nn

from conftest import dense_in
from nero_deap.nets import layers
from nero_deap.nets import native

needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C compiler on this machine")


def bf16_batch(shape, seed=0, scale=3.0, shift=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale + shift
    return x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def paired_layers(channels, momentum=0.1, affine=True):
    ours = layers.BatchNorm2d(channels, momentum=momentum, affine=affine)
    theirs = nn.BatchNorm2d(channels, momentum=momentum, affine=affine).double()
    if affine:
        with torch.no_grad():
            ours.weight.copy_(torch.linspace(0.5, 2, channels))
            ours.bias.copy_(torch.linspace(-1, 1, channels))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@needs_compiler
def test_the_kernels_build_and_load_where_a_compiler_exists():
    assert native.library() is not None, native.status()
    assert native.status().startswith("native kernels: ")
    assert native.library_path(native.compiler()).parent == native.cache_dir()


@needs_compiler
@pytest.mark.parametrize("shape", [(16, 64, 8, 8), (8, 24, 5, 7), (4, 3, 9, 9), (6, 37, 1, 1), (2, 130, 3, 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_training_batch_norm_matches_torch_in_float64_to_bf16_rounding(shape, affine):
    channels = shape[1]
    ours, theirs = paired_layers(channels, affine=affine)
    x = bf16_batch(shape).requires_grad_()
    assert ours.runs_native(x)
    noise = bf16_batch(shape, seed=1, scale=1.0, shift=0.0).float()  # plus a part along x: mean(dy * xhat) != 0
    upstream = (noise + 0.3 * x.detach().float()).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    for step in range(2):  # two steps: the running statistics are updated twice
        out = ours(x)
        x64 = x.detach().double().requires_grad_()
        expected = theirs(x64)
        params = [x] + ([ours.weight, ours.bias] if affine else [])
        grads = torch.autograd.grad(out, params, upstream)
        expected_grads = torch.autograd.grad(expected, [x64] + ([theirs.weight, theirs.bias] if affine else []),
                                             upstream.double())
        assert out.dtype == torch.bfloat16 and dense_in(out, torch.channels_last)
        assert dense_in(grads[0], torch.channels_last) and grads[0].dtype == torch.bfloat16
        # bf16 keeps 8 significant bits: one rounding of the output or of the input gradient is 2^-8 relative
        torch.testing.assert_close(out.double(), expected, rtol=2 ** -8, atol=2 ** -8)
        torch.testing.assert_close(grads[0].double(), expected_grads[0], rtol=2 ** -8, atol=2 ** -7)
        for got, want in zip(grads[1:], expected_grads[1:]):  # summed in float32 and double: close to float64
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean.double(), theirs.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var.double(), theirs.running_var, rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 2


@needs_compiler
def test_cumulative_running_statistics_when_momentum_is_none():
    ours, theirs = paired_layers(16, momentum=None)
    for seed in range(3):
        x = bf16_batch((8, 16, 4, 4), seed=seed)
        ours(x), theirs(x.double())
    torch.testing.assert_close(ours.running_mean.double(), theirs.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var.double(), theirs.running_var, rtol=1e-5, atol=1e-6)


@needs_compiler
def test_a_large_mean_does_not_cancel_the_variance():
    """The variance is summed around a shift (the first pixel): E[x^2] - E[x]^2 would lose it here."""
    x = (torch.randn(32, 16, 8, 8) * 0.5 + 300).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ours, theirs = paired_layers(16)
    torch.testing.assert_close(ours(x).double(), theirs(x.double()), rtol=2 ** -8, atol=2 ** -7)


@needs_compiler
def test_the_kernel_is_deterministic():
    x = bf16_batch((16, 48, 8, 8)).requires_grad_()
    upstream = bf16_batch((16, 48, 8, 8), seed=3)
    results = []
    for _ in range(2):
        bn = layers.BatchNorm2d(48)
        out = bn(x)
        results.append([out, *torch.autograd.grad(out, (x, bn.weight, bn.bias), upstream), bn.running_var])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_compiler
def test_evaluation_other_dtypes_and_layouts_keep_torchs_kernel():
    bn = layers.BatchNorm2d(16)
    x = bf16_batch((4, 16, 4, 4))
    assert bn.runs_native(x)
    assert not bn.runs_native(x.float())
    assert not bn.runs_native(x.contiguous())  # NCHW
    assert not bn.runs_native(x[:1, :, :1, :1])  # one value per channel: torch's error, not ours
    bn.eval()
    assert not bn.runs_native(x)
    torch.testing.assert_close(bn(x).float(), nn.BatchNorm2d(16).eval()(x.float()), rtol=2 ** -8, atol=2 ** -8)


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv(native.DISABLE, "0")
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert native.status() == f"native kernels off: disabled by {native.DISABLE}=0"
        bn, x = layers.BatchNorm2d(16), bf16_batch((4, 16, 4, 4))
        assert not bn.runs_native(x)
        torch.testing.assert_close(bn(x).float(), nn.BatchNorm2d(16)(x.float()), rtol=2 ** -7, atol=2 ** -7)
    finally:
        native.library.cache_clear()


def test_a_compiler_that_fails_leaves_torchs_kernels(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exits 1 for --version and for the build alike
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert native.status().startswith("native kernels off: could not build or load the kernels: false failed")
        assert list((tmp_path / "nero-deap" / "kernels").iterdir()) == []  # no half-written library left behind
    finally:
        native.library.cache_clear()


def test_no_compiler_at_all(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert "no C compiler" in native.status()
    finally:
        native.library.cache_clear()


@needs_compiler
def test_a_cache_folder_others_may_write_is_refused(monkeypatch, tmp_path):
    cache = tmp_path / "nero-deap" / "kernels"
    cache.mkdir(parents=True)
    os.chmod(cache, 0o777)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is None
        assert "writable by others" in native.status()
        os.chmod(cache, 0o700)
        native.library.cache_clear()
        assert native.library() is not None  # built afresh into the private folder
        built = native.library_path(native.compiler()).name
        assert sorted(p.name for p in cache.iterdir()) == [built, built + ".sha256"]
    finally:
        native.library.cache_clear()


@needs_compiler
@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest"])
def test_a_damaged_cached_library_is_rebuilt_not_loaded(tmp_path, damage):
    """A library truncated to 20,000 bytes (a crash during a build) crashed every bf16 CPU run with SIGBUS, in
    ctypes, before any Python check could run, until someone deleted the cache by hand."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "NERO_DEAP_NATIVE": "1"}
    probe = ("import torch; from nero_deap.nets import layers, native; "
             "x = torch.randn(8, 16, 6, 6).to(torch.bfloat16).to(memory_format=torch.channels_last); "
             "bn = layers.BatchNorm2d(16); y = bn(x); print(native.status())")
    first = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "native kernels: " in first.stdout, first.stderr
    (library,) = (tmp_path / "nero-deap" / "kernels").glob("*.so")
    stale = library.with_name("leftover.so.tmp")  # a build killed an hour ago
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    data = library.read_bytes()
    if damage == "truncate":
        library.write_bytes(data[:20000])
    elif damage == "flip":
        library.write_bytes(data[:5000] + bytes([data[5000] ^ 1]) + data[5001:])
    else:
        native.manifest_path(library).unlink()
    again = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "native kernels: " in again.stdout, (again.returncode, again.stderr[-500:])
    assert library.read_bytes() == data or native.verified(library)
    assert not stale.exists()


@needs_compiler
def test_the_library_name_follows_the_source_and_the_cpu(monkeypatch):
    cc = native.compiler()
    first = native.library_path(cc)
    monkeypatch.setattr(native, "cpu_identity", lambda: "another cpu")
    assert native.library_path(cc) != first


# ------------------------------------------------------------------ BatchNorm with its ReLU, max-pooling
@needs_compiler
def test_batch_norm_with_its_relu_is_relu_after_batch_norm_to_the_bit():
    x = bf16_batch((16, 40, 6, 6), shift=0.5).requires_grad_()
    upstream = bf16_batch((16, 40, 6, 6), seed=4, scale=1.0, shift=0.0)
    results = []
    for fused in (True, False):
        bn = layers.BatchNorm2d(40)
        bn.relu = fused
        out = bn(x) if fused else torch.relu(bn(x))
        results.append([out, *torch.autograd.grad(out, (x, bn.weight, bn.bias), upstream)])
    assert (results[0][0] == 0).float().mean() > 0.2  # the ReLU cuts: the mask matters
    for a, b in zip(*results):
        assert torch.equal(a, b)


WINDOWS = [(2, 2, 2, 2), (3, 3, 2, 2), (2, 2, 1, 1), (1, 1, 2, 2), (3, 2, 1, 2), (5, 5, 3, 3)]


@needs_compiler
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("size", [(11, 9), (12, 12)])  # 12 x 12: 2 x 2 windows tile it (the kernel's fast path)
def test_max_pool_matches_torch_to_the_bit(window, relu, size):
    """Values and input gradients, with ties (integer inputs) and a NaN: the first maximum of a window wins, as
    in torch.  Gradients are multiples of 1/8, so overlapping windows add up exactly in any order."""
    kh, kw, sh, sw = window
    torch.manual_seed(0)
    x = torch.randint(-3, 4, (4, 19, *size)).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x[1, 2, 3, 4] = float("nan")
    upstream_shape = nn.MaxPool2d((kh, kw), (sh, sw))(x).shape
    upstream = (torch.randint(-64, 64, upstream_shape) / 8).to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    ours = layers.MaxPool2d((kh, kw), (sh, sw))
    ours.relu = relu
    assert ours.window() is not None and layers.runs_native(x)
    results = []
    for pool in (ours, nn.MaxPool2d((kh, kw), (sh, sw))):
        xi = x.clone().requires_grad_()
        out = pool(xi) if pool is ours or not relu else torch.relu(pool(xi))
        grad, = torch.autograd.grad(out, xi, upstream)
        assert dense_in(out, torch.channels_last) and dense_in(grad, torch.channels_last)
        results.append((out, grad))
    (out, grad), (expected, expected_grad) = results
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.nan_to_num(), expected.nan_to_num())
    if kh <= sh and kw <= sw:  # each input in at most one window: torch's gradient is exact too
        assert torch.equal(grad, expected_grad)
    else:  # torch adds overlapping windows' gradients in bf16; the exact sum, rounded once, is the reference
        xi = x.float().requires_grad_()
        exact = nn.MaxPool2d((kh, kw), (sh, sw))(xi)
        exact, = torch.autograd.grad(torch.relu(exact) if relu else exact, xi, upstream.float())
        assert torch.equal(grad, exact.to(torch.bfloat16))


@needs_compiler
def test_max_pool_leaves_what_the_kernel_does_not_take_to_torch():
    x = bf16_batch((2, 8, 12, 12))
    for pool in (layers.MaxPool2d(2, 2, padding=1), layers.MaxPool2d(3, 2, ceil_mode=True),
                 layers.MaxPool2d(2, 2, dilation=2), layers.MaxPool2d(12, 12)):
        assert pool.window() is None
        torch.testing.assert_close(pool(x), nn.MaxPool2d(pool.kernel_size, pool.stride, pool.padding,
                                                         pool.dilation, ceil_mode=pool.ceil_mode)(x))
    pool = layers.MaxPool2d(2, 2)
    pool.relu = True
    for other in (x.float(), x.contiguous()):  # float32, NCHW: torch's kernel, then the ReLU
        assert torch.equal(pool(other), torch.relu(nn.MaxPool2d(2, 2)(other)))
    with pytest.raises(RuntimeError):  # a window larger than the input: torch's own error
        layers.MaxPool2d(13, 1)(x)


@needs_compiler
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("kernel", [2, 3])
def test_batch_norm_handed_to_its_max_pool_is_the_two_apart_to_the_bit(relu, kernel, monkeypatch):
    """Weights of both signs (a negative one turns the window's minimum into its maximum), a NaN-free batch
    that tiles; the handed-over pair must give the separate pair's output, every gradient and the running
    statistics, bit for bit, and must actually run fused (spied)."""
    channels, size = 24, 6 * kernel
    x = bf16_batch((8, channels, size, size)).requires_grad_()
    upstream = bf16_batch((8, channels, size // kernel, size // kernel), seed=5, scale=1.0, shift=0.0)
    calls = []
    original = native.call
    monkeypatch.setattr(native, "call", lambda name, *args: calls.append(name) or original(name, *args))
    results = []
    for handed in (True, False):
        bn, pool = layers.BatchNorm2d(channels), layers.MaxPool2d(kernel, kernel)
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(-1.5, 1.5, channels))
            bn.bias.copy_(torch.linspace(-0.5, 0.5, channels))
        pool.relu = relu
        if handed:
            bn.hand_to(pool)
        for _ in range(2):
            out = pool(bn(x))
        results.append([out, *torch.autograd.grad(out, (x, bn.weight, bn.bias), upstream), bn.running_mean,
                        bn.running_var])
    assert calls.count("batch_norm_max_pool_forward") == 2 and calls.count("batch_norm_max_pool_backward") == 1
    assert calls.count("batch_norm_forward") == 2 and calls.count("max_pool_forward") == 2  # the pair apart
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_compiler
def test_a_handed_over_batch_norm_still_works_alone_where_the_pool_cannot_take_it():
    """Odd sizes (the windows do not tile), evaluation, float32: the BatchNorm normalises by itself."""
    bn, pool = layers.BatchNorm2d(8), layers.MaxPool2d(2, 2)
    bn.hand_to(pool)
    reference = nn.BatchNorm2d(8)
    for x in (bf16_batch((4, 8, 7, 7)), bf16_batch((4, 8, 8, 8)).float()):
        torch.testing.assert_close(pool(bn(x)).float(), nn.MaxPool2d(2, 2)(reference(x)).float(), rtol=2 ** -7,
                                   atol=2 ** -7)
    bn.eval(), reference.eval()
    x = bf16_batch((4, 8, 8, 8))
    torch.testing.assert_close(pool(bn(x)).float(), nn.MaxPool2d(2, 2)(reference(x.float())), rtol=2 ** -7,
                               atol=2 ** -7)
    assert "pending" not in bn.__dict__
    assert list(bn.state_dict()) == list(reference.state_dict()) and not list(pool.state_dict())


@needs_compiler
def test_the_last_nan_of_a_window_wins_as_in_torch():
    x = torch.zeros(1, 16, 2, 2, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x[0, :, 0, 0] = x[0, :, 1, 1] = float("nan")
    grads = []
    for pool in (layers.MaxPool2d(2, 2), nn.MaxPool2d(2, 2)):
        xi = x.clone().requires_grad_()
        out = pool(xi)
        grads.append(torch.autograd.grad(out, xi, torch.ones_like(out))[0])
    assert torch.equal(grads[0], grads[1]) and grads[0][0, 0, 1, 1] == 1


@needs_compiler
def test_a_hand_over_left_by_a_failed_forward_is_dropped_and_sizes_off_the_plan_are_not_handed_over():
    bn, pool = layers.BatchNorm2d(8), layers.MaxPool2d(2, 2)
    bn.hand_to(pool, (8, 8))
    x = bf16_batch((4, 8, 8, 8))
    assert bn(x) is x and "pending" in bn.__dict__  # handed over; then the pool never ran
    bn.eval()
    reference = nn.BatchNorm2d(8)
    reference.load_state_dict(bn.state_dict())  # the running statistics the hand-over updated
    expected = nn.MaxPool2d(2, 2)(reference.eval()(x.float()))
    torch.testing.assert_close(pool(bn(x)).float(), expected, rtol=2 ** -7, atol=2 ** -7)
    bn.train()
    bigger = bf16_batch((4, 8, 12, 12))  # tiles, but not the planned size: normalised here
    assert not bn.hands_over(bigger) and bn(bigger) is not bigger and "pending" not in bn.__dict__


@needs_compiler
def test_second_derivatives_are_refused_not_silently_zero():
    x = bf16_batch((4, 8, 4, 4)).requires_grad_()
    for layer in (layers.BatchNorm2d(8), layers.MaxPool2d(2, 2)):
        grad, = torch.autograd.grad(layer(x).float().pow(2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice|not have been used"):
            torch.autograd.grad(grad.float().sum(), x)


@needs_compiler
def test_statistics_are_right_when_openmp_starts_fewer_threads_than_torch_reports(tmp_path):
    """OMP_THREAD_LIMIT=1 with torch at 2 threads: the rows must be split among the threads that run."""
    import subprocess
    import sys

    probe = ("import torch; from nero_deap.nets import layers; torch.set_num_threads(2); "
             "x = torch.arange(32.).view(8, 4, 1, 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last); "
             "bn = layers.BatchNorm2d(4); assert bn.runs_native(x); bn(x); "
             "print(bn.running_mean.tolist())")
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [round(v, 3) for v in eval(out.stdout.strip())] == [1.4, 1.5, 1.6, 1.7]  # 0.1 x the means 14-17


def test_a_compiler_found_on_the_path_is_one_word_and_cc_may_hold_arguments(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    assert native.compiler_command("/opt/my tools/gcc") == ["/opt/my tools/gcc"]
    monkeypatch.setenv("CC", "gcc -m64")
    assert native.compiler_command("gcc -m64") == ["gcc", "-m64"]
