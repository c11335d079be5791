"""Crafted files must not run code: checkpoints and official CIFAR-10 batches load through a restricted unpickler."""
import io
import os
import pickle

import numpy as np
import pytest

from nero_deap.cli import main
from nero_deap.engine.sources import DataError
from nero_deap.engine.datasets import load_raw
from nero_deap.store.logbook import CheckpointError, load_checkpoint
from test_resume_integrity import BASE, fake_evaluate, one_error_line  # noqa: F401 - fixture


class RunsCommand:
    """Unpickling this calls ``os.system``: the classic hostile pickle."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class Indirect:
    """The same through ``builtins.eval``, a global a filter by module name alone might let through."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return eval, (f"__import__('os').system({self.command!r})",)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "a crafted file ran code"


def hostile_payloads(marker):
    import torch

    command = f"touch {marker}"
    inner = io.BytesIO()
    torch.save(RunsCommand(command), inner, _use_new_zipfile_serialization=False)

    class NestedTorchLoad:  # what torch.storage._load_from_bytes would have unpickled without weights_only
        def __reduce__(self):
            import torch.storage

            return torch.storage._load_from_bytes, (inner.getvalue(),)

    class FakeCreatorClass:  # deap's creator.meta_create with a name nero-deap never creates
        def __reduce__(self):
            from deap import creator

            return creator.meta_create, ("Evil", object, {"__init__": os.system})

    return {"os.system": RunsCommand(command), "eval": Indirect(command), "nested torch.load": NestedTorchLoad(),
            "meta_create": FakeCreatorClass()}


@pytest.mark.parametrize("kind", ["os.system", "eval", "nested torch.load", "meta_create"])
def test_hostile_checkpoint_is_refused_without_running_code(tmp_path, fake_evaluate, marker, kind, capsys):
    run = tmp_path / "run"
    assert main(BASE + ["--generations", "1", "--out", str(run)]) == 0
    checkpoint = run / "checkpoint.pkl"
    state = load_checkpoint(checkpoint)
    state["logbook"].append(hostile_payloads(marker)[kind])  # an otherwise valid checkpoint, as in the report
    checkpoint.write_bytes(pickle.dumps(state))
    config = (run / "config.toml").read_bytes()
    capsys.readouterr()
    assert main(["--resume", str(run), "--generations", "2"]) == 2  # no fallback to checkpoint.prev.pkl either
    err = one_error_line(capsys)
    assert err.startswith(f"error: {checkpoint}: ")
    assert (run / "config.toml").read_bytes() == config and len((run / "gens.csv").read_text().splitlines()) == 3
    with pytest.raises(CheckpointError):
        load_checkpoint(checkpoint)


def test_bare_hostile_pickle_named_checkpoint(tmp_path, marker):
    path = tmp_path / "checkpoint.pkl"
    path.write_bytes(pickle.dumps(RunsCommand(f"touch {marker}")))
    with pytest.raises(CheckpointError, match=r"refers to posix\.system"):
        load_checkpoint(path)


# ------------------------------------------------------------------ CIFAR-10 python batches
def write_batches(root, data_batch_1=None, rename_numpy_module=False):
    """A tiny dataset in the official format: dicts with bytes keys, uint8 data rows of 3072, label lists."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def dump(obj):
        blob = pickle.dumps(obj, protocol=2)
        # the official files were written by Python 2's numpy, which named numpy.core.multiarray
        return blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray") if rename_numpy_module else blob

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, 6)],
                 b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * 6}
        (folder / name).write_bytes(dump(batch))
    (folder / "batches.meta").write_bytes(dump({b"label_names": [f"c{i}".encode() for i in range(10)],
                                                b"num_cases_per_batch": 6, b"num_vis": 3072}))
    if data_batch_1 is not None:
        (folder / "data_batch_1").write_bytes(data_batch_1)
    return folder


@pytest.mark.parametrize("rename", [False, True])
def test_official_cifar_batches_still_load(tmp_path, rename):
    write_batches(tmp_path, rename_numpy_module=rename)
    raw = load_raw(f"cifar10:{tmp_path}")
    assert raw.train_x.shape == (30, 3, 32, 32) and raw.train_x.dtype == np.uint8 and raw.test_y.shape == (6,)
    assert raw.classes == [f"c{i}" for i in range(10)]


@pytest.mark.parametrize("payload", ["os.system", "eval"])
def test_hostile_cifar_batch_is_refused_without_running_code(tmp_path, marker, payload, monkeypatch, capsys):
    monkeypatch.setenv("NERO_DEAP_OFFLINE", "1")
    hostile = {"os.system": RunsCommand, "eval": Indirect}[payload](f"touch {marker}")
    folder = write_batches(tmp_path / "data", pickle.dumps({b"data": hostile, b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="data_batch_1: not an official CIFAR-10 python batch"):
        load_raw(f"cifar10:{tmp_path / 'data'}")
    assert main(BASE[:2] + ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")]) == 2
    assert str(folder / "data_batch_1") in one_error_line(capsys)


def test_truncated_cifar_batch_is_one_line(tmp_path):
    folder = write_batches(tmp_path)
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:500])
    with pytest.raises(DataError, match="test_batch: not an official CIFAR-10 python batch"):
        load_raw(f"cifar10:{tmp_path}")
