"""Network decoding, data, training, attacks and fitness."""
import io
import json
import os
import pickle
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CIFAR_ZIP
from nero_deap.engine import data as data_mod, datasets as datasets_mod, sources as sources_mod
from nero_deap.engine.attacks import (accuracy_clean_fgsm, accuracy_pgd, attack_mode, clean_and_fgsm_correct, fgsm)
from nero_deap.search.fitness import EvalContext, derive_seed, evaluate, evaluate_phenotype
from nero_deap.space.genotype import init_genotype, to_phenotype
from nero_deap.space.grammar import Grammar
from nero_deap.nets.network import build_network
from nero_deap.space.phenotype import Phenotype
from nero_deap.space.structure import NetworkStructure
from nero_deap.engine.train import Diverged, TrainSettings, train

ROOT = Path(__file__).resolve().parent.parent
SMALL = ("layer:conv num-filters:8 filter-shape:3 stride:1 padding:same act:relu bias:True input:-1 | "
         "layer:pool-max kernel-size:2 stride:2 input:0 | "
         "layer:conv num-filters:16 filter-shape:3 stride:1 padding:same act:relu input:1 | "
         "layer:fc num-units:10 act:softmax input:2 || learning:adam lr:0.003 batch_size:32")


@pytest.fixture(scope="module")
def splits():
    torch.set_num_threads(2)
    return data_mod.make_splits(datasets_mod.load_raw("synthetic"))


@pytest.fixture(scope="module")
def trained(splits):
    p = Phenotype.from_text(SMALL)
    torch.manual_seed(0)
    model = build_network(p, 10, (3, 32, 32), splits.mean, splits.std)
    train(model, p.learning, splits.train_x, splits.train_y, TrainSettings(epochs=4, seed=0))
    return model


# ----------------------------------------------------------------- network
def test_random_phenotypes_all_build_and_run():
    count = 0
    x = torch.rand(2, 3, 32, 32)
    for name, n in [("cnn.grammar", 700), ("fast-denser-cifar10.grammar", 700), ("../tests/tiny.grammar", 300)]:
        g, s = Grammar.from_file(ROOT / "grammars" / name), NetworkStructure()
        rng = random.Random(count)
        for _ in range(n):
            p = to_phenotype(init_genotype(g, s, rng), g, s)
            net = build_network(p).eval()
            with torch.no_grad():
                assert net(x).shape == (2, 10)
            assert net.params > 0 and net.flops >= 0
            count += 1
    assert count == 1700


def test_skip_connections_merge_and_repair():
    p = Phenotype.from_text(
        "layer:conv num-filters:4 filter-shape:3 stride:2 padding:same act:relu input:-1 | "
        "layer:conv num-filters:6 filter-shape:3 stride:1 padding:same act:relu input:0,-1 | "
        "layer:pool-max kernel-size:40 stride:1 padding:valid input:1 | "  # larger than the map: identity
        "layer:fc num-units:5 act:relu input:2,0 | layer:conv num-filters:3 filter-shape:3 input:3 | "
        "layer:fc num-units:99 act:softmax input:4,3 || learning:sgd")
    net = build_network(p, num_classes=7)
    assert net(torch.rand(3, 3, 32, 32)).shape == (3, 7)  # output width = class count, not 99
    assert net.targets[1].c == 4 + 3 and (net.targets[1].h, net.targets[1].w) == (16, 16)
    assert isinstance(net.nodes[2], torch.nn.Identity) and isinstance(net.nodes[4], torch.nn.Identity)
    assert net.targets[3].flat and net.targets[3].c == 6 + 4


def test_flops_and_params_of_a_known_net():
    p = Phenotype.from_text("layer:conv num-filters:8 filter-shape:3 stride:1 padding:same bias:True input:-1 | "
                            "layer:fc num-units:10 input:0 || learning:sgd")
    net = build_network(p)
    assert net.params == (3 * 9 * 8 + 8) + (8 * 10 + 10)
    assert net.flops == 2 * 9 * 3 * 8 * 32 * 32 + 2 * 8 * 10


