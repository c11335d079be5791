"""Issue 10's hostile input: model files, runs that cannot work, OS errors, data and config at fault.

Every case must end in one clear line (exit 2 for bad input, 1 for a full or
read-only disk), never a traceback and never a run that "succeeds" with every
candidate at (0, 0).
"""
import errno
import io
import json
import os
import pickle
import random
import subprocess
import sys
import zipfile

import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY_GRAMMAR
from nero_deap.search import fitness
from nero_deap.cli import main
from nero_deap.common.errors import ConfigError
from nero_deap.engine.sources import DataError
from nero_deap.engine.datasets import load_raw
from nero_deap.nets.export import FORMAT, ModelFileError, load_model
from nero_deap.search.fitness import EvalContext, evaluate_phenotype
from nero_deap.space.genotype import init_genotype, to_phenotype
from nero_deap.space.grammar import Grammar
from nero_deap.nets.network import MAX_WIDTH, NetworkError, build_network, plan_network
from nero_deap.space.phenotype import Phenotype
from nero_deap.space.structure import NetworkStructure

FAST = ["--grammar", str(TINY_GRAMMAR), "--data", "synthetic:40", "--val-size", "10", "--population", "4",
        "--epochs", "1", "--threads", "1"]
HEAD = " | layer:fc num-units:10 input:0 || learning:sgd"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


# ------------------------------------------------------- item 2: model files
def model_file(tmp_path, text: str, **fields):
    blob = {"format": FORMAT, "phenotype": text, "state_dict": {}, "num_classes": 10, "in_shape": [3, 32, 32],
            "mean": [0.5] * 3, "std": [0.25] * 3, **fields}
    path = tmp_path / "m.pt"
    torch.save(blob, path)
    return path


def test_hostile_phenotype_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    def no_allocation(*args, **kwargs):
        raise AssertionError("a layer was allocated before the limits were checked")

    monkeypatch.setattr(torch.nn.Linear, "__init__", no_allocation)
    monkeypatch.setattr(torch.nn.Conv2d, "__init__", no_allocation)
    for hostile in ("layer:conv num-filters:1000000 input:-1" + HEAD,  # 1M filters
                    "layer:fc num-units:16000 input:-1 | layer:fc num-units:16000 input:0 | "  # 256M parameters
                    "layer:fc num-units:10 input:1 || learning:sgd",
                    " | ".join(["layer:dropout input:%d" % (i - 1) for i in range(2000)]) + " || learning:sgd"):
        path = model_file(tmp_path, hostile)
        assert os.path.getsize(path) < 100_000
        with pytest.raises(ModelFileError, match="the decoder refuses its network: .*(exceed|limit|at most)"):
            load_model(path)


@pytest.mark.parametrize("content", [torch.zeros(3), [1, 2], "text", {"format": "other"}])
def test_files_that_are_not_model_files(tmp_path, content):
    path = tmp_path / "x.pt"
    torch.save(content, path)
    with pytest.raises(ModelFileError, match="not a nero-deap model file"):
        load_model(path)


def test_garbage_and_malformed_model_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a zip at all")
    with pytest.raises(ModelFileError, match="not a nero-deap model file"):
        load_model(garbage)
    for fields in ({"num_classes": "ten"}, {"in_shape": [3, 32]}, {"mean": [0.5]}, {"phenotype": "no separator"},
                   {"state_dict": {"nodes.0.0.weight": torch.zeros(1)}}):
        with pytest.raises(ModelFileError, match="m.pt: "):
            load_model(model_file(tmp_path, "layer:fc num-units:10 input:-1 || learning:sgd", **fields))


def test_plan_counts_match_the_built_network():
    grammar = Grammar.from_file(ROOT / "grammars" / "fast-denser-cifar10.grammar")
    structure = NetworkStructure()
    for seed in range(25):
        phenotype = to_phenotype(init_genotype(grammar, structure, random.Random(seed)), grammar, structure)
        plan, net = plan_network(phenotype), build_network(phenotype)
        assert plan.params == net.params and plan.flops == net.flops


def tiny_ctx() -> EvalContext:
    return EvalContext(str(TINY_GRAMMAR), json.dumps(NetworkStructure().to_config()), data="synthetic:40",
                       val_size=10, epochs=1, threads=1)


