"""The GPU code paths: emulated on the CPU everywhere, run for real where CUDA exists.

The accelerated training path (bf16 autocast + channels_last) is the same
code on any device, so ``accelerate=True`` runs it on the CPU; out-of-memory
handling and GPU slot claiming are driven with stand-ins for ``torch.cuda``.
The ``cuda`` tests at the bottom are skipped on machines without a GPU (CI);
run ``python -m pytest tests/test_device_paths.py`` on a GPU host.
"""
import json
import os

import pytest
import torch
from torch import nn

from conftest import ROOT
from nero_deap.search import parallel
from nero_deap.engine import train as train_module
from nero_deap.engine.attacks import accuracy_clean_fgsm
from nero_deap.engine.datasets import load_raw
from nero_deap.engine.data import make_splits
from nero_deap.search.fitness import EvalContext, evaluate_phenotype
from nero_deap.nets.network import build_network
from nero_deap.space.phenotype import Phenotype
from nero_deap.space.structure import NetworkStructure
from nero_deap.engine.train import TrainSettings, accelerated, train

SMALL = ("layer:conv num-filters:8 filter-shape:3 stride:1 padding:same act:relu batch-norm:True input:-1 | "
         "layer:pool-max kernel-size:2 stride:2 input:0 | "
         "layer:conv num-filters:16 filter-shape:3 stride:1 padding:same act:relu input:1 | "
         "layer:fc num-units:10 act:softmax input:2 || learning:adam lr:0.003 batch_size:32")
CHANCE = 0.1
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def splits():
    torch.set_num_threads(2)
    return make_splits(load_raw("synthetic"))


def ctx(**kw):
    return EvalContext(str(ROOT / "tests" / "tiny.grammar"), json.dumps(NetworkStructure().to_config()),
                       data="synthetic", epochs=1, threads=1, **kw)


def record_conv_dtypes(model: nn.Module) -> list:
    """(training?, output dtype) of every call of the first conv layer."""
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.register_forward_hook(lambda module, args, out: seen.append((module.training, out.dtype)))
    return seen


def train_small(splits, device: str = "cpu", **settings) -> tuple:
    torch.manual_seed(0)
    data = splits.to(device)
    model = build_network(Phenotype.from_text(SMALL), mean=data.mean, std=data.std).to(device)
    seen = record_conv_dtypes(model)
    train(model, Phenotype.from_text(SMALL).learning, data.train_x, data.train_y,
          TrainSettings(epochs=3, seed=0, **settings))
    return model, seen, data


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


# ------------------------------------------------------- emulated on the CPU
def test_acceleration_defaults_to_cuda_only():
    assert accelerated(TrainSettings(), torch.device("cuda:0"))
    assert not accelerated(TrainSettings(), torch.device("cpu"))
    assert accelerated(TrainSettings(accelerate=True), torch.device("cpu"))
    assert not accelerated(TrainSettings(accelerate=False), torch.device("cuda:0"))


def test_accelerated_path_trains_in_bf16_channels_last_and_attacks_in_float32(splits):
    model, seen, data = train_small(splits, accelerate=True)
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a bf16 model
    assert first_conv(model).weight.is_contiguous(memory_format=torch.channels_last)
    seen.clear()
    clean, fgsm = accuracy_clean_fgsm(model, data.val_x, data.val_y)
    assert seen and {dtype for _, dtype in seen} == {torch.float32} and not any(t for t, _ in seen)
    assert clean > 2 * CHANCE and 0 <= fgsm <= clean


def test_plain_path_stays_float32(splits):
    model, seen, _ = train_small(splits, accelerate=False)
    assert seen and {dtype for _, dtype in seen} == {torch.float32}
    assert not first_conv(model).weight.is_contiguous(memory_format=torch.channels_last)


def test_accelerated_adversarial_training_runs(splits):
    p = Phenotype.from_text(SMALL)
    for mode in ("fgsm-rs", "pgd"):
        model = build_network(p, mean=splits.mean, std=splits.std)
        result = train(model, p.learning, splits.train_x[:64], splits.train_y[:64],
                       TrainSettings(epochs=1, adv=mode, pgd_steps=2, accelerate=True))
        assert result.steps == 2 and result.final_loss == result.final_loss  # finite, not NaN


def test_the_search_setting_reaches_training(monkeypatch):
    seen = []
    real_train = train_module.train

    def spy(model, learning, x, y, settings, resume=None):
        seen.append(settings.accelerate)
        return real_train(model, learning, x, y, settings, resume)

    monkeypatch.setattr(train_module, "train", spy)
    for flag in (True, None):
        fitness, meta = evaluate_phenotype(Phenotype.from_text(SMALL), ctx(accelerate=flag), seed=1)
        assert meta["status"] == "ok"
    assert seen == [True, None]


