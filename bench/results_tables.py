#!/usr/bin/env python
"""Regenerate the tables of BENCHMARKS.md and RESULTS.md from the committed data files.

    python bench/results_tables.py           # rewrite every table between its markers
    python bench/results_tables.py --check   # exit 1, naming what differs, if a table is out of date, a
                                             # figure no longer follows from its data or a data file is
                                             # missing; exit 0 otherwise

The index is ``bench/results/claims.json``: ``tables`` maps a table's name to the markdown file it lives in
(and its columns, where not ``STANDARD``); ``devices`` names the machines; ``claims`` holds one row each (id, table, the claim, its figure, device, date, code,
command, data files), and ``values`` says how the figure's numbers follow from the data files (the ops
below).  ``format`` builds the figure from those values; the result must equal ``figure``, so a changed data
file cannot silently change a published number: edit ``figure`` in the index to accept it.  A row without
``values`` (a figure cited from a paper, a run not yet made) is copied as it stands.  In the markdown each
table sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; the prose around it is left alone.

Ops (each value a JSON object with ``op``; ``file`` paths are relative to the repository root and must be
listed in the claim's ``data``; ``filter`` is a list of ``[column, operator, value]``):

* ``csv``: ``column`` of a CSV file reduced by ``agg`` (mean, median, sum, min, max, count, first);
* ``rate``: ``sum(num) / sum(den) * scale`` over a CSV file's rows;
* ``paired``: per row ``a - b``: ``stat`` ahead, behind, n, median_diff, sign_p or wilcoxon_p (two-sided,
  exact, as scipy's ``binomtest`` and ``wilcoxon(method="exact")`` give them where no |a - b| ties);
* ``spearman``: rank correlation of two CSV columns;
* ``regex``: a number matched in a text file (``group``; ``agg`` over all matches, else match ``index``,
  default the first; ``"text": true`` keeps it a string);
* ``interleave``: a ``bench_engine.py --interleave-csv`` file: per-round share of the convolution limit
  (``share_*``), limit in GFLOP/s (``limit_*``), images/s (``ips_*``), ms per image outside convolutions
  (``outside_*``), each ``_median``, ``_min`` or ``_max`` over the rounds;
* ``candidates``: ``bench/compare_candidates.py``'s geometric means of a ``bench_candidates.py`` output
  (``stat`` with, without, n_with, n_without, min_with, max_with);
* ``ratio``: ``num / den * scale`` of two values named before it in the same claim.

Only the standard library and pandas: the tables regenerate without the package installed.
"""
import argparse
import json
import math
import operator
import re
import statistics
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
INDEX = "bench/results/claims.json"
STANDARD = [["What", "claim"], ["Figure", "figure"], ["Device", "device"], ["Date", "date"], ["Code", "code"],
            ["Command", "command"], ["Data", "data"]]  # a table's columns unless its entry names others
OPS = {"==": operator.eq, "!=": operator.ne, ">": operator.gt, ">=": operator.ge, "<": operator.lt,
       "<=": operator.le, "in": lambda a, b: a in b}


class ClaimError(Exception):
    pass


# --- statistics (exact, as scipy computes them) -------------------------------------------------------------


def sign_test_p(ahead: int, behind: int) -> float:
    """Two-sided exact binomial test of ``ahead`` successes in ``ahead + behind`` at p = 1/2."""
    n, k = ahead + behind, min(ahead, behind)
    if n == 0:
        return float("nan")
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def wilcoxon_p(diffs: list) -> float:
    """Two-sided exact Wilcoxon signed-rank p over the non-zero differences: the positive ranks' sum
    against all 2^n sign patterns.  Ties in |d| are refused (scipy's exact method treats them its own way)."""
    d = [x for x in (round(v, 12) for v in diffs) if x != 0]
    if not d:
        return float("nan")
    if len({abs(x) for x in d}) < len(d):
        raise ValueError(f"tied absolute differences in {d}: no exact Wilcoxon p here")
    order = sorted(range(len(d)), key=lambda i: abs(d[i]))
    rank = {i: r + 1 for r, i in enumerate(order)}
    counts = {0: 1}  # the null distribution of the positive rank sum
    for r in range(1, len(d) + 1):
        nxt = dict(counts)
        for total, c in counts.items():
            nxt[total + r] = nxt.get(total + r, 0) + c
        counts = nxt
    t = sum(rank[i] for i, x in enumerate(d) if x > 0)
    low = sum(c for s, c in counts.items() if s <= t) / 2 ** len(d)
    high = sum(c for s, c in counts.items() if s >= t) / 2 ** len(d)
    return min(1.0, 2 * min(low, high))


