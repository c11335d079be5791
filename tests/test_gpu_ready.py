"""GPU-path corrections that must hold before the first real GPU run, driven with stand-ins for torch.cuda.

* a CUDA error other than out-of-memory stops the search cleanly (exit 3, one line, checkpoint kept,
  --resume continues) and is never scored as (0, 0);
* attacks run in true float32 (TF32 off, restored afterwards);
* the claimed GPU becomes the current device; slot locks are keyed by GPU UUID; ``--device cuda``
  spreads workers like ``auto`` but requires a GPU; a lock file that cannot be opened is skipped;
* cudnn.benchmark is set once per process; the wall-clock cap syncs CUDA before reading the clock;
* a last training batch of one image does not fail a BatchNorm network;
* SCOOP: running futures are reported to the broker, re-sends are counted in gens.csv's ``resent``,
  and gens.csv files from before that column still load in ``report`` and ``--resume``.
"""
import json
import logging
import os
import random
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from conftest import ROOT, TINY_GRAMMAR
from nero_deap.search import fitness
from nero_deap.search import parallel
from nero_deap.engine import train as train_module
from nero_deap.engine.attacks import TF32_FLAGS, accuracy_clean_fgsm, attack_mode
from nero_deap.cli import main
from nero_deap.search.evolution import creator
from nero_deap.search.fitness import EvalContext, evaluate_remote, failure_reason, is_fatal_device_error
from nero_deap.space.genotype import init_genotype
from nero_deap.space.grammar import Grammar
from nero_deap.nets.network import build_network
from nero_deap.search.parallel import FatalDeviceError, claim_device
from nero_deap.space.phenotype import Phenotype
from nero_deap.commands.report import load_run, summary_table
from nero_deap.space.structure import NetworkStructure
from nero_deap.engine.train import TrainSettings, steps_per_epoch, train

SMALL = ("layer:conv num-filters:4 filter-shape:3 stride:1 padding:same act:relu input:-1 | "
         "layer:fc num-units:10 act:softmax input:0 || learning:adam lr:0.003 batch_size:32")
FC_BN = ("layer:conv num-filters:4 filter-shape:3 stride:2 padding:same act:relu input:-1 | "
         "layer:fc num-units:8 act:relu batch-norm:True input:0 | "
         "layer:fc num-units:10 act:softmax input:1 || learning:sgd lr:0.01 batch_size:32")
# torch.AcceleratorError is recent (a GPU image may have an older torch): a RuntimeError stands in for it there
ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", RuntimeError)
SEARCH = ["--grammar", str(TINY_GRAMMAR), "--data", "synthetic:120", "--population", "4", "--epochs", "0.5",
          "--threads", "1", "--seed", "5"]


def ctx(**kw):
    return EvalContext(str(TINY_GRAMMAR), json.dumps(NetworkStructure().to_config()), data="synthetic:120",
                       epochs=0.5, threads=1, **kw)


@pytest.fixture
def healthy_worker(monkeypatch):
    """Each test starts with, and leaves behind, a process whose device is not poisoned."""
    monkeypatch.delitem(fitness._WORKER_CACHE, "fatal", raising=False)
    yield
    fitness._WORKER_CACHE.pop("fatal", None)


@pytest.fixture
def fake_gpus(monkeypatch, tmp_path):
    """A host whose torch.cuda reports GPUs by UUID; returns (set_device calls, fresh-worker claim)."""
    monkeypatch.setenv("NERO_DEAP_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    selected, handles = [], []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: selected.append(str(device)))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device: selected.append(f"{device} memory {fraction:.3f}"))

    def worker(visible: list, requested: str = "auto", workers_per_gpu: int = 1) -> str:
        """What a fresh worker process with CUDA_VISIBLE_DEVICES naming ``visible`` (UUIDs) claims."""
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(visible))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=visible[i]))
        monkeypatch.setattr(parallel, "_claimed", None)
        monkeypatch.setattr(parallel, "_slot_handle", None)
        device = claim_device(requested, workers_per_gpu)
        handles.append(parallel._slot_handle)
        return device

    yield selected, worker
    for handle in handles:
        if handle is not None:
            handle.close()


# ------------------------------------------------------------ item 5: fatal device errors
@pytest.mark.parametrize("error", [
    ACCELERATOR_ERROR("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
])
def test_a_cuda_error_poisons_the_worker_instead_of_scoring_zero(monkeypatch, healthy_worker, error):
    def broken(*args, **kwargs):
        raise error

    individual = init_genotype(Grammar.from_file(str(TINY_GRAMMAR)), NetworkStructure(), random.Random(1),
                               creator.Individual)
    individual.id = 17
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "train", broken)
        with pytest.raises(FatalDeviceError, match=r"candidate 17: worker \S+ pid \d+ on cpu: .*error"):
            evaluate_remote(individual, ctx(device="cpu"))
    with pytest.raises(FatalDeviceError, match="candidate 18"):  # training works again, the process does not
        individual.id = 18
        evaluate_remote(individual, ctx(device="cpu"))


