"""``nero-deap final RUN``: NERO-Net's three stages, on the test split, with strong attacks.

For each selected architecture (the Pareto front by default):

1. **search**: the weights the search itself trained and scored
   (``RUN/weights/<id>.pt``), now scored on the test split; when the run
   kept no weights for it, retrained as during the search (same data,
   budget and seed: exact on the CPU, close on a GPU);
2. **standard**: retrained from scratch for ``--epochs`` (default 50: with the
   warm-up + linear-decay schedule typical evolved nets have converged by
   then) on the whole training split (train + validation);
3. **adversarial** (``--adv fgsm-rs`` and/or ``pgd``): the same budget with
   adversarial training.

Every model is evaluated on the test split: clean, FGSM, PGD-20 (optionally
PGD-50 with restarts) and standard AutoAttack (``--aa-n`` examples).  Each
accuracy has its binomial standard error.  The gradient-masking audit flags
a model when FGSM beats PGD by more than ``--mask-gap``, when FGSM or PGD-20
beats AutoAttack on AutoAttack's own images by more than two standard errors
(:func:`autoattack_gap_threshold`), when AutoAttack's black-box Square finds
errors the white-box attacks missed, when PGD accuracy does not fall as
epsilon grows, or when the input gradient is exactly zero on more than 5%
of the images.  Outputs: ``final.csv`` (rewritten after every model),
``report.md``, ``models/*.pt`` and ``final-settings.json``, which lets
``--resume`` keep the rows an interrupted run finished with the same options.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch
from tqdm import tqdm

from ..common.files import write_bytes_atomic
from ..engine.attacks import (accuracy_autoattack, accuracy_clean_fgsm, accuracy_pgd, autoattack_seconds, pass_seconds,
                              zero_gradient_share)
from ..engine.data import DataSplits, make_splits
from ..engine.datasets import load_raw
from ..engine.train import Diverged, TrainSettings, snapshot_step, train
from ..nets.export import ModelFileError, load_model, save_model
from ..nets.network import build_network, plan_network
from ..search.audit import ZERO_GRADIENT_SHARE
from ..search.fitness import derive_seed
from ..search.objectives import parse as parse_objectives
from ..search.parallel import claim_device
from ..space.phenotype import Phenotype
from ..store.config import ACCELERATE, ConfigError, RunConfig, check_device_name, check_ranges, load_toml, merge
from ..store.logbook import read_table, weights_file, write_csv
from ..store.runlock import run_lock
from .agreement import AGREEMENT_COLUMNS, MIN_ARCHITECTURES, agreement_markdown, agreement_table
from .report import plot_eps_sweep

FINAL_COLUMNS = ["arch", "mode", "source", "epochs", "n_test", "clean", "clean_se", "fgsm", "fgsm_se", "pgd", "pgd_se",
                 "pgd50", "pgd50_se", "autoattack", "autoattack_se", "aa_n", "aa_version", "aa_clean", "aa_fgsm",
                 "aa_pgd", "zero_grad", "params", "flops", "train_s", "masking", "masking_reasons", "eps_sweep",
                 "model", "phenotype"]
STAGE_TITLES = {"search": "(1) end of search", "standard": "(2) longer standard training",
                "fgsm-rs": "(3) adversarial training (FGSM-RS)", "pgd": "(3) adversarial training (PGD)"}


@dataclass
class FinalSettings:
    select: str = "pareto"  # pareto | sum | an objective name of the run
    top: int = 0  # 0: the whole front (pareto) or 3 (rankings)
    epochs: float = 50.0
    adv: list = field(default_factory=list)
    adv_epochs: Optional[float] = None
    aa_n: Optional[int] = None  # None: the whole test set on a GPU, CPU_AA_N images on a CPU; 0: skip AutoAttack
    aa_budget: float = 30.0  # minutes one model's AutoAttack may be expected to take (inf: no limit)
    aa_iterations: Optional[int] = None  # quick checks and tests: a reduced AutoAttack (see accuracy_autoattack)
    pgd50: bool = False
    pgd50_restarts: int = 5
    sweep: tuple = (2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255)
    sweep_n: int = 500
    mask_gap: float = 0.10
    train_subset: Optional[int] = None
    test_n: Optional[int] = None
    skip_search_stage: bool = False
    device: str = "auto"
    threads: Optional[int] = None
    batch_size: int = 500
    accelerate: Optional[bool] = None  # TrainSettings.accelerate for stages 2-3 (a retrained stage 1: the run's)
    resume: bool = False  # keep final.csv rows of an interrupted run with the same settings
    snapshot_seconds: float = 120.0  # a training under way writes a snapshot (and a progress line) this often

    def validate(self) -> "FinalSettings":
        """Every option, before any data loads or model trains (a bad one found after training loses it)."""
        unset_or = lambda value, ok: value is None or ok(value)  # noqa: E731
        checks = [("--epochs", 0 < self.epochs < math.inf, "> 0 and finite"),
                  ("--adv-epochs", unset_or(self.adv_epochs, lambda v: 0 < v < math.inf), "> 0 and finite"),
                  ("--aa-n", unset_or(self.aa_n, lambda v: v >= 0), ">= 0"),
                  ("--aa-budget", self.aa_budget > 0, "> 0 minutes (inf: no limit)"),
                  ("--aa-iterations", unset_or(self.aa_iterations, lambda v: v >= 1), ">= 1"),
                  ("--mask-gap", 0 <= self.mask_gap < math.inf, ">= 0"),
                  ("--top", self.top >= 0, ">= 0"), ("--sweep-n", self.sweep_n >= 1, ">= 1"),
                  ("--pgd50-restarts", self.pgd50_restarts >= 1, ">= 1"),
                  ("--train-subset", unset_or(self.train_subset, lambda v: v >= 1), ">= 1"),
                  ("--test-n", unset_or(self.test_n, lambda v: v >= 1), ">= 1 (leave it out for the whole test set)"),
                  ("--threads", unset_or(self.threads, lambda v: v >= 0), ">= 0")]
        check_ranges([(name, getattr(self, name[2:].replace("-", "_")), ok, expected) for name, ok, expected in checks])
        check_device_name(self.device)
        return self


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def normalised_sum(rows: pd.DataFrame, objectives) -> pd.Series:
    """Sum of the objectives normalised as for the hypervolume (larger is better)."""
    return sum(rows[o.column].map(o.normalised) for o in objectives)


def select_architectures(pareto: pd.DataFrame, individuals: pd.DataFrame, rule: str, top: int,
                         objectives) -> pd.DataFrame:
    """The front (``pareto``, best normalised sum first), or the ``top`` evaluations by one objective's
    name (in its direction) or by ``sum``, the normalised sum of all the run's objectives."""
    by_name = {o.name: o for o in objectives}
    if rule == "pareto":
        chosen = pareto.assign(_key=normalised_sum(pareto, objectives))
    elif rule == "sum":
        chosen = individuals.assign(_key=normalised_sum(individuals, objectives))
    elif rule in by_name:
        o = by_name[rule]
        chosen = individuals.assign(_key=individuals[o.column] * o.weight)
    else:
        raise ConfigError(f"--select must be pareto, sum or one of the run's objectives "
                          f"({', '.join(by_name)}), got {rule!r}")
    if "status" in chosen:
        chosen = chosen[chosen.status == "ok"]
    chosen = chosen.sort_values("_key", ascending=False, kind="stable").drop(columns="_key")
    chosen = chosen.drop_duplicates("phenotype")
    return chosen.head(top) if top else (chosen if rule == "pareto" else chosen.head(3))


