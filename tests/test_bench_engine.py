"""bench/bench_engine.py's interleaved share (issue #12): the limit timed in slices between training steps.

The measurement must not change what it measures (the slices draw no random numbers and touch no weight, so
the trained weights equal an untouched run's), must run one slice per step, and must report the share it
computed from those parts.
"""
import importlib.util
import re

import pandas
import pytest
import torch

from conftest import ROOT
from nero_deap.engine.sources import synthetic
from nero_deap.engine.data import make_splits
from nero_deap.space.phenotype import Phenotype

SMALL = ("layer:conv num-filters:8 filter-shape:3 stride:1 padding:same act:relu bias:False batch-norm:True input:-1 |"
         " layer:pool-max kernel-size:2 stride:2 padding:valid input:0 |"
         " layer:conv num-filters:16 filter-shape:3 stride:2 padding:same act:relu bias:True batch-norm:False input:1 |"
         " layer:dropout rate:0.3 input:2 |"  # draws from the global RNG: a slice that drew too would show
         " layer:fc act:softmax num-units:10 bias:True input:3 ||"
         " learning:gradient-descent lr:0.05 momentum:0.9 nesterov:True decay:0.0005 batch_size:64")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "bench" / "bench_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interleaved_share_leaves_training_as_it_was_and_slices_once_per_step(bench, capsys, monkeypatch,
                                                                                tmp_path):
    splits = make_splits(synthetic(n_train=300, n_test=20), val_size=20)
    phenotype = Phenotype.from_text(SMALL)
    reference = bench.fresh_model(phenotype, splits, "cpu")
    untouched = bench.fresh_model(phenotype, splits, "cpu")
    bench.time_engine(untouched, phenotype, splits, epochs=2, fast=False)

    trained, calls = [], []
    real_time_engine, real_call = bench.time_engine, bench.ConvSlices.__call__
    monkeypatch.setattr(bench, "time_engine", lambda model, *a: (trained.append(model), real_time_engine(model, *a))[1])
    monkeypatch.setattr(bench.ConvSlices, "__call__", lambda self: (calls.append(1), real_call(self))[1])
    csv = tmp_path / "steps.csv"
    shares = bench.interleaved_shares(phenotype, reference, splits, splits, 64, "cpu", False, rounds=1, epochs=2,
                                      csv_path=str(csv))

    for a, b in zip(trained[0].state_dict().values(), untouched.state_dict().values()):
        assert torch.equal(a, b)
    steps = 2 * -(-len(splits.train_y) // 64)  # 280 images, batch 64: 5 steps an epoch (the last of 24)
    assert len(calls) == 3 + steps  # 3 warm-up slices, then one before every step
    out = capsys.readouterr().out
    assert len(shares) == 1 and 0 < shares[0]
    assert re.search(rf"= {shares[0]:.0%}; outside convolutions \d+\.\d\d ms per image", out), out
    rows = pandas.read_csv(csv)  # every step but the last, whose time has no mark after it
    assert len(rows) == steps - 1 and rows["images"].sum() == 2 * len(splits.train_y) - 24
    recomputed = (rows.flops_per_image * rows.images).sum() / rows.engine_s.sum() / (
        rows.slice_flops.sum() / rows.slice_s.sum())
    assert recomputed == pytest.approx(shares[0], rel=1e-9)
    assert (tmp_path / "steps.png").stat().st_size > 0


def test_each_step_gets_its_own_slice_and_none_of_the_hooks_time(bench, monkeypatch, tmp_path):
    """A fake slice that takes 100 s on the benchmark's clock and adds k seconds on its k-th call: every
    step's engine time must stay far under 100 s (the hook's time is not the engine's), and step j's row
    must hold slice j's seconds."""
    import time
    import types

    later = [0.0]  # what the fake slices add to the benchmark's clock
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + later[0]))

    def fake(self) -> None:
        later[0] += 100.0
        self.calls_made = getattr(self, "calls_made", 0) + 1
        self.flops, self.seconds = self.flops + 1.0, self.seconds + self.calls_made

    monkeypatch.setattr(bench.ConvSlices, "__call__", fake)
    splits = make_splits(synthetic(n_train=300, n_test=20), val_size=20)
    phenotype = Phenotype.from_text(SMALL)
    csv = tmp_path / "steps.csv"
    bench.interleaved_shares(phenotype, bench.fresh_model(phenotype, splits, "cpu"), splits, splits, 64, "cpu",
                             False, rounds=1, epochs=2, csv_path=str(csv))
    rows = pandas.read_csv(csv)
    assert (rows.engine_s < 50).all(), rows.engine_s.tolist()
    assert rows.slice_s.tolist() == [3 + j for j in range(1, len(rows) + 1)]  # after the 3 warm-up calls
    assert (rows.slice_flops == 1).all()


def test_a_round_of_one_step_is_refused_with_a_message(bench):
    splits = make_splits(synthetic(n_train=60, n_test=20), val_size=20)
    phenotype = Phenotype.from_text(SMALL)
    with pytest.raises(SystemExit, match="at least two training steps"):
        bench.interleaved_shares(phenotype, bench.fresh_model(phenotype, splits, "cpu"), splits, splits, 64, "cpu",
                                 False, rounds=1, epochs=1)