def test_huge_filter_counts_score_invalid_with_the_reason():
    text = f"layer:conv num-filters:{MAX_WIDTH + 1} input:-1" + HEAD
    fit, meta = evaluate_phenotype(Phenotype.from_text(text), tiny_ctx(), seed=1)
    assert fit == (0.0, 0.0) and meta["status"] == "invalid" and "exceeds the limit" in meta["reason"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch_size", ["1", "0", "-4", "1.5"])
def test_a_batch_size_below_two_trains_with_two_instead_of_hanging(batch_size):
    """Batches of one image are skipped (BatchNorm), so batch_size 1 once skipped every batch, for ever."""
    text = "layer:conv num-filters:4 input:-1" + HEAD + f" batch_size:{batch_size}"
    fit, meta = evaluate_phenotype(Phenotype.from_text(text), tiny_ctx(), seed=1)
    assert meta["status"] == "ok" and meta["epochs"] == 1.0, meta


def test_zero_sized_kernel_is_repaired_to_one():
    net = build_network(Phenotype.from_text("layer:conv num-filters:4 filter-shape:0 stride:0 input:-1" + HEAD))
    assert net.nodes[0][0].kernel_size == (1, 1) and net(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_non_numeric_sizes_name_the_key():
    with pytest.raises(NetworkError, match="num-filters must be a number, got 'abc'"):
        build_network(Phenotype.from_text("layer:conv num-filters:abc input:-1" + HEAD))


# --------------------------------------------- item 4: runs that cannot work
@pytest.mark.parametrize("args, expected", [
    (["--device", "cuda:99"], "device 'cuda:99': this machine has"),
    (["--val-size", "100000", "--data", "synthetic:200"], "val_size 100000 does not fit 200 training images"),
    (["--data", "synthetic:0"], "synthetic:N needs a whole number"),
    (["--data", "synthetic:-5"], "synthetic:N needs a whole number"),
    (["--data", "synthetic:abc"], "synthetic:N needs a whole number"),
    (["--epochs", "inf"], "epochs must be > 0 and finite"),
    (["--seed", str(2**70)], "seed must be in [0, 4294967295]"),
    (["--set", "structure.max_depth='abc'"], "structure.max_depth must be an integer, got 'abc'"),
    (["--set", "structure.modules=3"], "structure.modules must be a list"),
    (["--set", "structure.levels_back=3"], "structure.levels_back must be a table"),
    (["--set", "variation.add_layer='x'"], "variation.add_layer must be a number"),
    (["--set", "structure.max_depth=100000"], "max_depth must be in [1, 256]"),
])
def test_unworkable_runs_stop_at_start_up(args, expected, capsys, tmp_path):
    assert main(FAST + ["--out", str(tmp_path / "run")] + args) == 2
    err = one_line_error(capsys)
    assert expected in err and ":0:0:" not in err
    assert not (tmp_path / "run").exists()


def test_start_up_failures_through_the_real_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run.py")] + FAST + ["--out", str(tmp_path / "run"),
                                                                         "--data", "synthetic:abc"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: --data 'synthetic:abc': synthetic:N needs a whole number N of training images " \
                          "in [20, 1000000]\n"


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has a GPU")
def test_cuda_without_a_gpu_stops_at_start_up(capsys, tmp_path):
    assert main(FAST + ["--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert "no CUDA GPU" in one_line_error(capsys)


def test_unknown_layer_in_the_grammar_is_a_grammar_error(capsys, tmp_path):
    grammar = tmp_path / "warp.grammar"
    grammar.write_text(TINY_GRAMMAR.read_text().replace("layer:pool-max", "layer:warp-drive"))
    line, text = next((i, t) for i, t in enumerate(grammar.read_text().split("\n"), 1) if "warp-drive" in t)
    assert main(FAST + ["--grammar", str(grammar), "--out", str(tmp_path / "run")]) == 2
    col = text.index("layer:warp-drive") + 1
    assert one_line_error(capsys).startswith(f"{grammar}:{line}:{col}: unknown layer type 'warp-drive'")


def test_a_generation_where_every_candidate_fails_stops_the_run_with_exit_2(tmp_path):
    grammar = tmp_path / "huge.grammar"
    grammar.write_text(TINY_GRAMMAR.read_text().replace("[num-filters,int,1,4,8]",
                                                        f"[num-filters,int,1,{MAX_WIDTH + 1},{MAX_WIDTH + 9}]")
                       .replace("layer:pool-max", f"layer:conv num-filters:{MAX_WIDTH * 2}"))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "run.py")] + FAST + ["--grammar", str(grammar), "--out", str(out),
                                                                      "--generations", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "every candidate of generation 0 failed (4); most frequent: 4x invalid:" in proc.stderr
    assert "exceeds the limit" in proc.stderr and "done" not in proc.stdout
    assert (out / "checkpoint.pkl").exists() and (out / "individuals.csv").exists()


# ------------------------------------------------------ item 16: bad input
def image_zip(path, extra: dict = None):
    """A two-class image zip: {train,test}/{cat,dog}/0.jpg and ``extra`` members (name -> bytes)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            for label in ("cat", "dog"):
                zf.writestr(f"{split}/{label}/0.jpg", buf.getvalue())
        for name, blob in (extra or {}).items():
            zf.writestr(name, blob(buf.getvalue()))
    return path


def test_corrupt_image_in_a_zip_names_the_member(tmp_path, monkeypatch):
    monkeypatch.setenv("NERO_DEAP_CACHE", str(tmp_path / "cache"))
    path = image_zip(tmp_path / "bad.zip", {"train/cat/1.jpg": lambda jpeg: jpeg[:20]})
    with pytest.raises(DataError, match=r"bad.zip: cannot decode image 'train/cat/1.jpg'"):
        load_raw(str(path))


def test_a_decompression_bomb_in_a_zip_names_the_member(tmp_path, monkeypatch):
    monkeypatch.setenv("NERO_DEAP_CACHE", str(tmp_path / "cache"))
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # a few KB that claim 400 megapixels
    path = image_zip(tmp_path / "bomb.zip", {"train/cat/1.png": lambda jpeg: bomb.getvalue()})
    with pytest.raises(DataError, match=r"bomb.zip: cannot decode image 'train/cat/1.png' \(DecompressionBombError"):
        load_raw(str(path))


def test_one_class_is_refused_not_scored_perfect(tmp_path, monkeypatch):
    monkeypatch.setenv("NERO_DEAP_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "one.zip"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    with zipfile.ZipFile(path, "w") as zf:
        for name in ("train/cat/0.jpg", "train/cat/1.jpg", "test/cat/0.jpg"):
            zf.writestr(name, buf.getvalue())
    with pytest.raises(DataError, match="one class \\('cat'\\); classification needs at least two"):
        load_raw(str(path))


def test_out_pointing_at_a_file(capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    assert main(FAST + ["--out", str(target)]) == 2
    assert "exists and is not a directory" in one_line_error(capsys)
    assert main(FAST + ["--out", str(target / "run")]) == 2  # below a file: no generation ever ran
    assert one_line_error(capsys) == f"error: --out {target / 'run'}: cannot write there (Not a directory)"


def test_a_new_search_refuses_a_folder_that_is_not_its_own(capsys, tmp_path):
    """A fresh search cleans up after a run killed before its first checkpoint; it once did so in any folder,
    deleting a user's files, and in a run that still had its previous checkpoint (resumable)."""
    other = tmp_path / "other"
    (other / "weights").mkdir(parents=True)
    (other / "weights" / "mymodel.pt").write_bytes(b"mine")
    (other / "gens.csv").write_text("mine\n")
    assert main(FAST + ["--out", str(other)]) == 2
    assert "not empty and not a nero-deap run" in one_line_error(capsys)
    assert (other / "weights" / "mymodel.pt").read_bytes() == b"mine" and (other / "gens.csv").read_text() == "mine\n"
    (other / "config.toml").write_text('population = 8\n')  # the user's own config, not a run's
    assert main(FAST + ["--out", str(other)]) == 2
    assert "not empty and not a nero-deap run" in one_line_error(capsys)
    assert (other / "gens.csv").read_text() == "mine\n"
    resumable = tmp_path / "resumable"
    resumable.mkdir()
    (resumable / "config.toml").write_text("")
    (resumable / "checkpoint.prev.pkl").write_bytes(b"")
    assert main(FAST + ["--out", str(resumable)]) == 2
    assert f"continue it with --resume {resumable}" in one_line_error(capsys)
    assert (resumable / "checkpoint.prev.pkl").exists()
    killed = tmp_path / "killed"  # killed in generation 0: its config.toml names it; started again
    killed.mkdir()
    (killed / "config.toml").write_text(f'out = "{killed}"\n')
    (killed / "gens.csv").write_text("half a run\n")
    assert main(FAST + ["--generations", "0", "--out", str(killed)]) == 0
    assert (killed / "gens.csv").read_text().startswith("gen,")
    first_write = tmp_path / "first_write"  # killed while writing its first config.toml: only the temp file
    first_write.mkdir()
    (first_write / ".config.toml.k2x9q_ab").write_text('out = "')
    assert main(FAST + ["--generations", "0", "--out", str(first_write)]) == 0
    assert sorted(p.name for p in first_write.iterdir() if p.name.startswith(".config.toml")) == []


@pytest.mark.parametrize("option, expected", [
    ("--grammar", "/dev/zero: cannot read grammar file: not a regular file"),
    ("--config", "error: cannot read config /dev/zero: not a regular file"),
    ("--data", "error: --data '/dev/zero': not a directory or a regular file"),
])
def test_device_files_are_refused_not_read_forever(option, expected, capsys, tmp_path):
    assert main(FAST + [option, "/dev/zero", "--out", str(tmp_path / "run")]) == 2
    assert one_line_error(capsys) == expected


@pytest.mark.parametrize("failing_write", [1, 2])
def test_full_disk_during_a_run_is_one_line_and_keeps_the_checkpoint(capsys, tmp_path, monkeypatch, failing_write):
    """The message once said a generation was checkpointed when the disk was full from the first write on."""
    real_fsync, writes = os.fsync, []

    def fsync(fd):  # this checkpoint write meets a full disk
        if ".checkpoint.pkl." in os.readlink(f"/proc/self/fd/{fd}"):
            writes.append(fd)
            if len(writes) == failing_write:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "run"
    assert main(FAST + ["--generations", "1", "--out", str(out)]) == 1
    error = one_line_error(capsys)
    if failing_write == 1:
        assert error == f"error: No space left on device ({out}); no generation of {out} was checkpointed yet"
        return
    assert error == f"error: No space left on device ({out}); generation 0 is checkpointed, continue with " \
                    f"--resume {out}"
    from nero_deap.store.logbook import load_checkpoint

    assert load_checkpoint(out / "checkpoint.pkl")["gen"] == 0  # the previous checkpoint, intact
    assert [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".nero-deap.lock"] == []


def test_workers_use_the_cache_directory_of_the_launching_host(tmp_path, monkeypatch):
    from nero_deap.store.config import RunConfig
    from nero_deap.commands.search import eval_context

    monkeypatch.setenv("NERO_DEAP_CACHE", str(tmp_path / "head-cache"))
    zip_path = image_zip(tmp_path / "d.zip")
    ctx = eval_context(RunConfig(grammar=str(TINY_GRAMMAR), data=str(zip_path)), NetworkStructure())
    assert ctx.cache_dir == str(tmp_path / "head-cache")
    monkeypatch.delenv("NERO_DEAP_CACHE")  # a remote worker: ssh passed no environment on
    monkeypatch.setenv("HOME", str(tmp_path / "worker-home"))
    monkeypatch.setattr(fitness, "_WORKER_CACHE", {})
    fitness.worker_raw(ctx.data, ctx.cache_dir)
    assert len(list((tmp_path / "head-cache").iterdir())) == 1 and not (tmp_path / "worker-home").exists()
    monkeypatch.setenv("NERO_DEAP_CACHE", str(tmp_path / "node-scratch"))  # a host that chose its own
    monkeypatch.setattr(fitness, "_WORKER_CACHE", {})
    fitness.worker_raw(ctx.data, ctx.cache_dir)
    assert len(list((tmp_path / "node-scratch").iterdir())) == 1


def test_later_generations_stop_only_when_every_new_candidate_errs(tmp_path):
    from types import SimpleNamespace

    from nero_deap.commands.search import SearchFailed, check_generation

    def inds(*statuses):
        return [SimpleNamespace(meta={"status": s, "reason": f"reason {i}"}) for i, s in enumerate(statuses)]

    check_generation(3, inds("diverged", "oom"), tmp_path)  # one-off failures: selection handles them
    check_generation(3, inds("error", "ok"), tmp_path)
    with pytest.raises(SearchFailed, match=r"generation 3 failed \(2\); most frequent: 2x error: reason 0"):
        check_generation(3, inds("error", "error"), tmp_path)
    with pytest.raises(SearchFailed, match="1x diverged: reason 0; 1x oom: reason 1"):
        check_generation(0, inds("diverged", "oom"), tmp_path)


def test_model_files_with_non_finite_weights_or_a_broken_normalisation(tmp_path):
    """A NaN weight or a zero std once loaded silently, and ``final`` reported the model at chance."""
    from nero_deap.nets.export import save_model

    text = "layer:fc num-units:10 input:-1 || learning:sgd"
    net = build_network(Phenotype.from_text(text), 10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3)
    good = save_model(net, tmp_path / "good.pt", num_classes=10, in_shape=(3, 32, 32), mean=(0.5,) * 3,
                      std=(0.25,) * 3)
    assert load_model(good) is not None
    state = {k: v.clone() for k, v in net.state_dict().items()}
    weight = next(k for k in state if k.endswith("weight"))
    state[weight][0, 0] = float("nan")
    for fields, expected in (({"state_dict": state}, f"{weight} holds non-finite values"),
                             ({"state_dict": net.state_dict(), "std": [0.0] * 3}, "must be finite numbers, std > 0"),
                             ({"state_dict": net.state_dict(), "mean": [float("inf")] * 3}, "must be finite"),
                             ({"state_dict": net.state_dict(), "std": [0.5] * 3},  # weights hold 0.25
                              "normalize.mean/std in the weights differ from the file's")):
        with pytest.raises(ModelFileError, match=expected):
            load_model(model_file(tmp_path, text, **fields))


@pytest.mark.parametrize("args, expected", [
    (["--val-size", "3"], "val_size 3 does not fit 40 training images of 10 classes: it must be in [10, 39]"),
    (["--train-subset", "5"], "train_subset 5 must be in [10, 30]"),
    (["--train-subset", "31"], "train_subset 31 must be in [10, 30]"),
])
def test_splits_that_cannot_measure_anything_are_refused(args, expected, capsys, tmp_path):
    """A training subset of 1 image scored every network at chance, one of 100,000 on 600 images was ignored
    while config.toml recorded it, a validation split of 1 image scored 1.0."""
    assert main(FAST + ["--out", str(tmp_path / "run")] + args) == 2
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_a_split_an_old_run_recorded_is_refused_naming_its_config(capsys, tmp_path):
    """Older versions accepted a val_size below the class count; resuming, finishing or scoring against such a
    run is refused, and the message names the run's config.toml (the user did not type the value)."""
    run = tmp_path / "run"
    assert main(FAST + ["--generations", "0", "--out", str(run)]) == 0
    capsys.readouterr()
    saved = run / "config.toml"
    saved.write_text(saved.read_text().replace("val_size = 10", "val_size = 3"))
    expected = f"error: {saved}: val_size 3 does not fit 40 training images of 10 classes"
    net = "layer:fc num-units:10 input:-1 || learning:sgd"
    for argv in (["--resume", str(run), "--generations", "1"], ["final", str(run), "--epochs", "1"],
                 ["evaluate", net, "--run", str(run)]):
        assert main(argv) == 2
        assert one_line_error(capsys).startswith(expected), argv
    for typed in ("2", "3"):  # typed in this command (even the value the file holds): no file to name
        assert main(["evaluate", net, "--run", str(run), "--val-size", typed]) == 2
        assert one_line_error(capsys).startswith(f"error: val_size {typed} does not fit")


def test_a_run_folder_in_use_by_another_process_is_refused(capsys, tmp_path):
    """A second search --resume (or a final) on a run a search was still writing mixed both processes' files."""
    from nero_deap.commands.final import FinalSettings, run_final
    from nero_deap.store.runlock import LOCK_NAME, run_lock

    run = tmp_path / "run"
    assert main(FAST + ["--generations", "0", "--out", str(run)]) == 0
    assert not (run / LOCK_NAME).exists() and not (run / "inflight").exists()  # a finished run keeps results only
    with run_lock(run, "search"):  # as if a search were running in it
        assert main(FAST + ["--resume", str(run), "--generations", "1"]) == 2
        err = one_line_error(capsys)
        assert err.startswith(f"error: {run} is in use by nero-deap search (pid {os.getpid()} on ") and \
            err.endswith("; wait for it to end, or use another folder"), err
        with pytest.raises(ConfigError, match="is in use by nero-deap search"):
            run_final(run, FinalSettings(epochs=0.1, aa_n=0, sweep_n=10, threads=1))
    assert main(FAST + ["--resume", str(run), "--generations", "1"]) == 0
    assert not (run / LOCK_NAME).exists()
    (run / LOCK_NAME).write_text("nero-deap search (pid 1 on gone)\n")  # left by a killed process: no obstacle
    with run_lock(run, "final"):
        pass
    lonely = tmp_path / "lonely"  # a fresh search killed between taking the lock and writing config.toml
    lonely.mkdir()
    (lonely / LOCK_NAME).write_text("nero-deap search (pid 1 on gone)\n")
    assert main(FAST + ["--generations", "0", "--out", str(lonely)]) == 0


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch):
    import errno
    import fcntl

    from nero_deap.store.runlock import run_lock

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock \\(No locks available\\); make sure no other"):
        with run_lock(tmp_path / "run", "search"):
            ran = True
    assert ran


def test_every_file_a_run_writes_follows_the_umask(tmp_path):
    """config.toml, pareto.csv, checkpoints and weights were 0600 while gens.csv was 0644."""
    old = os.umask(0o027)
    try:
        run = tmp_path / "run"
        assert main(FAST + ["--generations", "1", "--out", str(run)]) == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(run)): oct(p.stat().st_mode & 0o777) for p in run.rglob("*") if p.is_file()}
    assert {"config.toml", "gens.csv", "pareto.csv", "checkpoint.pkl"} <= set(modes)
    assert set(modes.values()) == {oct(0o640)}, modes


