"""Issue #12: the layers the decoder uses instead of torch's own compute what torch's compute.

They exist for speed on the CPU (:mod:`nero_deap.nets.layers` gives the measured
reasons); here their values, gradients and gradient layouts are checked
against torch's own layers, and the network rewrite that moves a ReLU behind
max-pooling against the network without it.
"""
import pytest
import torch
from torch import nn

from conftest import ROOT, dense_in, random_phenotypes
from nero_deap.nets import network
from nero_deap.nets.layers import BatchNorm2d, Dropout, GlobalAvgPool, channels_last_batch_norm_is_slow
from nero_deap.nets.network import build_network
from nero_deap.space.phenotype import Phenotype

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_global_average_pool_is_mean_with_the_inputs_layout_for_its_gradient(fmt):
    x = torch.randn(3, 5, 4, 6).contiguous(memory_format=FORMATS[fmt]).requires_grad_()
    y = torch.randn(3, 5)
    grad, = torch.autograd.grad((GlobalAvgPool.apply(x) * y).sum(), x)
    expected, = torch.autograd.grad((x.mean(dim=(2, 3)) * y).sum(), x)
    torch.testing.assert_close(GlobalAvgPool.apply(x), x.mean(dim=(2, 3)), rtol=0, atol=0)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    assert dense_in(grad, FORMATS[fmt])


def test_cpu_dropout_is_bernoulli_with_the_usual_scaling_and_the_global_rng():
    drop, x = Dropout(0.3), torch.ones(200, 50, 10, 10, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(5)
    out = drop(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005  # 10^6 draws: the standard error is 0.0005
    torch.testing.assert_close(out[kept].float(), torch.full_like(out[kept].float(), 1 / 0.7), rtol=0.01, atol=0)
    assert dense_in(out, torch.channels_last) and out.dtype == torch.bfloat16
    grad, = torch.autograd.grad(out.float().sum(), x)
    assert torch.equal(grad != 0, kept)
    torch.manual_seed(5)  # the mask is the documented recipe: two 15-bit uniforms per 32-bit draw of the global RNG
    draws = torch.empty(x.numel() // 2, dtype=torch.int32).random_().view(torch.int16)
    expected = ((draws & 0x7FFF) >= round(0.3 * 2 ** 15)).as_strided(x.shape, x.stride())
    assert torch.equal(kept, expected)
    torch.manual_seed(5)
    assert torch.equal(drop(x), out)  # the global RNG stream: snapshots of it continue trainings exactly
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0)(x), x)
    assert not Dropout(1.0)(x).any()


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 5, 7)])
def test_cpu_dropout_masks_any_shape_and_layout(shape):
    base = torch.ones(*shape)
    views = [base, base.t() if base.dim() == 2 else base]
    if base.dim() == 4:
        views += [base.contiguous(memory_format=torch.channels_last), base[:, :, ::2]]
    for x in views:
        out = Dropout(0.5)(x)
        assert out.shape == x.shape and set(out.unique().tolist()) <= {0.0, 2.0}


def test_batch_norm_layout_rule_follows_the_measurements():
    assert all(channels_last_batch_norm_is_slow(c) for c in (3, 4, 12, 19, 24, 40))
    assert not any(channels_last_batch_norm_is_slow(c) for c in (16, 32, 48, 64, 67, 256))


@pytest.mark.parametrize("channels", [3, 12, 16])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_batch_norm_matches_torchs_and_keeps_the_gradients_layout(channels, fmt):
    torch.manual_seed(0)
    x = (torch.randn(8, channels, 6, 5) * 3 + 1).contiguous(memory_format=FORMATS[fmt])
    weight = torch.randn(8, channels, 6, 5)
    ours, theirs = BatchNorm2d(channels), nn.BatchNorm2d(channels)
    with torch.no_grad():
        for bn in (ours, theirs):
            bn.weight.copy_(torch.linspace(0.5, 2, channels))
            bn.bias.copy_(torch.linspace(-1, 1, channels))
    outs, grads = [], []
    for bn in (ours, theirs):
        xi = x.clone().requires_grad_()
        out = bn(xi)
        grad, = torch.autograd.grad((out * weight).sum(), xi)
        outs.append(out)
        grads.append(grad)
        assert dense_in(out, FORMATS[fmt]) and dense_in(grad, FORMATS[fmt])  # the layout of the layers around it
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


def test_batch_norm_on_few_channels_runs_in_nchw_on_the_cpu():
    original = nn.BatchNorm2d.forward
    layouts = []

    def spy(self, x):
        layouts.append(dense_in(x, torch.contiguous_format))
        return original(self, x)

    nn.BatchNorm2d.forward = spy
    try:
        BatchNorm2d(3)(torch.rand(4, 3, 8, 8).contiguous(memory_format=torch.channels_last))
        BatchNorm2d(16)(torch.rand(4, 16, 8, 8).contiguous(memory_format=torch.channels_last))
    finally:
        nn.BatchNorm2d.forward = original
    assert layouts == [True, False]  # 3 channels: NCHW inside; 16: channels_last, as it came


# ------------------------------------------------------------------ ReLU behind max-pooling (network.py)
def reference_phenotype() -> Phenotype:
    from nero_deap.commands.evaluate import read_phenotype

    return read_phenotype(str(ROOT / "grammars" / "reference" / "engine-reference.txt"))


def deferred_relus(net) -> int:
    return network.pooled_relus(net)