# --- values ------------------------------------------------------------------------------------------------


_cache = {}  # (kind, path) -> contents, for one run: most files feed several claims


def read_text(root: Path, name: str) -> str:
    key = ("text", root / name)
    if key not in _cache:
        _cache[key] = (root / name).read_text()
    return _cache[key]


def read_csv(root: Path, name: str) -> pd.DataFrame:
    key = ("csv", root / name)
    if key not in _cache:
        _cache[key] = pd.read_csv(root / name)
    return _cache[key]


def rows(root: Path, spec: dict) -> pd.DataFrame:
    table = read_csv(root, spec["file"])
    for column, op, value in spec.get("filter", []):
        if column not in table:
            raise ClaimError(f"{spec['file']} has no column {column!r}")
        table = table[[OPS[op](v, value) for v in table[column]]]
    if table.empty:
        raise ClaimError(f"no rows of {spec['file']} pass {spec.get('filter')}")
    return table


def column(table: pd.DataFrame, spec: dict, name: str) -> pd.Series:
    if name not in table:
        raise ClaimError(f"{spec['file']} has no column {name!r}")
    return table[name]


def reduce(values, agg: str):
    values = list(values)
    if agg == "first":
        return values[0]
    if agg == "count":
        return len(values)
    return {"mean": statistics.fmean, "median": statistics.median, "sum": math.fsum,
            "min": min, "max": max}[agg]([float(v) for v in values])


def interleave_rounds(table: pd.DataFrame) -> dict:
    """Per round of ``bench_engine.py --interleave``: share, limit, images/s, ms outside convolutions
    (pooled over the round's steps as ``share_parts`` in bench/bench_engine.py pools them)."""
    out = {"share": [], "limit": [], "ips": [], "outside": []}
    for _, g in table.groupby("round"):
        limit = g.slice_flops.sum() / g.slice_s.sum()
        per_image = g.engine_s.sum() / g.images.sum()
        flops = float(g.flops_per_image.iloc[0])
        out["share"].append(flops / per_image / limit)
        out["limit"].append(limit / 1e9)
        out["ips"].append(1 / per_image)
        out["outside"].append((per_image - flops / limit) * 1e3)
    return out


def value(root: Path, spec: dict, known: dict):
    op = spec["op"]
    if op == "ratio":
        return known[spec["num"]] / known[spec["den"]] * spec.get("scale", 1)
    if op == "regex":
        found = re.findall(spec["pattern"], read_text(root, spec["file"]), flags=re.M)
        if not found:
            raise ClaimError(f"{spec['file']}: no match for {spec['pattern']!r}")
        group = spec.get("group", 1)
        picked = [f[group - 1] if isinstance(f, tuple) else f for f in found]
        if "agg" in spec:
            return reduce(picked, spec["agg"])
        text = picked[spec.get("index", 0)]
        return text if spec.get("text") else float(text.replace(",", ""))
    if op == "candidates":
        sys.path.insert(0, str(HERE))
        from compare_candidates import geometric_mean, runs  # noqa: E402  (bench's own helper)

        found = runs(read_text(root, spec["file"]))
        on, off = found[(spec["grammar"], "1")], found[(spec["grammar"], "0")]
        ratios = {c: on[c][0] / off[c][0] for c in on if c in off}
        with_c = [r for c, r in ratios.items() if on[c][1]]
        without = [r for c, r in ratios.items() if not on[c][1]]
        return {"with": geometric_mean(with_c), "without": geometric_mean(without), "n_with": len(with_c),
                "n_without": len(without), "min_with": min(with_c), "max_with": max(with_c)}[spec["stat"]]
    table = rows(root, spec)
    if op == "csv":
        return reduce(column(table, spec, spec["column"]), spec.get("agg", "first"))
    if op == "rate":
        return (column(table, spec, spec["num"]).sum() / column(table, spec, spec["den"]).sum()
                * spec.get("scale", 1))
    if op == "paired":
        diffs = [round(a - b, 12) for a, b in zip(column(table, spec, spec["a"]), column(table, spec, spec["b"]))]
        ahead, behind = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        return {"ahead": lambda: ahead, "behind": lambda: behind, "n": lambda: len(diffs),
                "median_diff": lambda: statistics.median(diffs), "sign_p": lambda: sign_test_p(ahead, behind),
                "wilcoxon_p": lambda: wilcoxon_p(diffs)}[spec["stat"]]()
    if op == "spearman":
        x, y = column(table, spec, spec["x"]).rank(), column(table, spec, spec["y"]).rank()
        return x.corr(y)
    if op == "interleave":
        what, stat = spec["stat"].rsplit("_", 1)
        return reduce(interleave_rounds(table)[what], stat)
    raise ClaimError(f"unknown op {op!r}")