def test_normalisation_is_inside_the_model(splits):
    net = build_network(Phenotype.from_text(SMALL), mean=splits.mean, std=splits.std)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(net.normalize(x), (x - torch.tensor(splits.mean).view(1, 3, 1, 1))
                          / torch.tensor(splits.std).view(1, 3, 1, 1))


# ----------------------------------------------------------------- attacks
def naive_fgsm(model, x, y, eps):
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    loss.backward()
    return torch.clamp(x + eps * x.grad.sign(), 0.0, 1.0).detach()


def test_fgsm_matches_naive_reference_exactly(trained, splits):
    x = splits.val_x[:64].float() / 255
    y = splits.val_y[:64]
    trained.eval()
    ref = naive_fgsm(trained, x, y, 8 / 255)
    trained.zero_grad(set_to_none=True)
    ours = fgsm(trained, x, y, 8 / 255)
    assert torch.equal(ours, ref)
    clean, adv = clean_and_fgsm_correct(trained, x, y, 8 / 255)
    with torch.no_grad():
        assert clean == int((trained(x).argmax(1) == y).sum())
        assert adv == int((trained(ref).argmax(1) == y).sum())
    assert (ours - x).abs().max() <= 8 / 255 + 1e-6 and ours.min() >= 0 and ours.max() <= 1


def test_pgd_is_stronger_than_fgsm_and_attacks_run_in_eval_mode(trained, splits):
    seen = []
    hook = trained.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    trained.train()
    grad_flags = [p.requires_grad for p in trained.parameters()]
    clean, fg = accuracy_clean_fgsm(trained, splits.val_x, splits.val_y)
    pg = accuracy_pgd(trained, splits.val_x, splits.val_y, steps=10)
    hook.remove()
    assert seen and not any(seen), "attacks must run with the model in eval mode"
    assert trained.training, "train/eval state must be restored"
    assert [p.requires_grad for p in trained.parameters()] == grad_flags
    assert clean > 0.3, "the trained model should have learned the synthetic task"
    assert pg <= fg + 0.02


def test_attack_mode_freezes_parameters(trained):
    with attack_mode(trained):
        assert not any(p.requires_grad for p in trained.parameters())
    assert all(p.requires_grad for p in trained.parameters())


def test_autoattack_runs_on_a_few_examples(trained, splits):
    from nero_deap.engine.attacks import accuracy_autoattack

    lines = []
    res = accuracy_autoattack(trained, splits.val_x, splits.val_y, n=16, seed=0, echo=lines.append, iterations=5)
    assert res["n"] == 16 and 0 <= res["autoattack"] <= res["whitebox"] <= res["clean"] <= 1
    survivors = round(res["whitebox"] * 16)  # progress after each attack: what it left standing
    assert [line.split(":")[0].strip() for line in lines] == [f"AutoAttack {a}" for a in
                                                              ("apgd-ce", "apgd-t", "fab-t", "square")]
    assert lines[2].strip().startswith(f"AutoAttack fab-t: {survivors} of 16 still correct")


def test_autoattack_expected_time_counts_its_passes(trained, splits):
    from nero_deap.engine.attacks import autoattack_seconds, pass_seconds

    gradient, forward = pass_seconds(trained, splits.val_x, splits.val_y)
    assert 0 < forward < gradient < 1
    assert autoattack_seconds((1e-3, 1e-4), 100, survivors=0.0) == pytest.approx(100 * 100 * 1e-3)  # APGD-CE only
    assert autoattack_seconds((1e-3, 1e-4), 100, survivors=0.5) == pytest.approx(10 + 50 * (2.7 + 0.5))
    # a reduced run (5 iterations, 2 targets, 50 queries) and a 3-class set (2 targets) cost less
    assert autoattack_seconds((1e-3, 1e-4), 100, 1.0, iterations=5) == pytest.approx(
        100 * (5 + 10 + 20) * 1e-3 + 100 * 50 * 1e-4)
    assert autoattack_seconds((1e-3, 1e-4), 100, 1.0, classes=3) == pytest.approx(
        100 * (100 + 200 + 400) * 1e-3 + 100 * 5000 * 1e-4)


