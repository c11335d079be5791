"""The masking checks on three models built to mask gradients or not, each a tiny network on synthetic data.

* logits scaled by 1e4: cross-entropy gradients underflow, so FGSM and
  CE-PGD-20 see a robust model while AutoAttack (its DLR-loss attack) does
  not: ``final`` must flag it by comparing them on the same images;
* the input rounded to the 256 pixel levels (shattered gradients): every
  input gradient is exactly zero, which fools the search's margin-PGD audit as
  much as FGSM: the audit must flag it by the zero-gradient share;
* the healthy model itself: flagged by neither.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nero_deap.commands.final import FinalSettings, masking_reasons, robustness_metrics
from nero_deap.engine.attacks import zero_gradient_share
from nero_deap.engine.data import make_splits
from nero_deap.engine.datasets import load_raw
from nero_deap.search import objectives as objs
from nero_deap.search.audit import AuditResult, AuditSettings, judge
from nero_deap.search.objectives import Measure

# Synthetic classes differ by tint and stripes, so a healthy net resists 8/255 (AutoAttack left it at 100%) and
# no masking could show; at 48/255 every attack breaks it, which is what the rules must tell apart.
EPS = 48 / 255


class Healthy(nn.Module):
    """A small convolutional net, normalisation inside, as nero-deap builds them."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(16, 10))

    def forward(self, x):
        return self.body((x - 0.5) / 0.25)


class ScaledLogits(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 1e4


class RoundedInput(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 255) / 255)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = make_splits(load_raw("synthetic:700"), val_size=200, seed=0)
    model = Healthy()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = data.train_x.float() / 255, data.train_y
    for _ in range(12):
        for i in range(0, len(y), 50):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 50]), y[i:i + 50]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(data.val_x.float() / 255).argmax(1) == data.val_y).float().mean() > 0.8  # really trained
    return model, data


class _Ind:
    def __init__(self, values):
        self.fitness = type("F", (), {"values": values})()
        self.meta = {}


def audit(model, data) -> tuple:
    """The search audit's verdict on ``model``: its flag and the values selection would use (as ``flag``)."""
    x, y = data.val_x[:100], data.val_y[:100]
    measure = Measure(x, y, EPS, 100, 0)
    clean, fgsm = objs.measure(objs.parse("clean,fgsm"), model, measure)
    result = AuditResult(objs.get("pgd20").measure(model, measure, {}), zero_gradient_share(model, x, y))
    ind = _Ind((clean, fgsm))
    judge(ind, result, objs.parse("clean,fgsm"), AuditSettings())
    return ind.meta["masking"], result


def final_verdict(model, data) -> tuple:
    settings = FinalSettings(aa_n=12, sweep_n=100, batch_size=100)
    m = robustness_metrics(model, data.test_x[:100], data.test_y[:100], settings, EPS, seed=0)
    return masking_reasons(m, settings.mask_gap), m


def test_the_search_audit_flags_shattered_gradients_and_not_the_healthy_model(trained):
    model, data = trained
    flagged, result = audit(RoundedInput(model), data)
    assert flagged and result.zero_grad == 1.0
    flagged, result = audit(model, data)
    assert not flagged and result.zero_grad == 0.0


def test_final_flags_white_box_numbers_far_above_autoattack(trained):
    model, data = trained
    reasons, m = final_verdict(ScaledLogits(model), data)
    assert m["aa_pgd"] - m["autoattack"] > 0.2  # the masking really happened
    assert any("PGD-20 exceeds AutoAttack" in r for r in reasons), reasons


def test_final_does_not_flag_the_healthy_model(trained):
    model, data = trained
    reasons, m = final_verdict(model, data)
    assert reasons == [], (reasons, m)