def test_out_of_memory_is_a_failed_candidate_and_the_cache_is_freed(monkeypatch):
    freed = []

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "train", out_of_memory)
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "empty_cache", lambda: freed.append(True))
        fitness, meta = evaluate_phenotype(Phenotype.from_text(SMALL), ctx(device="cpu"), seed=1)
    assert fitness == (0.0, 0.0) and meta["status"] == "oom" and meta["reason"] == "out of memory"
    assert meta["params"] > 0 and freed == [True]
    fitness, meta = evaluate_phenotype(Phenotype.from_text(SMALL), ctx(device="cpu"), seed=1)
    assert meta["status"] == "ok"  # the worker carries on with the next candidate


def test_gpu_slots_go_one_worker_per_slot(monkeypatch, tmp_path):
    monkeypatch.setenv("NERO_DEAP_LOCKS", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)  # tests/test_gpu_ready.py checks it
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, device: None)  # and this
    handles = []

    def new_worker(workers_per_gpu: int) -> str:
        """What a fresh worker process would claim (flock treats each open() independently)."""
        monkeypatch.setattr(parallel, "_claimed", None)
        monkeypatch.setattr(parallel, "_slot_handle", None)
        device = parallel.claim_device("auto", workers_per_gpu)
        handles.append(parallel._slot_handle)
        return device

    try:
        assert [new_worker(2) for _ in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
        assert new_worker(2) == f"cuda:{os.getpid() % 2}"  # more workers than slots: share
        handles[1].close()  # the worker on cuda:1, slot 0 dies
        assert new_worker(2) == "cuda:1"
        assert parallel.claim_device("auto", 2) == "cuda:1"  # claimed once per process
        assert parallel.claim_device("cpu") == "cpu"  # an explicit device is never overridden
    finally:
        for handle in handles:
            if handle is not None:
                handle.close()


# ----------------------------------------------------------- on a real GPU
@cuda_only
def test_cuda_training_is_accelerated_with_gpu_resident_uint8_data(splits):
    model, seen, data = train_small(splits, device="cuda")
    assert data.train_x.is_cuda and data.train_x.dtype == torch.uint8
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    assert first_conv(model).weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.backends.cudnn.benchmark
    clean, fgsm = accuracy_clean_fgsm(model, data.val_x, data.val_y)
    cpu_model, _, cpu_data = train_small(splits, accelerate=False)
    cpu_clean, _ = accuracy_clean_fgsm(cpu_model, cpu_data.val_x, cpu_data.val_y)
    assert clean > 2 * CHANCE and 0 <= fgsm <= clean
    assert abs(clean - cpu_clean) < 0.15  # same recipe, different numerics: close, not equal


@cuda_only
def test_cuda_attack_agrees_with_cpu(splits):
    model, _, data = train_small(splits, accelerate=False)
    cpu = accuracy_clean_fgsm(model.eval(), data.val_x, data.val_y)
    gpu_data = splits.to("cuda")
    gpu = accuracy_clean_fgsm(model.to("cuda"), gpu_data.val_x, gpu_data.val_y)
    n = len(data.val_y)
    assert abs(cpu[0] - gpu[0]) <= 2 / n and abs(cpu[1] - gpu[1]) <= 4 / n  # TF32 may flip a near-tie


@cuda_only
def test_cuda_out_of_memory_is_caught_and_memory_returned():
    # the widest conv the decoder allows (network.MAX_WIDTH): about 15 GiB of activations at this batch, which
    # the cap below (2 GiB over what is held) cannot give on any GPU; wider would be "invalid", not "oom"
    huge = Phenotype.from_text("layer:conv num-filters:16384 filter-shape:3 stride:1 padding:same act:relu "
                               "input:-1 | layer:fc num-units:10 input:0 || learning:sgd batch_size:512")
    small = Phenotype.from_text(SMALL)
    evaluate_phenotype(small, ctx(device="cuda"), seed=1)  # data now cached on the GPU
    baseline = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + 2**31) / total))
    try:
        fitness, meta = evaluate_phenotype(huge, ctx(device="cuda"), seed=1)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert fitness == (0.0, 0.0) and meta["status"] == "oom", meta
    assert torch.cuda.memory_allocated() <= baseline + 1_000_000
    fitness, meta = evaluate_phenotype(small, ctx(device="cuda"), seed=1)
    assert meta["status"] == "ok" and fitness[0] > CHANCE
    assert torch.cuda.memory_allocated() <= baseline + 1_000_000