# ----------------------------------------------------------------- training
def test_training_is_deterministic_on_cpu(splits):
    p = Phenotype.from_text(SMALL)
    outs = []
    for _ in range(2):
        torch.manual_seed(1)
        m = build_network(p, mean=splits.mean, std=splits.std)
        train(m, p.learning, splits.train_x, splits.train_y, TrainSettings(epochs=1, seed=5))
        outs.append(torch.cat([q.detach().flatten() for q in m.parameters()]))
    assert torch.equal(outs[0], outs[1])


def test_divergence_is_detected(splits):
    p = Phenotype.from_text(SMALL.replace("learning:adam lr:0.003", "learning:gradient-descent lr:1e30 momentum:0.9"))
    m = build_network(p, mean=splits.mean, std=splits.std)
    with pytest.raises(Diverged):
        train(m, p.learning, splits.train_x, splits.train_y, TrainSettings(epochs=2))


def test_weights_broken_by_the_last_step_count_as_divergence(splits, monkeypatch):
    """The loss is checked before each step; a last step that breaks the weights left a network whose file
    final then refused (the whole final stopped over one candidate)."""
    import nero_deap.engine.train as train_module

    real = train_module.make_optimizer

    def breaking_optimizer(params, learning):
        optimizer = real(params, learning)
        optimizer.register_step_post_hook(lambda opt, *_: opt.param_groups[0]["params"][0].data.fill_(float("nan")))
        return optimizer

    monkeypatch.setattr(train_module, "make_optimizer", breaking_optimizer)
    p = Phenotype.from_text(SMALL)  # batch_size:32: 32 images are one step, the last
    m = build_network(p, mean=splits.mean, std=splits.std)
    with pytest.raises(Diverged, match="non-finite weights after step 1"):
        train(m, p.learning, splits.train_x[:32], splits.train_y[:32], TrainSettings(epochs=1))


def test_adversarial_training_modes_run(splits):
    p = Phenotype.from_text(SMALL)
    for mode in ("fgsm-rs", "pgd"):
        m = build_network(p, mean=splits.mean, std=splits.std)
        r = train(m, p.learning, splits.train_x[:64], splits.train_y[:64],
                  TrainSettings(epochs=1, adv=mode, pgd_steps=2))
        assert r.steps == 2


# ----------------------------------------------------------------- fitness
def ctx(**kw):
    return EvalContext(str(ROOT / "tests" / "tiny.grammar"), json.dumps(NetworkStructure().to_config()),
                       data="synthetic", epochs=1, threads=1, **kw)


def test_failures_give_zero_fitness_with_reason():
    bad = Phenotype.from_text("layer:warp-drive input:-1 | layer:fc num-units:10 input:0 || learning:sgd")
    fit, meta = evaluate_phenotype(bad, ctx(), seed=1)
    assert fit == (0.0, 0.0) and meta["status"] == "invalid" and "warp-drive" in meta["reason"]
    nan = Phenotype.from_text(SMALL.replace("learning:adam lr:0.003", "learning:sgd lr:1e30"))
    fit, meta = evaluate_phenotype(nan, ctx(), seed=1)
    assert fit == (0.0, 0.0) and meta["status"] == "diverged"


def test_evaluate_attaches_metadata_and_is_seeded():
    g, s = Grammar.from_file(ROOT / "tests" / "tiny.grammar"), NetworkStructure()
    ind = init_genotype(g, s, random.Random(0))
    ind.id = 12
    a = evaluate(ind, ctx())
    assert set(ind.meta) >= {"params", "flops", "epochs", "train_s", "status", "reason"}
    assert ind.meta["status"] == "ok" and all(0 <= v <= 1 for v in a)
    assert evaluate(ind, ctx()) == a
    assert derive_seed(0, 12) != derive_seed(1, 12) != derive_seed(0, 13)


