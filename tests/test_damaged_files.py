"""Damaged files a run depends on: the CSV tables a ``--resume`` meets, and the ``.npy`` cache of decoded images.

The checkpoint is the source of truth for the tables: gens.csv is rebuilt whole from its logbook; individuals.csv
keeps its readable rows, gets the checkpoint's (population and archive) back, and says how many rows neither
holds.  A data cache that fails its checks (manifest SHA-256s, dtypes, shapes, label range) is rebuilt from the
source with one warning naming the folder; a full disk while caching leaves no temporary folder behind.
A stand-in evaluation (a hash of the phenotype, no training) keeps the search tests fast."""
import errno
import hashlib
import io
import json
import pickle
import re
import warnings

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_GRAMMAR, without_timing
from nero_deap.cli import main
from nero_deap.commands import search
from nero_deap.engine import sources
from nero_deap.engine.sources import DataError
from nero_deap.search.fitness import grammar_and_structure
from nero_deap.space.genotype import to_phenotype
from nero_deap.store.logbook import load_checkpoint, save_checkpoint

BASE = ["--grammar", str(TINY_GRAMMAR), "--data", "synthetic:40", "--population", "8", "--epochs", "1",
        "--threads", "1", "--seed", "5"]


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A finished 3-generation run and one stopped after generation 2, with a stand-in evaluation."""
    def evaluate(individual, ctx):
        grammar, structure = grammar_and_structure(ctx)
        digest = hashlib.sha256(to_phenotype(individual, grammar, structure).to_text().encode()).digest()
        meta = {"params": 1, "flops": 1, "epochs": 1.0, "train_s": 0.0, "status": "ok", "reason": "", "eval_s": 0.0}
        if ctx.return_weights:
            meta["weights"] = b"w" * 64
        return (digest[0] / 255, digest[0] * digest[1] / 255 ** 2), meta

    monkeypatch.setattr(search, "evaluate_remote", evaluate)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(BASE + ["--generations", "3", "--out", str(full)]) == 0
    assert main(BASE + ["--generations", "2", "--out", str(part)]) == 0
    return full, part


def table(run_dir, name):
    return without_timing(pd.read_csv(run_dir / name))


def resume(part, capsys) -> str:
    capsys.readouterr()
    code = main(["--resume", str(part), "--generations", "3"])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err, out + err
    return out


def damage(path, how: str) -> None:
    blob = path.read_bytes()
    lines = blob.splitlines(keepends=True)
    path.write_bytes({
        "random": np.random.default_rng(3).integers(0, 256, len(blob), dtype=np.uint8).tobytes(),
        "empty": b"",
        "header only": lines[0],
        "half": blob[: len(blob) // 2],
        "garbage inside": blob[:len(blob) // 3] + b"\xff\xfe\x00\x81 garbage \x00" * 4 + blob[len(blob) // 2:],
    }[how])


# ------------------------------------------------------------------ gens.csv: rebuilt whole from the logbook
@pytest.mark.parametrize("how", ["random", "empty", "header only", "half", "garbage inside", "deleted"])
def test_damaged_gens_csv_is_rebuilt_from_the_checkpoint(runs, how, capsys):
    full, part = runs
    if how == "deleted":
        (part / "gens.csv").unlink()
    else:
        damage(part / "gens.csv", how)
    out = resume(part, capsys)
    lines = [line for line in out.splitlines() if "gens.csv" in line]
    assert len(lines) == 1 and f"{part / 'gens.csv'}:" in lines[0] and "rebuilt from checkpoint.pkl" in lines[0]
    pd.testing.assert_frame_equal(table(part, "gens.csv"), table(full, "gens.csv"))  # no row lost
    pd.testing.assert_frame_equal(table(part, "individuals.csv"), table(full, "individuals.csv"))


def test_gens_csv_that_cannot_be_rebuilt_is_one_line_and_exit_2(runs, capsys):
    """A logbook without generation rows (an edited checkpoint) cannot stand in for a damaged gens.csv."""
    _, part = runs
    state = load_checkpoint(part / "checkpoint.pkl")
    save_checkpoint(part / "checkpoint.pkl", {**state, "logbook": [1, 2, 3]})
    damage(part / "gens.csv", "random")
    capsys.readouterr()
    assert main(["--resume", str(part), "--generations", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{part / 'gens.csv'}: damaged" in err and "cannot rebuild it" in err


# ------------------------------------------------------------------ individuals.csv: kept, restored, lost counted
@pytest.mark.parametrize("how", ["random", "empty", "header only", "half", "garbage inside", "deleted"])
def test_damaged_individuals_csv_keeps_what_it_can_and_counts_the_rest(runs, how, capsys):
    full, part = runs
    path = part / "individuals.csv"
    if how == "deleted":
        path.unlink()
    else:
        damage(path, how)
    damaged = path.read_bytes() if path.exists() else b""
    out = resume(part, capsys)
    lines = [line for line in out.splitlines() if "individuals.csv" in line]
    assert len(lines) == 1 and f"{path}:" in lines[0] and "rebuilt" in lines[0], out
    got, want = table(part, "individuals.csv"), table(full, "individuals.csv")
    by_id = want.set_index("id")
    for _, row in got.iterrows():  # every row there is the uninterrupted run's row of that id
        pd.testing.assert_series_equal(row.drop("id"), by_id.loc[row["id"]], check_names=False)
    assert set(want[want.gen == 3].id) <= set(got.id)  # the resumed generation is all there
    lost = len(want) - len(got)
    if lost:
        assert re.search(rf"; {lost} row\(s\) of generation\(s\) [\d, ]+ are lost", lines[0]), lines[0]
    else:
        assert "lost" not in lines[0]
    backup = part / "individuals.csv.damaged"
    if lost and how in ("random", "half", "garbage inside"):  # bytes no row was made of: the file is kept
        assert backup.read_bytes() == damaged and "individuals.csv.damaged" in lines[0]
    pd.testing.assert_frame_equal(table(part, "gens.csv"), table(full, "gens.csv"))


def test_rows_the_checkpoint_holds_are_restored_in_full(runs, capsys):
    """Rows cut from individuals.csv that belong to the checkpoint's population or archive come back: none lost."""
    full, part = runs
    state = load_checkpoint(part / "checkpoint.pkl")
    held = {ind.id for ind in list(state["population"]) + list(state["archive"])}
    frame = pd.read_csv(part / "individuals.csv", dtype=str, keep_default_na=False)
    cut = frame[frame.id.astype(int).isin(held)].id.astype(int).tolist()[:3]
    frame[~frame.id.astype(int).isin(cut)].to_csv(part / "individuals.csv", index=False)
    out = resume(part, capsys)
    assert f"{part / 'individuals.csv'}: damaged (3 row(s) missing); rebuilt with" in out
    assert "and 3 from checkpoint.pkl" in out and "lost" not in out
    pd.testing.assert_frame_equal(table(part, "individuals.csv"), table(full, "individuals.csv"))


