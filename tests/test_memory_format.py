"""Issue #13: every tensor reaches a convolution in the memory format of the model's weights.

oneDNN's CPU convolution (torch 2.14.1 / oneDNN 3.12, AVX-512/AMX Xeons)
corrupted the heap when fed the channels_last-strided batches that
``augment()`` produces while the weights were NCHW; see ``data.batches``.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, dense_in, random_phenotypes
from nero_deap.engine.datasets import load_raw
from nero_deap.engine.data import batches, make_splits
from nero_deap.nets.export import load_model, save_model
from nero_deap.search.fitness import EvalContext, died_in_flight, in_flight, marker_path
from nero_deap.nets.network import build_network
from nero_deap.space.phenotype import Phenotype
from nero_deap.commands.search import report_deaths
from nero_deap.engine.train import TrainSettings, train

# The candidate isolated in issue #13: dropout -> conv 3->77 1x1 stride 2 same -> sigmoid -> dropout -> fc.
CRASHER = ("layer:dropout rate:0.3 input:-1 | "
           "layer:conv num-filters:77 filter-shape:1 stride:2 padding:same act:sigmoid input:0 | "
           "layer:dropout rate:0.3 input:1 | layer:fc num-units:10 act:softmax input:2 || "
           "learning:gradient-descent lr:0.01 momentum:0.9 batch_size:143")
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.fixture(scope="module")
def splits():
    return make_splits(load_raw("synthetic:300"))


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_batches_are_dense_in_the_requested_format(splits, augment, fmt):
    g = torch.Generator().manual_seed(0)
    seen = 0
    for xb, _ in batches(splits.train_x, splits.train_y, 64, shuffle=True, augment_data=augment, generator=g,
                         memory_format=FORMATS[fmt]):
        assert dense_in(xb, FORMATS[fmt]), (fmt, augment, xb.stride())
        assert xb.dtype == torch.float32 and 0 <= float(xb.min()) and float(xb.max()) <= 1
        seen += 1
    assert seen == 4


@pytest.mark.parametrize("accelerate", [False, True])
def test_training_feeds_every_conv_the_weights_layout(splits, accelerate):
    model = build_network(Phenotype.from_text(CRASHER), mean=splits.mean, std=splits.std)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    layouts = []
    conv.register_forward_pre_hook(lambda m, args: layouts.append(
        (dense_in(args[0], model.memory_format), m.weight.is_contiguous(memory_format=model.memory_format))))
    train(model, Phenotype.from_text(CRASHER).learning, splits.train_x, splits.train_y,
          TrainSettings(epochs=1, seed=0, accelerate=accelerate))
    assert model.memory_format == (torch.channels_last if accelerate else torch.contiguous_format)
    assert layouts and all(inp and weight for inp, weight in layouts)


def test_model_lays_out_foreign_inputs_itself(splits, tmp_path):
    """Attacks, AutoAttack and users feed whatever layout they have: the model converts at its entry."""
    model = build_network(Phenotype.from_text(CRASHER), mean=splits.mean, std=splits.std).eval()
    path = save_model(model, tmp_path / "m.pt", num_classes=10, in_shape=(3, 32, 32), mean=splits.mean,
                      std=splits.std)
    permuted = torch.rand(5, 32, 32, 3).permute(0, 3, 1, 2)  # what augment() used to hand the model
    for net in (model, load_model(path), build_network(Phenotype.from_text(CRASHER)).use_memory_format(
            torch.channels_last).eval()):
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        seen = []
        conv.register_forward_pre_hook(lambda m, args: seen.append(dense_in(args[0], net.memory_format)))
        with torch.no_grad():
            out = net(permuted)
        assert seen == [True] and out.shape == (5, 10)
    with torch.no_grad():  # the layout changes nothing but speed
        torch.testing.assert_close(model(permuted), model(permuted.contiguous()))


def test_crashing_candidate_trains_ten_times_in_a_fresh_process(tmp_path):
    """Before the fix this died (SIGSEGV / heap corruption) within 2 attempts on AVX-512/AMX Xeons."""
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        import torch
        from nero_deap.engine.datasets import load_raw
        from nero_deap.engine.data import make_splits
        from nero_deap.nets.network import build_network
        from nero_deap.space.phenotype import Phenotype
        from nero_deap.engine.train import TrainSettings, train
        torch.set_num_threads(2)
        s = make_splits(load_raw("synthetic:600"))
        p = Phenotype.from_text({CRASHER!r})
        for seed in range(10):
            torch.manual_seed(seed)
            model = build_network(p, mean=s.mean, std=s.std)
            train(model, p.learning, s.train_x, s.train_y, TrainSettings(epochs=1, seed=seed, accelerate=False))
        print("trained 10")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NERO_DEAP_CACHE": str(tmp_path)})
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "trained 10" in done.stdout


class _Ind:
    id, gen = 17, 3


def test_a_process_killed_mid_evaluation_is_named_on_the_next_start(tmp_path):
    """A signal leaves no Python handler a chance: the in-flight note names the candidate afterwards."""
    folder = tmp_path / "run" / "inflight"
    script = textwrap.dedent(f"""
        import os, signal, sys; sys.path.insert(0, {str(ROOT)!r})
        from nero_deap.search.fitness import EvalContext, in_flight
        class Ind: id, gen = 17, 3
        with in_flight(EvalContext(grammar_path="g", inflight_dir={str(folder)!r}), Ind(), "layer:conv | x"):
            os.kill(os.getpid(), signal.SIGSEGV)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGSEGV
    assert "Segmentation fault" in done.stderr  # faulthandler's Python stack of the crash
    lines = []
    report_deaths(tmp_path / "run", lines.append, run_is_live=True)  # its pid is gone: stale even mid-run
    assert len(lines) == 1 and "candidate 17 of generation 3: layer:conv | x" in lines[0]
    assert not list(folder.glob("*.json"))  # reported once