# ----------------------------------------------------------------- data
def test_stratified_split_is_deterministic_and_balanced():
    y = np.repeat(np.arange(10), 100)
    tr, va = data_mod.stratified_split(y, 200, seed=3)
    assert len(va) == 200 and np.all(np.bincount(y[va]) == 20)
    assert not set(tr) & set(va) and len(tr) + len(va) == 1000
    assert np.array_equal(va, data_mod.stratified_split(y, 200, seed=3)[1])


def test_augment_keeps_shape_and_content(splits):
    gen = torch.Generator().manual_seed(0)
    x = splits.train_x[:8]
    out = data_mod.augment(x, gen)
    assert out.shape == x.shape and out.dtype == torch.uint8
    gen2 = torch.Generator().manual_seed(0)
    assert torch.equal(out, data_mod.augment(x, gen2))
    zero = data_mod.augment(x, torch.Generator().manual_seed(1), pad=0)
    assert all(torch.equal(z, a) or torch.equal(z, a.flip(2)) for z, a in zip(zero, x))


def _png(color):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_zip_loader_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NERO_DEAP_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in (("train", 3), ("test", 2)):
            for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
                for i in range(n):
                    zf.writestr(f"root/{split}/{cls}/{i}.png", _png(color))
        zf.writestr("root/README.txt", "not an image")
    raw = datasets_mod.load_raw(str(path))
    assert raw.classes == ["cat", "dog"] and raw.train_x.shape == (6, 3, 8, 8) and raw.test_x.shape == (4, 3, 8, 8)
    assert raw.train_x[raw.train_y == 0][:, 0].min() == 255 and raw.train_x[raw.train_y == 1][:, 2].min() == 255
    assert len(list((tmp_path / "cache").iterdir())) == 1
    again = datasets_mod.load_raw(str(path))  # from the .npy cache
    assert np.array_equal(again.train_x, raw.train_x) and again.classes == raw.classes


def test_official_cifar_format_and_offline_message(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane", b"automobile", b"bird", b"cat"]}, f)
    raw = datasets_mod.load_raw(f"cifar10:{tmp_path}")
    assert raw.train_x.shape == (20, 3, 32, 32) and raw.classes[1] == "automobile"
    assert datasets_mod.load_raw(str(tmp_path)).train_x.shape == (20, 3, 32, 32)
    monkeypatch.setenv("NERO_DEAP_OFFLINE", "1")
    with pytest.raises(sources_mod.DataError, match="--data"):
        datasets_mod.load_raw(f"cifar10:{tmp_path / 'empty'}")


@pytest.mark.skipif(not CIFAR_ZIP.exists(), reason="set NERO_DEAP_CIFAR10_ZIP to the CIFAR-10 JPEG zip to run this test")
def test_real_cifar_zip_slice():
    with zipfile.ZipFile(CIFAR_ZIP) as zf:
        entries = sources_mod._split_entries(zf.namelist())
        assert len(entries["train"]) == 50000 and len(entries["test"]) == 10000
        assert sorted({c for c, _ in entries["train"]})[:2] == ["airplane", "automobile"]
        for cls, name in entries["train"][::5000]:
            assert sources_mod._decode(zf.read(name)).shape == (32, 32, 3)


def test_subsets_have_the_requested_sizes_and_stay_disjoint():
    raw = datasets_mod.load_raw("synthetic")
    s = data_mod.make_splits(raw, val_size=100, train_subset=200, test_subset=50)
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (200, 100, 50)
    assert torch.all(torch.bincount(s.train_y) == 20) and torch.all(torch.bincount(s.test_y) == 5)
    full = data_mod.make_splits(raw, val_size=100)
    assert torch.equal(full.val_x, s.val_x)  # subsetting train never changes validation
    train_rows = {bytes(x.numpy()) for x in s.train_x}
    assert not train_rows & {bytes(x.numpy()) for x in s.val_x}


def test_first_test_images_are_a_fair_sample_even_when_the_source_is_class_sorted():
    raw = datasets_mod.load_raw("synthetic")
    order = np.argsort(raw.test_y, kind="stable")  # class by class, like an image folder
    raw.test_x, raw.test_y = raw.test_x[order], raw.test_y[order]
    s = data_mod.make_splits(raw)
    assert len(torch.unique(s.test_y[:30])) >= 5
    assert torch.equal(s.test_y, data_mod.make_splits(raw).test_y)  # deterministic
    assert sorted(s.test_y.tolist()) == sorted(raw.test_y.tolist())


def test_freed_memory_is_kept_once_per_process_unless_the_user_chose():
    """glibc keeps freed blocks for reuse (nero_deap.engine.memory: page faults cost the CPU engine ~40%)."""
    import platform

    code = "from nero_deap.engine.memory import keep_freed_memory as k; print(k(), k())"
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    expected = "True True" if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" else "False False"
    assert done.stdout.strip() == expected, done.stderr
    mine = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "MALLOC_MMAP_MAX_": "65536"},
                          capture_output=True, text=True, timeout=60)
    assert mine.stdout.strip() == "False False", mine.stderr