AA_GAP_FLOOR = 0.05  # least gap between a white-box accuracy and AutoAttack's that flags a model


def autoattack_gap_threshold(white: float, autoattack: float, n: int) -> float:
    """How far FGSM or PGD-20 accuracy may exceed AutoAttack's on the same ``n`` images before it is masking.

    Why: AutoAttack contains a PGD-like attack (APGD-CE), so on the same images
    its accuracy is at most a little below a weaker attack's; a large excess is
    the textbook sign of gradient masking.  A model with logits scaled by 1e4
    scored 0.272 under cross-entropy PGD-20 and 0.02 under AutoAttack, and no
    other rule flagged it.  Two standard errors of the difference (counted as
    if the two were independent, which overstates it for paired numbers and
    so errs towards not flagging), never below :data:`AA_GAP_FLOOR`.
    """
    spread = math.sqrt(binomial_se(white, n) ** 2 + binomial_se(autoattack, n) ** 2)
    return max(AA_GAP_FLOOR, 2 * spread)


def masking_reasons(m: dict, gap: float) -> list:
    reasons = []
    if m["fgsm"] - m["pgd"] > gap:
        reasons.append(f"FGSM exceeds PGD by {m['fgsm'] - m['pgd']:.3f} (> {gap:.2f})")
    for name, label in (("fgsm", "FGSM"), ("pgd", "PGD-20")):
        white, aa, n = m.get(f"aa_{name}", float("nan")), m.get("autoattack", float("nan")), m.get("aa_n", 0)
        if not n or math.isnan(white) or math.isnan(aa):
            continue
        threshold = autoattack_gap_threshold(white, aa, n)
        if white - aa > threshold:
            reasons.append(f"{label} exceeds AutoAttack by {white - aa:.3f} on the same {n} images "
                           f"(> {threshold:.3f})")
    if m.get("square_extra", 0) > 0:
        reasons.append(f"black-box Square broke {m['square_extra']} example(s) the white-box attacks missed")
    sweep = m["sweep"]
    accs = [a for _, a in sweep]
    se = [binomial_se(a, m["sweep_n"]) for a in accs]
    rises = [i for i in range(len(accs) - 1) if accs[i + 1] > accs[i] + 2 * se[i] + 0.01]
    if rises or (len(accs) > 1 and accs[0] > 0.02 and accs[-1] >= accs[0] - 0.01):
        reasons.append("PGD accuracy does not fall as epsilon grows (" +
                       ", ".join(f"{e * 255:.0f}/255:{a:.2f}" for e, a in sweep) + ")")
    if m["zero_grad"] > ZERO_GRADIENT_SHARE:
        reasons.append(f"input gradient is exactly zero on {m['zero_grad']:.0%} of {m['sweep_n']} images")
    return reasons