def test_an_intact_run_resumes_without_a_word_about_its_tables(runs, capsys):
    full, part = runs
    out = resume(part, capsys)
    assert "rebuilt" not in out and "dropped" not in out and "damaged" not in out
    for name in ("gens.csv", "individuals.csv", "pareto.csv"):
        pd.testing.assert_frame_equal(table(part, name), table(full, name))


# ------------------------------------------------------------------ the .npy cache of decoded image folders
def _png(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """An image folder (train: 3 cats, 3 dogs; test: 2 each) and an empty cache for it."""
    monkeypatch.setenv("NERO_DEAP_CACHE", str(tmp_path / "cache"))
    for split, n in (("train", 3), ("test", 2)):
        for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            (tmp_path / "images" / split / cls).mkdir(parents=True)
            for i in range(n):
                (tmp_path / "images" / split / cls / f"{i}.png").write_bytes(_png(color))
    return tmp_path / "images"


def load_quietly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact cache loads without a word
        return sources.image_folder(path)


def cache_folder(tmp_path):
    (root,) = [p for p in (tmp_path / "cache").iterdir()]
    return root


def npy(array, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def _cases(root, first) -> dict:
    """What a damaged cache may hold: file name -> bytes (None: delete the file)."""
    x, y = first.train_x, first.train_y
    return {
        "truncated": {"train_x.npy": (root / "train_x.npy").read_bytes()[:200]},
        "zero-byte": {"train_x.npy": b""},
        "random": {"train_x.npy": np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes()},
        "pickled array": {"train_x.npy": npy(np.array([object()] * 2, dtype=object), allow_pickle=True)},
        "a pickle": {"train_x.npy": pickle.dumps({"x": 1})},
        "float64 images": {"train_x.npy": npy(x.astype(np.float64))},
        "int32 labels": {"train_y.npy": npy(y.astype(np.int32))},
        "channels last": {"train_x.npy": npy(x.transpose(0, 2, 3, 1).copy())},
        "flat images": {"train_x.npy": npy(x.reshape(len(x), -1))},
        "fewer labels": {"train_y.npy": npy(y[:-1])},
        "other image size": {"train_x.npy": npy(x[:, :, :4, :4].copy())},
        "label out of range": {"train_y.npy": npy(np.where(np.arange(len(y)) == 0, 2, y))},
        "negative label": {"train_y.npy": npy(np.where(np.arange(len(y)) == 0, -1, y))},
        "junk classes.json": {"classes.json": b"\x00\xffnot json"},
        "classes.json not a list": {"classes.json": b'"cat"'},
        "missing file": {"test_y.npy": None},
    }


CASES = ["truncated", "zero-byte", "random", "pickled array", "a pickle", "float64 images", "int32 labels",
         "channels last", "flat images", "fewer labels", "other image size", "label out of range",
         "negative label", "junk classes.json", "classes.json not a list", "missing file"]


def write_damage(root, files: dict, rehash: bool) -> None:
    manifest = json.loads((root / "manifest.json").read_text()) if (root / "manifest.json").exists() else None
    for name, blob in files.items():
        if blob is None:
            (root / name).unlink()
        else:
            (root / name).write_bytes(blob)
            if rehash and manifest:  # the manifest agrees: the content checks must catch it
                manifest["sha256"][name] = hashlib.sha256(blob).hexdigest()
    if manifest:
        (root / "manifest.json").write_text(json.dumps(manifest))


def assert_rebuilt(folder, root, first, caught) -> None:
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith(f"{root}: data cache not usable"), messages
    assert "\n" not in messages[0]
    again = load_quietly(folder)  # the rebuilt cache is trusted again, without a word
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(getattr(again, name), getattr(first, name))
        assert getattr(again, name).dtype == getattr(first, name).dtype
    assert again.classes == first.classes


@pytest.mark.parametrize("rehash", [True, False], ids=["manifest-agrees", "manifest-differs"])
@pytest.mark.parametrize("case", CASES)
def test_a_damaged_cache_is_rebuilt_with_one_warning(folder, tmp_path, case, rehash):
    first = sources.image_folder(folder)
    root = cache_folder(tmp_path)
    write_damage(root, _cases(root, first)[case], rehash)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = sources.image_folder(folder)
    assert got.train_x.dtype == np.uint8 and np.array_equal(got.train_x, first.train_x)
    assert_rebuilt(folder, root, first, caught)
    assert not [p.name for p in root.parent.iterdir() if p.name.startswith(".")]


def test_a_flipped_byte_is_caught_by_the_manifest(folder, tmp_path):
    first = sources.image_folder(folder)
    root = cache_folder(tmp_path)
    blob = bytearray((root / "train_x.npy").read_bytes())
    blob[-1] ^= 0x01  # still a valid uint8 array of the right shape: only the hash tells
    (root / "train_x.npy").write_bytes(bytes(blob))
    first.train_x.flat[-1] ^= 0x01
    assert np.array_equal(np.load(root / "train_x.npy"), first.train_x)  # what a blind load returns
    first.train_x.flat[-1] ^= 0x01
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sources.image_folder(folder)
    assert "train_x.npy does not match its SHA-256" in str(caught[0].message)
    assert_rebuilt(folder, root, first, caught)


@pytest.mark.parametrize("what", ["no manifest", "junk manifest", "manifest lists too little", "a file"])
def test_a_cache_without_a_usable_manifest_is_rebuilt(folder, tmp_path, what):
    """Caches written before the manifest (or with a damaged one, or a file in the folder's place) are rebuilt."""
    first = sources.image_folder(folder)
    root = cache_folder(tmp_path)
    if what == "no manifest":
        (root / "manifest.json").unlink()
    elif what == "junk manifest":
        (root / "manifest.json").write_bytes(b"\xff\x00{")
    elif what == "manifest lists too little":
        (root / "manifest.json").write_text(json.dumps({"format": 1, "sha256": {}}))
    else:
        for p in root.iterdir():
            p.unlink()
        root.rmdir()
        root.write_bytes(b"not a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sources.image_folder(folder)
    assert_rebuilt(folder, root, first, caught)


def test_a_full_disk_while_caching_names_the_cache_and_leaves_no_temporary_folder(folder, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(DataError) as caught:
        sources.image_folder(folder)
    cache = tmp_path / "cache"
    assert str(cache) in str(caught.value) and "No space left on device" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert list(cache.iterdir()) == []  # no .tmp-* folder, no half cache
    monkeypatch.undo()
    monkeypatch.setenv("NERO_DEAP_CACHE", str(cache))
    assert sources.image_folder(folder).train_x.shape == (6, 3, 8, 8)  # space again: cached as usual
    assert (cache_folder(tmp_path) / "manifest.json").exists()


def test_a_second_builder_keeps_the_valid_cache_another_process_wrote_first(tmp_path):
    """Two workers decoding the same zip at once: the later one once moved the first one's fresh cache aside
    (under a reader's feet), making it decode all over again."""
    import numpy as np

    from nero_deap.engine import sources

    data = sources.synthetic(n_train=40, n_test=20)
    root = tmp_path / "zip-abc"
    sources._write_cache(root, data)
    first = (root / "manifest.json").stat().st_ino
    sources._write_cache(root, data)  # the slower builder
    assert (root / "manifest.json").stat().st_ino == first
    np.testing.assert_array_equal(sources._read_cache(root).train_x, data.train_x)
    assert [p.name for p in tmp_path.iterdir()] == ["zip-abc"]  # no temporary folder left