def files_of(claim: dict) -> list:
    data = claim.get("data", [])
    return [data] if isinstance(data, str) else list(data)


def figure(root: Path, claim: dict) -> str:
    """The claim's figure recomputed from its data files (or as it stands, where it has no values)."""
    listed = files_of(claim)
    for name in listed:
        if not (root / name).is_file():
            raise ClaimError(f"data file {name} is missing")
    known = {}
    for name, spec in claim.get("values", {}).items():
        if "file" in spec and spec["file"] not in listed:
            raise ClaimError(f"value {name!r} reads {spec['file']}, which the claim's data does not list")
        try:
            known[name] = value(root, spec, known)
        except (OSError, KeyError, ValueError, IndexError, ZeroDivisionError, pd.errors.ParserError) as e:
            raise ClaimError(f"value {name!r}: {type(e).__name__}: {e}") from e
    if "format" not in claim:
        return claim.get("figure", "")
    return claim["format"].format(**known)


# --- markdown ----------------------------------------------------------------------------------------------


def cell(field: str, claim: dict, devices: dict) -> str:
    v = claim.get(field, "")
    if field == "device":
        v = devices.get(v, v)
    if field == "command":
        commands = [v] if isinstance(v, str) else v  # "(...)": a pointer to prose, not a command
        v = "<br>".join(c if c.startswith("(") else f"`{c}`" for c in commands if c) or "—"
    elif field == "data":
        v = "<br>".join(f"[{name}]({name})" for name in files_of(claim)) or "—"
    elif field == "code":
        v = f"`{v}`" if v else "—"
    return str(v).replace("|", "\\|") if v != "" else "—"


def render(name: str, table: dict, claims: list, devices: dict) -> str:
    columns = table.get("columns", STANDARD)
    heads = [h for h, _ in columns]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for c in claims:
        if c["table"] == name:
            lines.append("| " + " | ".join(cell(f, c, devices) for _, f in columns) + " |")
    return "\n".join(lines)


def block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- table:{re.escape(name)} -->\n)(.*?)(<!-- /table:{re.escape(name)} -->)", re.S)


def run(root: Path, check: bool) -> int:
    _cache.clear()
    index = json.loads((root / INDEX).read_text())
    tables, claims, devices = index["tables"], index["claims"], index.get("devices", {})
    problems = []
    seen = set()
    for c in claims:
        if c["id"] in seen:
            problems.append(f"claim {c['id']}: id used twice")
        seen.add(c["id"])
        if c["table"] not in tables:
            problems.append(f"claim {c['id']}: unknown table {c['table']!r}")
            continue
        try:
            got = figure(root, c)
        except (ClaimError, KeyError) as e:
            problems.append(f"claim {c['id']}: {e}")
            continue
        if got != c.get("figure", ""):
            problems.append(f"claim {c['id']}: the data give {got!r}, {INDEX} says {c.get('figure', '')!r}")
    docs = {}
    for name, table in tables.items():
        doc = table["doc"]
        text = docs.setdefault(doc, (root / doc).read_text())
        found = block(name).search(text)
        if not found:
            problems.append(f"{doc}: no <!-- table:{name} --> ... <!-- /table:{name} --> markers")
            continue
        want = render(name, table, claims, devices) + "\n"
        if found.group(2) != want:
            if check:
                problems.append(f"{doc}: table {name} is out of date (python bench/results_tables.py rewrites it)")
            docs[doc] = text[:found.start(2)] + want + text[found.end(2):]
    for doc, text in docs.items():
        for extra in set(re.findall(r"<!-- table:([\w.-]+) -->", text)) - set(tables):
            problems.append(f"{doc}: table {extra} has markers but no entry in {INDEX}")
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    if not check:
        for doc, text in docs.items():
            if (root / doc).read_text() != text:
                (root / doc).write_text(text)
                print(f"rewrote the tables of {doc}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1, naming what differs, if a table is out of date or a data "
                        "file is missing")
    p.add_argument("--root", default=str(HERE.parent),
                   help="the repository root holding BENCHMARKS.md, RESULTS.md and the data (default: this "
                        "checkout)")
    args = p.parse_args(argv)
    return run(Path(args.root), args.check)


if __name__ == "__main__":
    sys.exit(main())