CPU_AA_N = 100  # AutoAttack's default sample on a CPU, where the whole test set takes days


def autoattack_n(asked: Optional[int], n: int, device: torch.device) -> int:
    """The images AutoAttack attacks: ``--aa-n`` (at most the test set), else all of them on a GPU and the
    first :data:`CPU_AA_N` on a CPU."""
    if asked is not None:
        return min(asked, n)
    return n if device.type == "cuda" else min(CPU_AA_N, n)


def check_autoattack_budget(model, x, y, aa_n: int, pgd: float, s: FinalSettings, echo: Callable) -> None:
    """Print AutoAttack's expected time on ``aa_n`` images, from one timed batch, and refuse (ConfigError) when
    it exceeds ``--aa-budget``.

    Why: on a CPU, AutoAttack of one 91k-parameter network on 50 images ran
    for more than 90 minutes with no output, and the default was the whole
    test set.  The estimate counts the standard version's passes per image
    (:func:`~nero_deap.engine.attacks.autoattack_seconds`) and assumes the
    images PGD-20 left standing are the ones the later attacks work on."""
    per_image = pass_seconds(model, x, y, batch=min(s.batch_size, aa_n))
    expected = autoattack_seconds(per_image, aa_n, pgd, s.aa_iterations, int(y.max()) + 1)
    what = "AutoAttack" + (" (standard)" if s.aa_iterations is None else f" (reduced: {s.aa_iterations} iterations)")
    echo(f"    {what} on {aa_n} images: about {_duration(expected)} expected (a timed batch; PGD-20 left "
         f"{pgd:.0%} standing)")
    if expected > s.aa_budget * 60:
        raise ConfigError(f"AutoAttack on {aa_n} images would take about {_duration(expected)} "
                          f"(over --aa-budget {s.aa_budget:g} min); lower --aa-n, or continue this final with the same "
                          "options and --resume --aa-budget inf (its trainings go on from their last snapshots)")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def robustness_metrics(model, x, y, s: FinalSettings, eps: float, seed: int,
                       echo: Callable = lambda message: None) -> dict:
    """Clean/FGSM/PGD/AutoAttack on (x, y) plus the audit's evidence."""
    n = len(y)
    echo(f"    clean, FGSM and PGD-20 on {n} test images")
    clean, fgsm = accuracy_clean_fgsm(model, x, y, eps, s.batch_size)
    m = {"n_test": n, "clean": clean, "fgsm": fgsm,
         "pgd": accuracy_pgd(model, x, y, eps, 20, 2 / 255, 1, s.batch_size, seed)}
    m["pgd50"] = accuracy_pgd(model, x, y, eps, 50, 2 / 255, s.pgd50_restarts, s.batch_size, seed) if s.pgd50 \
        else float("nan")
    aa_n = autoattack_n(s.aa_n, n, x.device)
    if aa_n:
        check_autoattack_budget(model, x, y, aa_n, m["pgd"], s, echo)
        aa = accuracy_autoattack(model, x, y, eps, aa_n, seed, s.batch_size, echo, s.aa_iterations)
        m.update(autoattack=aa["autoattack"], square_extra=aa["square_extra"], aa_clean=aa["clean"])
        if aa_n == n:  # the white-box numbers on AutoAttack's images, for the masking rule that compares them
            m.update(aa_fgsm=m["fgsm"], aa_pgd=m["pgd"])
        else:
            m["aa_fgsm"] = accuracy_clean_fgsm(model, x[:aa_n], y[:aa_n], eps, s.batch_size)[1]
            m["aa_pgd"] = accuracy_pgd(model, x[:aa_n], y[:aa_n], eps, 20, 2 / 255, 1, s.batch_size, seed)
    else:
        m.update(autoattack=float("nan"), square_extra=0, aa_clean=float("nan"), aa_fgsm=float("nan"),
                 aa_pgd=float("nan"))
    m["aa_n"] = aa_n
    k = min(s.sweep_n, n)
    m["sweep_n"] = k
    echo(f"    epsilon sweep ({len(s.sweep)} x PGD-10 on {k} images)")
    m["sweep"] = [(e, accuracy_pgd(model, x[:k], y[:k], e, 10, e / 4, 1, s.batch_size, seed)) for e in s.sweep]
    m["zero_grad"] = zero_gradient_share(model, x[:k], y[:k], s.batch_size)
    return m