@pytest.mark.parametrize("text", ["[1]", "{}", "not json", '{"id": 3}'])
def test_a_note_that_is_not_ours_is_reported_as_unreadable_not_a_crash(tmp_path, text):
    (tmp_path / "run" / "inflight").mkdir(parents=True)
    (tmp_path / "run" / "inflight" / "x.json").write_text(text)
    lines = []
    report_deaths(tmp_path / "run", lines.append)
    assert len(lines) == 1 and "was evaluating candidate" in lines[0] and "(unreadable x.json)" in lines[0]
    assert "when the run stopped (a kill, a crash, or a disk error)" in lines[0]  # not "died": it may not have


def test_live_evaluations_are_not_reported_and_notes_go_when_done(tmp_path):
    ctx = EvalContext(grammar_path="g", inflight_dir=str(tmp_path))
    with in_flight(ctx, _Ind(), "pheno"):
        note = json.loads(marker_path(str(tmp_path)).read_text())
        assert note["id"] == 17 and note["pid"] == os.getpid()
        assert died_in_flight(str(tmp_path), run_is_live=True) == []  # still running here
    assert not list(tmp_path.glob("*.json"))


# ------------------------------------------------------------------ issue #12: gradients keep the layout too
POOLED_TO_ONE_PIXEL = ("layer:conv num-filters:8 filter-shape:3 stride:1 padding:same act:relu input:-1 | "
                       "layer:pool-max kernel-size:32 stride:32 padding:valid input:0 | "
                       "layer:conv num-filters:8 filter-shape:3 stride:1 padding:same act:relu input:0,1 | "
                       "layer:fc num-units:10 act:softmax input:2 || learning:sgd")


def test_every_gradient_comes_back_in_the_weights_layout():
    """Global average pooling used to hand back NCHW gradients to channels_last layers: BatchNorm's
    backward then took oneDNN's slow mixed-layout path (10x). Now no 4-D gradient leaves channels_last."""
    # a skip merge resized to 1 x 1, then random candidates of both grammars
    phenotypes = [Phenotype.from_text(POOLED_TO_ONE_PIXEL)] + random_phenotypes(60, seed=1)
    grads = []  # (module type, gradient in channels_last?)
    for phenotype in phenotypes:
        net = build_network(phenotype).use_memory_format(torch.channels_last)

        def watch(module, args, out):
            if out.requires_grad and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
                out.register_hook(lambda grad: grads.append(
                    (type(module).__name__, grad.is_contiguous(memory_format=torch.channels_last))))

        for module in net.modules():
            if not list(module.children()):
                module.register_forward_hook(watch)
        x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net(x).float().sum()
        loss.backward()
    wrong = [name for name, ok in grads if not ok]
    assert len(phenotypes) == 121 and len(grads) > 500 and not wrong, (len(grads), wrong)