def test_relu_moves_behind_max_pooling_only_where_nothing_else_reads_it():
    assert deferred_relus(build_network(reference_phenotype())) == 3  # conv 2, 3 and 4 feed only a pool
    shared = Phenotype.from_text(
        "layer:conv num-filters:8 filter-shape:3 stride:1 padding:same act:relu input:-1 | "
        "layer:pool-max kernel-size:2 stride:2 padding:valid input:0 | "
        "layer:conv num-filters:8 filter-shape:3 stride:1 padding:same act:relu input:0,1 | "
        "layer:pool-max kernel-size:3 stride:2 padding:same input:2 | "
        "layer:fc num-units:10 act:softmax input:3 || learning:sgd")
    net = build_network(shared)
    assert type(net.nodes[0][-1]) is nn.ReLU  # conv 0 also feeds conv 2 (a skip): its ReLU stays
    assert type(net.nodes[2][-1]) is nn.Identity and net.nodes[3][-1].relu  # padded pool: moved


@pytest.mark.parametrize("accelerate", [False, True])
def test_relu_behind_max_pooling_changes_no_value_and_no_gradient(monkeypatch, accelerate):
    """The same weights with and without the rewrites (ReLU behind max-pooling, ReLU in BatchNorm, BatchNorm in
    max-pooling): equal logits, input gradients and weight gradients, to the bit (ReLU and max are exact, the
    C kernels sum in the same order fused or not), in float32 NCHW and in bf16 channels_last."""
    phenotypes = [reference_phenotype()] + random_phenotypes(40, seed=2)
    rewritten = fused = handed = 0
    for phenotype in phenotypes:
        torch.manual_seed(0)
        fast = build_network(phenotype)
        with monkeypatch.context() as m:  # neither rewrite: every ReLU in its own layer
            m.setattr(network, "defer_relu_past_max_pool", lambda nodes, inputs: None)
            m.setattr(network, "fuse_relu_into_batch_norm", lambda nodes: None)
            m.setattr(network, "fuse_batch_norm_into_max_pool", lambda nodes, inputs, targets=None: None)
            plain = build_network(phenotype)
        plain.load_state_dict(fast.state_dict())
        rewritten += deferred_relus(fast)
        fused += network.fused_relus(fast)
        handed += network.batch_norms_in_pools(fast)
        results = []
        for net in (fast, plain):
            fmt = torch.channels_last if accelerate else torch.contiguous_format
            net.use_memory_format(fmt)
            torch.manual_seed(1)
            x = (torch.rand(6, 3, 32, 32) * 1.5 - 0.25).contiguous(memory_format=fmt).requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=accelerate):
                out = net(x).float()
            grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[1])).sum(),
                                        [x] + list(net.parameters()))
            results.append([out] + list(grads))
        for a, b in zip(*results):
            assert torch.equal(a, b), phenotype.to_text()
    assert rewritten >= 6  # the reference's three and some random candidates' (the test is not vacuous)
    assert fused >= 6 and handed >= 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape, fmt", [((4, 16, 9, 7), "channels_last"), ((4, 16, 9, 7), "contiguous"),
                                        ((300, 1000), "contiguous")])
def test_tanh_equals_torchs_to_the_bit_in_values_and_gradients(monkeypatch, dtype, shape, fmt):
    from nero_deap.nets import layers

    monkeypatch.setattr(layers, "TANH_BLOCK", 1000)  # several blocks and a partial last one, on small tensors
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).to(dtype).contiguous(memory_format=FORMATS[fmt])
    g = torch.randn(x.shape).to(dtype).contiguous(memory_format=FORMATS[fmt])
    results = []
    for act in (layers.Tanh(), nn.Tanh()):
        xi = x.clone().requires_grad_()
        out = act(xi)
        grad, = torch.autograd.grad(out, xi, g)
        results.append((out, grad))
        assert out.dtype == dtype and dense_in(out, FORMATS[fmt]) and dense_in(grad, FORMATS[fmt])
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    for view in (x[1:3], x[:, 1:] if x.dim() == 2 else x[:, :, 1:]):  # dense at an offset; not dense
        grads = [torch.autograd.grad(act(xi).float().sum(), xi)[0]
                 for act in (layers.Tanh(), nn.Tanh()) for xi in [view.clone().requires_grad_()]]
        assert torch.equal(layers.Tanh()(view), torch.tanh(view)) and torch.equal(*grads)


def test_tanh_equals_torchs_on_every_bf16_value():
    from nero_deap.nets import layers

    every = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    every = every[~every.isnan()]
    assert torch.equal(layers.Tanh()(every), torch.tanh(every))


@pytest.mark.parametrize("units", [4, 67])
@pytest.mark.parametrize("tail", ["layer:dropout rate:0.1", "layer:batch-norm", "layer:identity",
                                  "layer:conv num-filters:8 filter-shape:3", "layer:pool-max kernel-size:2"])
def test_the_output_is_always_as_wide_as_the_class_count(units, tail):
    """A dropout (batch-norm, identity, or a conv or pooling repaired to identity on a flat input) after an fc
    once left the fc's width as the output: 4 units failed with "Target 6 is out of bounds", 67 units silently
    scored a 67-way classifier on 10 classes as ok."""
    phenotype = Phenotype.from_text(f"layer:fc act:relu num-units:{units} input:-1 | {tail} input:0 "
                                    "|| learning:adam lr:0.001")
    for classes in (10, 3):
        assert build_network(phenotype, classes)(torch.rand(2, 3, 32, 32)).shape == (2, classes)