def test_an_empty_saved_config_is_refused_not_taken_for_defaults(capsys, tmp_path):
    """A zero-byte config.toml once made --resume list "changes" such as structure.init (None -> ...)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ROOT / "tests" / "fixtures" / "run-v2", run)
    (run / "config.toml").write_bytes(b"")
    assert main(["search", "--resume", str(run), "--generations", "2"]) == 2
    assert one_line_error(capsys) == (f"error: {run / 'config.toml'}: empty, so the run's settings are lost; "
                                       "restore the file (or start the run again in another folder)")


def test_resuming_with_fewer_generations_than_finished_changes_nothing(capsys, tmp_path):
    """--resume RUN --generations 2 on a 4-generation run once rewrote config.toml to generations = 2."""
    run = tmp_path / "run"
    assert main(FAST + ["--generations", "2", "--out", str(run)]) == 0
    saved = (run / "config.toml").read_bytes()
    capsys.readouterr()
    assert main(FAST + ["--resume", str(run), "--generations", "1"]) == 2
    assert one_line_error(capsys) == (f"error: --generations 1: {run} has already finished generation 2; pass "
                                      "more to extend it (nothing was changed)")
    assert main(FAST + ["--resume", str(run), "--generations", "2"]) == 0
    assert f"{run} has already finished generation 2: nothing to do" in capsys.readouterr().out
    assert (run / "config.toml").read_bytes() == saved


def test_a_run_that_appears_while_a_fresh_search_loads_its_data_is_not_overwritten(capsys, tmp_path, monkeypatch):
    """The "already holds a run" check ran before the lock: a search finishing its first generation in the
    same folder meanwhile had its tables, checkpoint and weights deleted by the second one."""
    import nero_deap.commands.search as search_module

    run = tmp_path / "run"
    real = search_module.preflight

    def another_search_finishes_meanwhile(cfg, ctx):
        real(cfg, ctx)
        run.mkdir(parents=True, exist_ok=True)
        (run / "checkpoint.pkl").write_bytes(b"the other run's")

    monkeypatch.setattr(search_module, "preflight", another_search_finishes_meanwhile)
    assert main(FAST + ["--generations", "0", "--out", str(run)]) == 2
    assert one_line_error(capsys) == f"error: {run} already holds a run; continue it with --resume {run} or pick " \
                                     "another --out"
    assert (run / "checkpoint.pkl").read_bytes() == b"the other run's"