def final_row(arch: int, mode: str, epochs: float, model, m: dict, train_s: float, path: Path, s: FinalSettings,
              phenotype: str, source: str) -> dict:
    row = {"arch": arch, "mode": mode, "source": source, "epochs": epochs, "n_test": m["n_test"], "aa_n": m["aa_n"],
           "aa_version": "standard" if s.aa_iterations is None else f"reduced-{s.aa_iterations}",
           "aa_clean": m["aa_clean"], "aa_fgsm": m["aa_fgsm"], "aa_pgd": m["aa_pgd"], "zero_grad": m["zero_grad"],
           "params": model.params, "flops": model.flops, "train_s": round(train_s, 2), "model": str(path),
           "phenotype": phenotype, "eps_sweep": ";".join(f"{e:.5f}:{a:.4f}" for e, a in m["sweep"])}
    for key, n in (("clean", m["n_test"]), ("fgsm", m["n_test"]), ("pgd", m["n_test"]), ("pgd50", m["n_test"]),
                   ("autoattack", m["aa_n"])):
        row[key] = m[key]
        row[f"{key}_se"] = binomial_se(m[key], n) if not math.isnan(m[key]) else float("nan")
    reasons = masking_reasons(m, s.mask_gap)
    row["masking"] = bool(reasons)
    row["masking_reasons"] = " | ".join(reasons)
    return row


def diverged_row(arch: int, mode: str, epochs: float, sizes, reason: str, n_test: int, phenotype: str) -> dict:
    """The row of a training that diverged: no scores, no model file, the reason in ``source`` (``sizes``: the
    network's plan, for its params and flops).

    Why: a retraining whose loss went non-finite once stopped ``final`` with a
    traceback, and ``--resume`` met the same divergence (same seed) every time.
    """
    row = {column: float("nan") for column in FINAL_COLUMNS}
    row.update({"arch": arch, "mode": mode, "source": f"{DIVERGED}: {reason}", "epochs": epochs, "n_test": n_test,
                "aa_n": 0, "params": sizes.params, "flops": sizes.flops, "train_s": float("nan"), "model": "",
                "phenotype": phenotype, "eps_sweep": "", "masking": False, "masking_reasons": ""})
    return row


DIVERGED = "diverged"
PARTIAL_SUFFIX = ".partial"  # models/<arch>-<mode>-<fingerprint>.partial: the last snapshot of a training


def partial_path(run_dir: Path, arch: int, mode: str, fingerprint: str) -> Path:
    """Where the snapshot of a training under way lives; ``fingerprint`` (:func:`training_fingerprint`) is in
    the name, so a snapshot is only ever continued by the very training that wrote it."""
    return Path(run_dir) / "models" / f"{arch}-{mode}-{fingerprint}{PARTIAL_SUFFIX}"


def training_fingerprint(s: "FinalSettings", device, phenotype: str, mode: str, settings: TrainSettings,
                         images: int) -> str:
    """A short hash of everything a training's course depends on: final's result settings, the device,
    the network, the mode, seed, epochs, attack, precision and the number of training images."""
    import hashlib

    parts = [settings_json(s), str(device), phenotype, mode, settings.seed, settings.epochs, settings.adv,
             settings.eps, bool(settings.accelerate), images]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def remove_snapshots(run_dir: Path, pattern: str = "*", temp_only: bool = False) -> int:
    """Delete ``models/<pattern>.partial`` (unless ``temp_only``) and the temporary files a kill while writing
    one leaves; returns how many snapshots (not temporary files) went."""
    models = Path(run_dir) / "models"
    snapshots = [] if temp_only else list(models.glob(f"{pattern}{PARTIAL_SUFFIX}"))
    for path in snapshots + list(models.glob(f".{pattern}{PARTIAL_SUFFIX}.*")):
        path.unlink(missing_ok=True)
    return len(snapshots)


