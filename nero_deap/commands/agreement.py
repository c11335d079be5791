"""Do search scores predict the final?  Kendall's tau between search objectives and final test metrics.

A search is only useful if the ranking it produces (short training,
validation split, a cheap attack) survives the final stage's long training
and strong attacks on the test split.  For every search objective and every
final metric of stage (2), the standard retraining, this computes Kendall's
tau-b over the selected architectures with its two-sided p-value (scipy:
exact for small samples without ties).  Objectives that are minimised
(``params``, ``flops``) are negated first, so tau > 0 always reads "what the
search preferred also did better in the final"; tau near 0 or a large
p-value means the search score does not predict that metric.  With 3
architectures even a perfect ranking has p = 0.33: read the p-value before
the tau.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd

FINAL_METRICS = ("clean", "fgsm", "pgd", "autoattack")  # final.csv columns: test accuracies
AGREEMENT_COLUMNS = ["objective", "metric", "tau", "p_value", "n"]
MIN_ARCHITECTURES = 3


def kendall(x: Sequence[float], y: Sequence[float]) -> tuple:
    """(tau-b, two-sided p-value); NaN where either side is constant."""
    from scipy.stats import kendalltau

    result = kendalltau(list(x), list(y))
    return float(result.statistic), float(result.pvalue)


def agreement_table(search: pd.DataFrame, final: pd.DataFrame, objectives: Sequence) -> pd.DataFrame:
    """Tau of each objective (``search`` rows: id + objective columns) against each metric of ``final``
    (rows of one training mode: arch + metric columns), over the architectures both hold.

    Only those columns are joined: final.csv also has ``params`` and ``flops``, which pandas would rename
    (``params_x``) under a search that optimised them (a KeyError at the end of a whole ``final`` once)."""
    scores = search.drop_duplicates("id")[["id"] + list(dict.fromkeys(o.column for o in objectives))]
    joined = scores.merge(final[["arch", *FINAL_METRICS]], left_on="id", right_on="arch")
    rows = []
    for o in objectives:
        score = joined[o.column] * (o.weight)
        for metric in FINAL_METRICS:
            valid = joined[metric].notna()
            tau, p = kendall(score[valid], joined.loc[valid, metric]) if valid.sum() >= 2 else (float("nan"),) * 2
            rows.append({"objective": o.name, "metric": metric, "tau": tau, "p_value": p, "n": int(valid.sum())})
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def agreement_markdown(table: pd.DataFrame) -> list:
    """Lines for report.md: one row per objective, one column per final metric, 'tau (p)'."""
    if table.empty:
        return []
    metrics = list(dict.fromkeys(table.metric))
    lines = ["## Do search scores predict the final? (Kendall's tau, stage (2), p-value in brackets)", "",
             "| search objective | " + " | ".join(f"test {m}" for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for objective, group in table.groupby("objective", sort=False):
        cells = {r.metric: "n/a" if r.tau != r.tau else f"{r.tau:+.2f} ({r.p_value:.2f})" for r in group.itertuples()}
        lines.append(f"| {objective} | " + " | ".join(cells[m] for m in metrics) + " |")
    n = int(table.n.max())
    lines += ["", f"Over {n} architectures. tau > 0: the search's preference (higher accuracy, smaller size) "
                  "agrees with the final ranking; read the p-value first (with 3 architectures a perfect ranking "
                  "has p = 0.33).", ""]
    return lines