def test_out_of_memory_and_ordinary_errors_are_not_fatal():
    assert not is_fatal_device_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_fatal_device_error(RuntimeError("CUDA error: out of memory"))
    assert not is_fatal_device_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_fatal_device_error(ValueError("CUDA error: but not a RuntimeError"))
    assert is_fatal_device_error(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"))


@pytest.mark.parametrize("message", ["CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
                                     "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"])
def test_a_library_that_cannot_allocate_fails_the_candidate_as_oom(message):
    """A neighbour on the same GPU holding the memory makes cuBLAS/cuDNN fail this way: not fatal."""
    assert not is_fatal_device_error(RuntimeError(message))
    assert failure_reason(RuntimeError(message)) == ("oom", "out of memory")


def test_fatal_device_error_crosses_processes():
    import pickle

    error = pickle.loads(pickle.dumps(FatalDeviceError("candidate 3: worker h pid 1 on cuda:0: CUDA error")))
    assert isinstance(error, FatalDeviceError) and "candidate 3" in str(error)


def test_search_stops_cleanly_on_a_cuda_error_and_resume_continues(monkeypatch, healthy_worker, tmp_path, capsys):
    out = tmp_path / "run"
    real_train, calls = train_module.train, []

    def fails_in_generation_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # generation 0 has 4 evaluations
            raise ACCELERATOR_ERROR("CUDA error: an illegal memory access was encountered")
        return real_train(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "train", fails_in_generation_1)
        code = main(SEARCH + ["--generations", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1, err
    assert "illegal memory access" in err[0] and f"--resume {out}" in err[0] and "candidate" in err[0]
    assert list(pd.read_csv(out / "gens.csv").gen) == [0]  # nothing of generation 1 was recorded
    assert set(pd.read_csv(out / "individuals.csv").status) == {"ok"}  # nobody was scored (0, 0) for it
    fitness._WORKER_CACHE.pop("fatal")  # a new process, or the GPU fixed
    assert main(["--resume", str(out)]) == 0
    assert list(pd.read_csv(out / "gens.csv").gen) == [0, 1, 2]


# ------------------------------------------------------------ item 17: review fixes
def test_attacks_run_without_tf32_and_restore_it():
    saved = [flags.fp32_precision for flags in TF32_FLAGS]
    model = build_network(Phenotype.from_text(SMALL))
    seen = []
    model.register_forward_hook(lambda *args: seen.append([flags.fp32_precision for flags in TF32_FLAGS]))
    try:
        for flags in TF32_FLAGS:
            flags.fp32_precision = "tf32"
        x, y = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (8,))
        accuracy_clean_fgsm(model, x, y)
        assert seen and all(value == ["ieee", "ieee"] for value in seen)
        assert [flags.fp32_precision for flags in TF32_FLAGS] == ["tf32", "tf32"]
        with pytest.raises(KeyError), attack_mode(model):
            raise KeyError("an attack failed")
        assert [flags.fp32_precision for flags in TF32_FLAGS] == ["tf32", "tf32"]
    finally:
        for flags, value in zip(TF32_FLAGS, saved):
            flags.fp32_precision = value


def test_the_claimed_gpu_becomes_the_current_device(fake_gpus):
    selected, worker = fake_gpus
    assert worker(["GPU-a", "GPU-b"]) == "cuda:0" and worker(["GPU-a", "GPU-b"]) == "cuda:1"
    assert claim_device("cuda:1") == "cuda:1"
    assert selected == ["cuda:0", "cuda:1", "cuda:1"]


def test_a_missing_gpu_is_fatal_not_a_failed_candidate(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(parallel, "_claimed", None)
    with pytest.raises(FatalDeviceError, match="--device cuda: no CUDA GPU"):
        claim_device("cuda")
    if not torch.cuda.is_available():
        with pytest.raises(FatalDeviceError, match="device cuda:7"):
            claim_device("cuda:7")
    assert claim_device("auto") == "cpu"


def test_slot_locks_are_keyed_by_gpu_uuid_across_visible_devices(fake_gpus):
    _, worker = fake_gpus
    assert worker(["GPU-b"]) == "cuda:0"  # a job with CUDA_VISIBLE_DEVICES=1 takes physical GPU b
    assert worker(["GPU-a", "GPU-b"]) == "cuda:0"  # another job sees both: GPU a (its cuda:0) is free
    assert worker(["GPU-a", "GPU-b"]).startswith("cuda:")  # all slots taken: shares, never raises


def test_device_cuda_spreads_workers_over_gpus(fake_gpus):
    _, worker = fake_gpus
    gpus = ["GPU-a", "GPU-b"]
    assert [worker(gpus, "cuda", 2) for _ in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]


def test_workers_sharing_a_gpu_split_its_memory(fake_gpus):
    selected, worker = fake_gpus
    worker(["GPU-a"], "cuda", 2)
    worker(["GPU-a"], "cuda", 2)
    assert selected == ["cuda:0", "cuda:0 memory 0.475"] * 2
    selected.clear()
    worker(["GPU-b"], "cuda", 1)  # alone on its GPU: no cap
    assert selected == ["cuda:0"]


def test_a_lock_file_that_cannot_be_opened_is_skipped(fake_gpus, tmp_path):
    _, worker = fake_gpus
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "GPU-a-slot0.lock").mkdir()  # open(..., "w") raises IsADirectoryError
    assert worker(["GPU-a", "GPU-b"]) == "cuda:1"


def test_cudnn_benchmark_is_set_once_per_process(monkeypatch):
    monkeypatch.setattr(train_module, "_cudnn_benchmark_set", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    train_module.use_cudnn_benchmark()
    assert torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False  # someone switched it off on purpose: not switched on again
    train_module.use_cudnn_benchmark()
    assert not torch.backends.cudnn.benchmark


def test_time_cap_reads_the_clock_on_work_done_without_idling_the_gpu(monkeypatch):
    """On CUDA: the whole first step (autotuning, which blocks the CPU inside the step) is not charged; after
    that each reading waits for the previous step's event only, never the whole device; a continued training
    starts from the time it was charged; on the CPU it is the clock alone."""
    events, now = [], [100.0]

    class Event:
        count = 0

        def __init__(self):
            Event.count += 1
            self.name = f"step{Event.count}"

        def record(self):
            events.append(f"record {self.name}")

        def synchronize(self):
            events.append(f"wait {self.name}")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: now[0])
    cap = train_module.TimeCap(50.0, torch.device("cuda:0"))
    now[0] += 30.0  # the first step, with its autotuning, took 30 s
    assert not cap.reached() and events == ["sync"] and cap.charged() == 0.0
    now[0] += 20.0
    assert not cap.reached() and events == ["sync", "record step1"]  # no earlier step to wait for
    now[0] += 40.0
    assert cap.reached() and events[2:] == ["record step2", "wait step1"]  # 60 s charged, over 50
    events.clear()
    continued = train_module.TimeCap(50.0, torch.device("cuda:0"), charged=45.0)
    now[0] += 30.0  # its first step: not charged either
    assert not continued.reached() and continued.charged() == 45.0
    now[0] += 6.0
    assert continued.reached()
    events.clear()
    assert train_module.TimeCap(500.0, torch.device("cpu")).reached() is False and events == []
    cpu = train_module.TimeCap(50.0, torch.device("cpu"), charged=40.0)
    now[0] += 11.0
    assert cpu.reached() and events == []
    assert not train_module.TimeCap(None, torch.device("cuda:0")).reached() and events == []


def test_a_last_batch_of_one_image_does_not_fail_batchnorm():
    assert [steps_per_epoch(n, 32) for n in (32, 33, 34, 64, 65, 1)] == [1, 1, 2, 2, 2, 1]
    torch.manual_seed(0)
    model = build_network(Phenotype.from_text(FC_BN))
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    x, y = torch.randint(0, 256, (33, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (33,))
    result = train(model, Phenotype.from_text(FC_BN).learning, x, y, TrainSettings(epochs=2, seed=0))
    assert result.steps == 2 and result.epochs == 2.0


def test_the_failing_case_is_real():
    """Without the drop, one image in training mode is what BatchNorm1d refuses."""
    model = build_network(Phenotype.from_text(FC_BN)).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.rand(1, 3, 32, 32))


# ------------------------------------------------------------ item 6: SCOOP re-sends
def test_patched_scoop_reports_the_running_future_and_counts_resends(monkeypatch):
    import pickle

    import scoop
    import scoop._control as control
    from scoop._comm import scoopzmq

    class Future:  # hashable, like scoop's
        def __init__(self, id_):
            self.id = id_

    def keyed(*ids):  # how the broker keys futures: by the pickled id of scoop's TASK messages
        return {pickle.dumps(i, pickle.HIGHEST_PROTOCOL) for i in ids}

    sent, seen_running = [], []
    queue = SimpleNamespace(movable=[Future((b"w", 2))], ready=[], inprogress=set(),
                            socket=SimpleNamespace(socket=SimpleNamespace(send_multipart=sent.append)))
    future = Future((b"root", 1))
    for module, name in ((control, "execQueue"), (control, "runFuture"), (scoopzmq, "pickle"), (scoop, "logger"),
                         (scoop, "TIME_BETWEEN_STATUS_REPORTS"), (parallel, "_last_report")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    control.execQueue = queue
    control.runFuture = lambda f: seen_running.append(f in queue.inprogress) or f
    scoop.logger = logger = logging.getLogger("nero-deap-test-scoop")
    parallel._last_report = 0.0
    parallel.patch_scoop()
    parallel.patch_scoop()  # idempotent: one wrapper, one filter
    try:
        assert control.runFuture(future) is future
        assert seen_running == [True]  # listed while it runs (scoop's _delete drops it when it ends)
        running = iter(queue.inprogress)  # scoop's reporter thread iterates it while the main thread changes it
        queue.inprogress.discard(future)
        assert list(running) == [future]
        (kind, payload), = sent  # and the broker hears of it at once, not 25 s later
        assert kind == scoopzmq.STATUS_UPDATE and pickle.loads(payload) == keyed((b"root", 1), (b"w", 2))
        # scoop's own reporter thread pickles a set of raw ids: now pickled ids too; nothing else changes
        assert pickle.loads(scoopzmq.pickle.dumps({(b"w", 3)})) == keyed((b"w", 3))
        assert scoopzmq.pickle.dumps((b"w", 3), pickle.HIGHEST_PROTOCOL) == keyed((b"w", 3)).pop()
        assert scoop.TIME_BETWEEN_STATUS_REPORTS < scoop.TIME_BETWEEN_STATUS_PRUNING / 2
        parallel.resent_count()
        logger.warning("Lost track of future %s. Resending it...", "f1")
        logger.warning("something else")
        assert parallel.resent_count() == 1 and parallel.resent_count() == 0
    finally:
        for f in list(logger.filters):
            logger.removeFilter(f)


def test_gens_csv_counts_resends_and_old_files_still_load(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(SEARCH + ["--generations", "1", "--out", str(out)]) == 0
    gens = pd.read_csv(out / "gens.csv")
    assert list(gens.resent) == [0, 0]
    gens.drop(columns=["resent"]).to_csv(out / "gens.csv", index=False)  # a run from before the column
    assert summary_table([load_run(out)]).generations.iloc[0] == 1
    assert main(["--resume", str(out), "--generations", "2"]) == 0
    gens = pd.read_csv(out / "gens.csv")
    # the checkpoint's logbook holds every row, resent included: the file that lost the column gets it back
    assert list(gens.gen) == [0, 1, 2] and list(gens.resent) == [0, 0, 0]


STAND_IN_RUN = '''"""run.py with a stand-in CUDA failure: training any candidate after generation 0 raises."""
import os
import sys

sys.path.insert(0, {root!r})
import torch

from nero_deap.search import evolution  # noqa: F401
from nero_deap.engine import train as train_module
from nero_deap.search.fitness import derive_seed
from nero_deap.search.parallel import patch_scoop, running_under_scoop

real = train_module.train
LATER = {{derive_seed(int(os.environ["RUN_SEED"]), i) for i in range(int(os.environ["FIRST_ID"]), 1000)}}


def broken(model, learning, x, y, settings, resume=None):
    if settings.seed in LATER:
        raise getattr(torch, "AcceleratorError", RuntimeError)("CUDA error: an illegal memory access")
    return real(model, learning, x, y, settings, resume)


train_module.train = broken
if running_under_scoop():
    patch_scoop()
if __name__ == "__main__":
    from nero_deap.cli import main

    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
'''


def test_a_cuda_error_on_a_scoop_worker_stops_the_search_with_one_line(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "stand_in_run.py"
    script.write_text(STAND_IN_RUN.format(root=str(ROOT)))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "scoop", "-n", "2", str(script)] + SEARCH
                          + ["--generations", "2", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "RUN_SEED": "5", "FIRST_ID": "4"})  # ids 0-3: gen 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "illegal memory access" in errors[0] and f"--resume {out}" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    gens = pd.read_csv(out / "gens.csv")
    assert list(gens.gen) == [0] and list(gens.resent) == [0]  # checkpointed gen 0; nothing re-sent
    assert (out / "checkpoint.pkl").exists()


def test_patched_scoop_runs_one_task_per_process_when_there_are_enough():
    """3 tasks on 3 processes, 6 rounds of bench/bench_dispatch.py's toy map: with scoop's own dispatch
    (``--scoop-dispatch``) two tasks of a round ran on one process in 2 to 4 of the 6 (seven tries; its
    root's requests pile up in the broker); patched as run.py patches it, each round uses all three."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "scoop", "-n", "3", "bench/bench_dispatch.py", "--tasks", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    rounds = [line for line in proc.stdout.splitlines() if line.startswith("round ")]
    assert len(rounds) == 6, proc.stdout + proc.stderr
    assert all("3 processes, 0 after another" in line for line in rounds), proc.stdout