def retrain(phenotype: Phenotype, splits, x: torch.Tensor, y: torch.Tensor, settings: TrainSettings,
            partial: Path, device, echo: Callable, label: str) -> tuple:
    """(model, training seconds) of ``phenotype`` trained on ``x, y``, continuing from the snapshot in
    ``partial`` if one is there and writing one there every ``settings.checkpoint_seconds`` (with a progress
    line): a 50-epoch retraining killed after hours loses minutes, and the continuation is exact on the CPU
    (tests/test_engine.py).  Snapshots of this architecture and mode made under other settings, and one that
    cannot be read, are set aside with a warning: training starts over.  A time-capped training (stage 1
    under the search's ``max_seconds``) writes none: writing would eat into its cap.
    """
    arch_mode = partial.name.rsplit("-", 1)[0]
    for other in partial.parent.glob(f"{arch_mode}-*{PARTIAL_SUFFIX}"):
        if other != partial:
            echo(f"warning: {other.name} was made with other settings or on another device; set aside")
            other.unlink()
    resume = partial.read_bytes() if partial.is_file() else None
    if resume is not None:
        step = snapshot_step(resume)
        if step is None:
            echo(f"warning: {partial} is not a training snapshot; training {label.strip()} from the start")
            resume = None
        else:
            echo(f"{label}: continuing from its snapshot at step {step} ({partial.name})")

    def keep(blob: bytes, step: int, total: int, loss: float, seconds: float) -> None:
        write_bytes_atomic(partial, blob)
        if step == total:  # the finished training's snapshot: kept until the row is written
            echo(f"{label}: trained in {seconds:.0f} s (loss {loss:.3f}); scoring")
        else:
            echo(f"{label}: step {step}/{total} ({100 * step / total:.0f}%), loss {loss:.3f}, {seconds:.0f} s")

    torch.manual_seed(settings.seed)
    model = build_network(phenotype, splits.num_classes, splits.image_shape, splits.mean, splits.std).to(device)
    capped = settings.max_seconds is not None
    result = train(model, phenotype.learning, x, y, settings, resume=resume, checkpoint=None if capped else keep)
    return model, result.seconds


SETTINGS_FILE = "final-settings.json"
# rows do not depend on them
NOT_RESULT_SETTINGS = ("select", "top", "device", "threads", "batch_size", "resume", "snapshot_seconds",
                       "aa_budget")  # --aa-budget changes whether AutoAttack starts, never a number


def settings_json(s: FinalSettings) -> str:
    """The settings a final.csv row depends on, as JSON: what --resume must find unchanged."""
    return json.dumps({k: v for k, v in asdict(s).items() if k not in NOT_RESULT_SETTINGS}, sort_keys=True)


def finished_rows(run_dir: Path, s: FinalSettings) -> dict:
    """Rows of an interrupted ``final`` with the same settings, by (arch, mode), whose model file exists."""
    saved, table = run_dir / SETTINGS_FILE, run_dir / "final.csv"
    if not saved.exists():
        return {}
    try:
        same = json.loads(saved.read_text()) == json.loads(settings_json(s))
    except (OSError, ValueError):  # damaged: cannot tell what made final.csv
        raise ConfigError(f"--resume: {saved} is unreadable; drop --resume to start over") from None
    if not same:  # also before final.csv exists: a final killed in its first training
        raise ConfigError(f"--resume: the final in {run_dir} was made with other settings ({saved}); "
                          "use the same options, or drop --resume to start over")
    if not table.exists():
        return {}
    rows = pd.read_csv(table).to_dict("records")
    for r in rows:  # an empty text cell reads back as NaN
        r["masking_reasons"] = r["masking_reasons"] if isinstance(r["masking_reasons"], str) else ""
    return {(int(r["arch"]), r["mode"]): r for r in rows
            if str(r["source"]).startswith(DIVERGED) or Path(str(r["model"])).exists()}


@dataclass
class FinalPlan:
    """What ``final`` works from, all checked before the first training: the run's config and objectives, the
    chosen architectures (rows of pareto.csv/individuals.csv) with their decoded phenotypes, the search's splits
    (stage 1) and the full ones (stages 2-3, trained on train + validation), and the (mode, epochs, adversarial
    attack) of each training an architecture gets."""
    cfg: RunConfig
    objectives: list
    chosen: pd.DataFrame
    phenotypes: dict
    search: DataSplits
    full: DataSplits
    full_x: torch.Tensor  # stages 2-3 train on the whole training split: train + validation
    full_y: torch.Tensor
    device: torch.device
    modes: list  # (mode, epochs, adversarial attack or None)

    @property
    def n_test(self) -> int:
        return len(self.full.test_y)