def test_a_checkpointed_training_goes_on_from_any_snapshot_exactly(splits):
    """final's long trainings write snapshots as they go; one killed after a snapshot continues from it to the
    very weights an uninterrupted training reaches (on the CPU), and the snapshots do not change the training."""
    p = Phenotype.from_text(SMALL)
    x, y = splits.train_x[:256], splits.train_y[:256]

    def fresh():
        torch.manual_seed(3)
        return build_network(p, mean=splits.mean, std=splits.std)

    plain = fresh()
    train(plain, p.learning, x, y, TrainSettings(epochs=2, seed=4))
    snapshots = []
    watched = fresh()
    train(watched, p.learning, x, y, TrainSettings(epochs=2, seed=4, checkpoint_seconds=0),
          checkpoint=lambda blob, step, total, loss, seconds: snapshots.append((step, total, blob)))
    assert [s for s, _, _ in snapshots] == list(range(1, 17)) and snapshots[0][1] == 16  # every step, the last too
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), watched.state_dict().values()))
    # mid-epoch, at epoch 1's end, one step before the end, and the finished training's
    for step, _, blob in (snapshots[0], snapshots[7], snapshots[-2], snapshots[-1]):
        resumed, more = fresh(), []
        result = train(resumed, p.learning, x, y, TrainSettings(epochs=2, seed=4, checkpoint_seconds=3600),
                       resume=blob, checkpoint=lambda *args: more.append(args[1]))
        assert result.steps == 16 and result.snapshot is None
        assert more == ([] if step == 16 else [16])  # a finished training's snapshot is not written again
        assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), resumed.state_dict().values())), step


def test_autoattack_runs_on_a_set_with_fewer_classes_than_its_targets():
    """APGD-T and FAB-T aim at 9 runner-up classes: on a 5-class image folder they once failed with an
    IndexError inside pyautoattack and final died with a traceback; below 4 classes (which its targeted DLR
    loss needs) AutoAttack is refused in one line."""
    from nero_deap.common.errors import ConfigError
    from nero_deap.engine.attacks import accuracy_autoattack

    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    for classes in (5, 2):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, classes))
        y = model(x.float() / 255).argmax(1)  # every image correct, so every attack runs
        if classes == 5:
            res = accuracy_autoattack(model, x, y, n=4, seed=0)
            assert res["n"] == 4 and res["clean"] == 1.0 and 0 <= res["autoattack"] <= 1
        else:
            with pytest.raises(ConfigError, match="AutoAttack needs at least 4 classes"):
                accuracy_autoattack(model, x, y, n=4, seed=0, iterations=2)
