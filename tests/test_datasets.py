"""Standard datasets by name, each format made small in the test; one-channel images end to end."""
import gzip
import os
import pickle
import struct

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_GRAMMAR
from nero_deap import ReportSettings, load_model, run_report
from nero_deap.cli import main
from nero_deap.engine.sources import DataError
from nero_deap.engine.datasets import load_raw
from nero_deap.engine.datasets import FASHION_CLASSES, STANDARD_DATASETS


def patterned(n: int, shape: tuple, seed: int) -> tuple:
    """Learnable little images: class c lights up row band c, under noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = rng.integers(0, 60, size=(n,) + shape).astype(np.uint8)
    for i, c in enumerate(y):
        band = slice(c * shape[-2] // 10, (c + 1) * shape[-2] // 10)
        x[i][..., band, :] = 220
    return x, y


def write_cifar100(root, n_train=30, n_test=20):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        x, y = patterned(n, (3, 32, 32), seed)
        batch = {b"data": x.reshape(n, -1), b"fine_labels": [int(v) * 7 for v in y],
                 b"coarse_labels": [int(v) for v in y], b"filenames": [b"img%d.png" % i for i in range(n)],
                 b"batch_label": name.encode()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))  # protocol 2, as the official files
    meta = {b"fine_label_names": [b"label%d" % i for i in range(100)],
            b"coarse_label_names": [b"super%d" % i for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


def write_idx(path, array, gz=False):
    header = b"\0\0\x08" + bytes([array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def write_mnist(root, subdir="MNIST", n_train=60, n_test=20, gz=False):
    raw = root / subdir / "raw"
    raw.mkdir(parents=True)
    suffix = ".gz" if gz else ""
    for split, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        x, y = patterned(n, (28, 28), seed)
        write_idx(raw / f"{split}-images-idx3-ubyte{suffix}", x, gz)
        write_idx(raw / f"{split}-labels-idx1-ubyte{suffix}", y, gz)


def test_cifar100_pickles(tmp_path):
    write_cifar100(tmp_path)
    raw = load_raw(f"cifar100:{tmp_path}")
    assert raw.train_x.shape == (30, 3, 32, 32) and raw.test_x.shape == (20, 3, 32, 32)
    assert raw.train_x.dtype == np.uint8 and len(raw.classes) == 100 and raw.classes[7] == "label7"
    assert raw.train_y.max() == 63 and raw.train_y.dtype == np.int64


class RunsCode:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_cifar_pickles_cannot_run_code(tmp_path, monkeypatch):
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "train").write_bytes(pickle.dumps({b"data": RunsCode()}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="not an official CIFAR-100 python file.*system"):
        load_raw(f"cifar100:{tmp_path}")
    assert not (tmp_path / "pwned").exists()


def test_svhn_mat_files(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    for split, n, seed in (("train", 30, 1), ("test", 20, 2)):
        x, y = patterned(n, (3, 32, 32), seed)
        labels = np.where(y == 0, 10, y).astype(np.uint8)[:, None]  # SVHN writes the digit 0 as 10
        scipy_io.savemat(str(tmp_path / f"{split}_32x32.mat"), {"X": x.transpose(2, 3, 1, 0), "y": labels})
    raw = load_raw(f"svhn:{tmp_path}")
    want_x, want_y = patterned(30, (3, 32, 32), 1)
    np.testing.assert_array_equal(raw.train_x, want_x)
    np.testing.assert_array_equal(raw.train_y, want_y)
    assert raw.test_x.shape == (20, 3, 32, 32) and raw.classes == [str(d) for d in range(10)]


@pytest.mark.parametrize("name, subdir, gz", [("mnist", "MNIST", False), ("fashion-mnist", "FashionMNIST", True)])
def test_mnist_idx_files(name, subdir, gz, tmp_path):
    write_mnist(tmp_path, subdir, gz=gz)
    raw = load_raw(f"{name}:{tmp_path}")
    want_x, want_y = patterned(60, (28, 28), 1)
    np.testing.assert_array_equal(raw.train_x[:, 0], want_x)
    np.testing.assert_array_equal(raw.train_y, want_y)
    assert raw.train_x.shape == (60, 1, 28, 28) and raw.test_x.shape == (20, 1, 28, 28)
    assert raw.classes == (FASHION_CLASSES if name == "fashion-mnist" else [str(d) for d in range(10)])


@pytest.mark.parametrize("name", list(STANDARD_DATASETS))
def test_missing_data_offline_says_what_to_pass(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NERO_DEAP_OFFLINE", "1")
    with pytest.raises(DataError, match=r"is not in .*\(downloads disabled\); pass --data with a directory"):
        load_raw(f"{name}:{tmp_path}")
    assert main(["--grammar", str(TINY_GRAMMAR), "--data", f"{name}:{tmp_path}", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err


def test_one_channel_images_end_to_end(tmp_path, capsys):
    """MNIST-shaped data through the search, the final stage (attacks included) and model export."""
    write_mnist(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["--grammar", str(TINY_GRAMMAR), "--data", f"mnist:{tmp_path / 'data'}", "--population", "4",
                 "--generations", "1", "--epochs", "0.5", "--threads", "1", "--out", str(run)]) == 0
    assert (pd.read_csv(run / "individuals.csv").status == "ok").all()
    assert main(["final", str(run), "--top", "1", "--epochs", "0.5", "--aa-n", "4", "--aa-iterations", "3", "--sweep-n", "10",
                 "--threads", "1", "--device", "cpu"]) == 0
    table = pd.read_csv(run / "final.csv")
    assert list(table["mode"]) == ["search", "standard"] and (table.n_test == 20).all()
    assert table[["clean", "fgsm", "pgd", "autoattack"]].notna().all().all()
    model = load_model(table.model.iloc[-1])
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    plots = run_report(ReportSettings(runs=[run]), echo=lambda line: None)
    assert [p.parent for p in plots] == [run / "report"] * 3


def test_data_pickles_written_by_numpy_1_still_load():
    """The official CIFAR files name numpy.core.multiarray, which numpy 2 keeps as numpy._core."""
    import io

    from nero_deap.engine.sources import _safe_pickle_load

    blob = pickle.dumps({b"data": np.arange(6, dtype=np.uint8).reshape(2, 3)}, protocol=2)
    blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    np.testing.assert_array_equal(_safe_pickle_load(io.BytesIO(blob))[b"data"], np.arange(6).reshape(2, 3))