def plan_final(run_dir: Path, s: FinalSettings) -> FinalPlan:
    """Read and check everything a final on ``run_dir`` needs, load the data; ConfigError or ModelFileError
    (one line naming the file) for a run that cannot be finished, before any training starts."""
    s.validate()
    if not (run_dir / "pareto.csv").exists() or not (run_dir / "config.toml").exists():
        raise ConfigError(f"{run_dir} is not a finished search run (no pareto.csv/config.toml)")
    cfg = merge(RunConfig(), load_toml(str(run_dir / "config.toml")), str(run_dir / "config.toml"))
    objectives = parse_objectives(cfg.objectives)
    scores = [o.column for o in objectives]
    columns = ["id", "phenotype", "train_s", *scores]
    chosen = select_architectures(read_table(run_dir / "pareto.csv", columns, ["id", "train_s"], [*scores, "id"]),
                                  read_table(run_dir / "individuals.csv", [*columns, "status"], ["id", "train_s"],
                                             [*scores, "id"]), s.select, s.top, objectives)
    if chosen.empty:
        raise ConfigError(f"{run_dir}: no architecture to retrain (--select {s.select} chose none)")
    device = claim_device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    raw = load_raw(cfg.data)
    search = make_splits(raw, cfg.val_size or None, cfg.split_seed, cfg.train_subset or None, s.test_n).to(device)
    full = make_splits(raw, cfg.val_size or None, cfg.split_seed, s.train_subset, s.test_n).to(device)
    modes = ([] if s.skip_search_stage else [("search", cfg.epochs, None)]) + [("standard", s.epochs, None)] + \
        [(mode, s.adv_epochs or s.epochs, mode) for mode in s.adv]
    phenotypes = {}
    for _, arch in chosen.iterrows():  # every network decodes, before the first one trains
        try:
            phenotypes[int(arch.id)] = Phenotype.from_text(str(arch.phenotype))
            plan_network(phenotypes[int(arch.id)], full.num_classes, full.image_shape)
        except ValueError as exc:  # an edited or damaged row (NetworkError is a ValueError)
            raise ConfigError(f"{run_dir / 'pareto.csv'}: arch {int(arch.id)}: {exc}"[:300]) from None
        stored = weights_file(run_dir, int(arch.id))  # copied over, or another run's: not this architecture's
        if not s.skip_search_stage and stored.exists() and \
                load_model(stored).phenotype_text != phenotypes[int(arch.id)].to_text():
            raise ModelFileError(f"{stored}: holds another network than arch {int(arch.id)} of the run; "
                                 f"remove it to retrain the architecture instead")
    full_x, full_y = torch.cat([full.train_x, full.val_x]), torch.cat([full.train_y, full.val_y])
    return FinalPlan(cfg, objectives, chosen, phenotypes, search, full, full_x, full_y, device, modes)


def final_one(run_dir: Path, plan: FinalPlan, s: FinalSettings, arch, offset: int, echo: Callable) -> dict:
    """The final.csv row of one architecture (a row of ``plan.chosen``) in the ``offset``-th of ``plan.modes``:
    the search's weights (stage 1, when the run kept them) or a (re)training, then every attack on the test
    split and the model saved; a training that diverges gives a row without scores (:func:`diverged_row`)."""
    mode, epochs, adv = plan.modes[offset]
    phenotype, label = plan.phenotypes[int(arch.id)], f"  arch {int(arch.id)} {mode}"
    splits = plan.search if mode == "search" else plan.full
    seed = derive_seed(plan.cfg.seed, int(arch.id)) + (0 if mode == "search" else offset)
    stored = weights_file(run_dir, int(arch.id))
    if mode == "search" and stored.exists():
        echo(f"{label}: the weights the search scored ({stored})")
        model, train_s = load_model(stored, map_location=plan.device), float(arch.train_s)
        source = "search weights"
    else:
        x, y = (splits.train_x, splits.train_y) if mode == "search" else (plan.full_x, plan.full_y)
        echo(f"{label}: training {epochs:g} epochs on {len(y)} images")
        # stage 1 is the search's own training: its time cap and its numerics (bf16 or float32), whatever
        # --accelerate says for stages 2-3; with final's default a bf16 search was retrained in float32
        cap = (plan.cfg.max_seconds or None) if mode == "search" else None
        accelerate = ACCELERATE[plan.cfg.accelerate] if mode == "search" else s.accelerate
        settings = TrainSettings(epochs=epochs, max_seconds=cap, seed=seed, adv=adv, eps=plan.cfg.eps,
                                 accelerate=accelerate, checkpoint_seconds=s.snapshot_seconds)
        partial = partial_path(run_dir, int(arch.id), mode,
                               training_fingerprint(s, plan.device, phenotype.to_text(), mode, settings, len(y)))
        try:
            model, train_s = retrain(phenotype, splits, x, y, settings, partial, plan.device, echo, label)
        except Diverged as exc:
            sizes = plan_network(phenotype, splits.num_classes, splits.image_shape)  # no allocation
            echo(f"{label}: training diverged ({exc}): recorded without scores")
            return diverged_row(int(arch.id), mode, epochs, sizes, str(exc), len(splits.test_y), arch.phenotype)
        source = "retrained"
    m = robustness_metrics(model, splits.test_x, splits.test_y, s, plan.cfg.eps, seed, echo)
    path = save_model(model, run_dir / "models" / f"{int(arch.id)}-{mode}.pt", num_classes=splits.num_classes,
                      in_shape=splits.image_shape, mean=splits.mean, std=splits.std,
                      info={"arch": int(arch.id), "mode": mode, "epochs": float(epochs)})
    r = final_row(int(arch.id), mode, epochs, model, m, train_s, path, s, arch.phenotype, source)
    echo(result_line(r))
    return r


