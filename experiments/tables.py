"""Shared by the experiment summaries: tables as markdown."""
import pandas as pd


def markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """A pipe table (pandas' to_markdown needs tabulate, which nero-deap does not depend on)."""
    def cell(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)
