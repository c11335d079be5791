"""Shared by the experiment summaries: tables as markdown."""
import pandas as pd


def markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """A pipe table (pandas' to_markdown needs tabulate, which nero-deap does not depend on)."""
    def cell(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def seed_of(name: str) -> str:
    """The seed part of a run's name (``halving-s3`` -> ``s3``): what pairs two arms' runs of one seed."""
    return name.rsplit("-", 1)[-1]


def paired_difference(diff: pd.Series, what: str, first: str) -> str:
    """One difference per seed (``what``, e.g. "halving - plain HV"; ``first``, the side it subtracts from,
    e.g. "halving"): how many seeds each side leads, the median difference, and two-sided exact tests of "no
    difference" over the seeds that differ: the sign test and Wilcoxon's signed-rank test.  Below 6 such
    seeds neither can reach p < 0.05 (their smallest p is 2 / 2^n)."""
    from scipy.stats import binomtest, wilcoxon

    diff = diff.dropna()
    differ = diff[diff != 0]
    ahead, behind = int((differ > 0).sum()), int((differ < 0).sum())
    sign = binomtest(ahead, len(differ)).pvalue if len(differ) else float("nan")
    signed_rank = wilcoxon(differ, method="exact").pvalue if len(differ) else float("nan")
    return (f"{what} over {len(diff)} seeds: {first} ahead in {ahead}, behind in {behind}; "
            f"median difference {diff.median():+.4f} (range {diff.min():+.4f} to {diff.max():+.4f}); "
            f"sign test p = {sign:.3f}, Wilcoxon signed-rank p = {signed_rank:.3f}"
            + (" (fewer than 6 seeds differ: no p can fall below 0.05)" if len(differ) < 6 else ""))