def accuracy_text(value: float, n: int) -> str:
    """``0.155 ± 0.011 (n 1000)``: an accuracy with its n, and its standard error where n < 1,000."""
    if n == 0 or math.isnan(value):
        return "-"
    se = f" ± {binomial_se(value, n):.3f}" if n < 1000 else ""
    return f"{value:.3f}{se} (n {n})"


def result_line(r: dict) -> str:
    """One model's console line: every accuracy beside its n, so a number on 5 images does not pass for one on
    10,000, then the masking verdict."""
    scores = "  ".join(f"{label} {accuracy_text(r[key], r['aa_n'] if key == 'autoattack' else r['n_test'])}"
                       for key, label in (("clean", "clean"), ("fgsm", "FGSM"), ("pgd", "PGD-20"),
                                          ("autoattack", "AutoAttack")))
    verdict = f"flagged for masking: {r['masking_reasons']}" if r["masking"] else "not flagged for masking"
    return f"  arch {r['arch']:>4} {r['mode']:<9} {scores}  {verdict}"


def write_summaries(run_dir: Path, plan: FinalPlan, rows: list, s: FinalSettings, echo: Callable) -> pd.DataFrame:
    """agreement.csv (with enough architectures), eps_sweep.png and report.md from the finished rows."""
    table = pd.DataFrame(rows, columns=FINAL_COLUMNS)
    agreement = pd.DataFrame(columns=AGREEMENT_COLUMNS)
    standard = table[(table["mode"] == "standard") & table.clean.notna()]  # a diverged training has no scores
    if standard.arch.nunique() >= MIN_ARCHITECTURES:
        agreement = agreement_table(plan.chosen, standard, plan.objectives)
        write_csv(run_dir / "agreement.csv", AGREEMENT_COLUMNS, agreement.to_dict("records"))
        echo(f"wrote {run_dir / 'agreement.csv'} (Kendall's tau, search objectives vs stage (2) test metrics)")
    figure = "eps_sweep.png" if plot_eps_sweep(table, run_dir / "eps_sweep.png", plan.cfg.eps) else None
    (run_dir / "report.md").write_text(report_markdown(run_dir, table, plan.cfg, s, agreement, figure))
    echo(f"wrote {run_dir / 'final.csv'} and {run_dir / 'report.md'}")
    return table


def begin_final(run_dir: Path, s: FinalSettings, echo: Callable) -> dict:
    """What an earlier final in ``run_dir`` leaves this one: with ``--resume`` its finished rows (same settings
    only, :func:`finished_rows`) and its snapshots; without, nothing: its snapshots and final.csv go.  Then
    this final's settings are written, before its first training (a snapshot is checked against them)."""
    done = finished_rows(run_dir, s) if s.resume else {}
    removed = remove_snapshots(run_dir, temp_only=s.resume)
    if removed:  # a fresh final: another final's unfinished trainings are not continued
        echo(f"removed {removed} snapshot(s) of an unfinished earlier final (to continue one, use --resume)")
    earlier = run_dir / "final.csv"
    if not s.resume and earlier.exists():  # else, killed before its first row, this final would leave the
        earlier.unlink()  # earlier rows beside its own settings, and --resume would keep them as its own
        echo("removed the final.csv of an earlier final: this one starts over (to keep its rows, use --resume)")
    write_bytes_atomic(run_dir / SETTINGS_FILE, settings_json(s).encode())
    return done


def run_final(run_dir: Path, s: FinalSettings, echo: Callable = print) -> pd.DataFrame:
    """Run the final stage on the search run in ``run_dir``; return the ``final.csv`` table.  final.csv is
    rewritten after every model, and a training's snapshot removed only once its row is in it, so a final
    killed at any point loses at most ``s.snapshot_seconds`` of training (continued by ``--resume``); a
    time-capped stage-1 retraining writes no snapshot and is trained again."""
    run_dir = Path(run_dir)
    plan = plan_final(run_dir, s)
    aa_n = autoattack_n(s.aa_n, plan.n_test, plan.device)
    echo(f"final: {len(plan.chosen)} architecture(s) x {len(plan.modes)} training mode(s) on {plan.device}; "
         f"test images {plan.n_test}, AutoAttack on {aa_n}"
         + (" (the CPU default; --aa-n to change)" if s.aa_n is None and aa_n < plan.n_test else ""))
    models = [(arch, offset) for _, arch in plan.chosen.iterrows() for offset in range(len(plan.modes))]
    with run_lock(run_dir, "final"):  # a search or another final writing here would mix their files
        done = begin_final(run_dir, s, echo)
        rows = []
        for arch, offset in tqdm(models, desc="final", unit="model", disable=not sys.stderr.isatty()):
            mode = plan.modes[offset][0]
            if (int(arch.id), mode) in done:
                rows.append(done[int(arch.id), mode])
                echo(f"  arch {int(arch.id)} {mode}: done in an earlier run (final.csv), kept")
                continue
            rows.append(final_one(run_dir, plan, s, arch, offset, echo))
            write_csv(run_dir / "final.csv", FINAL_COLUMNS, rows)
            remove_snapshots(run_dir, f"{int(arch.id)}-{mode}-*")  # only once its row is written
        return write_summaries(run_dir, plan, rows, s, echo)


def _pm(value: float, se: float) -> str:
    return "n/a" if value != value else f"{100 * value:.1f} ± {100 * se:.1f}"


def report_markdown(run_dir: Path, table: pd.DataFrame, cfg: RunConfig, s: FinalSettings,
                    agreement: Optional[pd.DataFrame] = None, eps_figure: Optional[str] = None) -> str:
    lines = [f"# Final report: `{run_dir}`", "",
             f"Data: `{cfg.data}`; test images: {int(table.n_test.iloc[0]) if len(table) else 0}; "
             f"L-inf eps = {cfg.eps * 255:.0f}/255 on [0,1] pixels; accuracies in % ± binomial standard error.",
             "Stage (1) uses the weights the search trained (source `search weights`) or, where the run kept none, "
             "the same training re-run (source `retrained`: same data, budget and seed); scored on the test split.",
             "", "## The three-stage claim", "",
             "| arch | stage | training | clean | FGSM | PGD-20 | AutoAttack (n, clean on those n) | masking? |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        if str(r.source).startswith(DIVERGED):
            lines.append(f"| {r.arch} | {STAGE_TITLES.get(r['mode'], r['mode'])} | {r.epochs:g} epochs "
                         f"({r.source}) | n/a | n/a | n/a | n/a | n/a |")
            continue
        aa = (f"{_pm(r.autoattack, r.autoattack_se)} (n={int(r.aa_n)}, clean {100 * r.aa_clean:.1f})"
              if r.aa_n else "skipped")
        lines.append(f"| {r.arch} | {STAGE_TITLES.get(r['mode'], r['mode'])} | {r.epochs:g} epochs ({r.source}) | "
                     f"{_pm(r.clean, r.clean_se)} | {_pm(r.fgsm, r.fgsm_se)} | {_pm(r.pgd, r.pgd_se)} | {aa} | "
                     f"{'**yes**' if r.masking else 'no'} |")
    lines += ["| NERO-Net (paper) | (1) / (2) / (3) | CIFAR-10 | 87 / 93 / - | 33 / 47 / - | - | - / - / 40 | |", "",
              "## Gradient-masking audit", "",
              f"Flags: FGSM − PGD > {s.mask_gap:.2f}; FGSM or PGD-20 above AutoAttack on the same images by more "
              f"than two standard errors (at least {AA_GAP_FLOOR:.2f}); Square breaks what white-box attacks could "
              f"not; PGD accuracy not falling with epsilon; a zero input gradient on more than "
              f"{ZERO_GRADIENT_SHARE:.0%} of the images.", ""]
    flagged = table[table.masking]
    if flagged.empty:
        lines.append("No model was flagged.")
    for _, r in flagged.iterrows():
        lines.append(f"- arch {r.arch} ({r['mode']}): {r.masking_reasons}")
    if eps_figure:
        lines += ["", f"![accuracy under PGD-10 against epsilon]({eps_figure})"]
    if agreement is not None and not agreement.empty:
        lines += [""] + agreement_markdown(agreement)
    lines += ["", "## Architectures", ""]
    for arch, group in table.groupby("arch", sort=False):
        lines.append(f"- **{arch}** ({int(group.params.iloc[0]):,} parameters, {int(group.flops.iloc[0]):,} FLOPs): "
                     f"`{group.phenotype.iloc[0]}`")
    models = [m for m in table.model if isinstance(m, str) and m]
    lines += ["", "Models: `" + "`, `".join(models) + "` (load with `nero_deap.load_model(path)`).", ""]
    return "\n".join(lines)
