"""Turn a results CSV (``python -m fastdistill bench``) into one bar chart per (family, shape).

    python benchmarks/plot.py benchmarks/results/h200.csv [--out DIR] [--sha GITSHA]

Bars: median ms per provider, one bar per mode, whiskers from the 20th to the 80th percentile.
When the CSV holds several runs, the newest row of each (family, shape, mode, provider) is
used (or only rows of ``--sha``). Skipped providers are listed under the chart.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from collections import defaultdict


def load(path: str, sha: str | None) -> dict[tuple[str, str], dict[tuple[str, str], dict]]:
    """(family, shape) -> (mode, provider) -> newest row."""
    out: dict[tuple[str, str], dict[tuple[str, str], dict]] = defaultdict(dict)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if sha is not None and row["git_sha"] != sha:
                continue
            key = (row["mode"], row["provider"])
            group = out[(row["family"], row["shape"])]
            if key not in group or row["timestamp"] >= group[key]["timestamp"]:
                group[key] = row
    return out


def _float(s: str) -> float | None:
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def plot_group(plt, family: str, shape: str, rows: dict[tuple[str, str], dict], out_dir: str) -> str:
    modes = sorted({m for m, _ in rows}, key=lambda m: ("fwd", "bwd", "full").index(m) if m in
                   ("fwd", "bwd", "full") else 9)
    providers = list(dict.fromkeys(p for _, p in rows))
    width = 0.8 / max(len(modes), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(providers)), 4.5))
    skipped: dict[str, str] = {}
    for i, mode in enumerate(modes):
        xs, ms, lo, hi = [], [], [], []
        for j, prov in enumerate(providers):
            r = rows.get((mode, prov))
            if r is None:
                continue
            med = _float(r["ms"])
            if med is None:
                why = r["note"].split("skipped: ", 1)[-1]
                skipped.setdefault(prov, why)
                continue
            p20, p80 = _float(r["ms_p20"]), _float(r["ms_p80"])
            xs.append(j + (i - (len(modes) - 1) / 2) * width)
            ms.append(med)
            lo.append(med - p20 if p20 is not None else 0.0)
            hi.append(p80 - med if p80 is not None else 0.0)
        bars = ax.bar(xs, ms, width, yerr=[lo, hi], capsize=3, label=mode)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(providers)))
    ax.set_xticklabels(providers, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("ms (median, p20–p80)")
    any_row = next(iter(rows.values()))
    ax.set_title(f"{family} · {shape} · {any_row['gpu']} · torch {any_row['torch']} · {any_row['git_sha']}",
                 fontsize=9)
    ax.legend(title="mode", fontsize=8)
    for prov in skipped:
        if all(_float(r["ms"]) is None for (m, p), r in rows.items() if p == prov):
            ax.text(providers.index(prov), 0, "skipped", ha="center", va="bottom", fontsize=7, color="gray")
    if skipped:
        text = "skipped — " + " | ".join(f"{p}: {w[:70]}" for p, w in skipped.items())
        fig.text(0.01, 0.01, text, fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.06 if skipped else 0, 1, 1))
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{family}_{shape}") + ".png"
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="results CSV written by `python -m fastdistill bench`")
    ap.add_argument("--out", help="output folder (default: <csv folder>/plots/<csv name>)")
    ap.add_argument("--sha", help="only rows of this git sha (default: newest row per key)")
    args = ap.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("benchmarks/plot.py needs matplotlib: `pip install matplotlib`", file=sys.stderr)
        return 1
    groups = load(args.csv, args.sha)
    if not groups:
        print(f"{args.csv}: no rows" + (f" for sha {args.sha}" if args.sha else ""), file=sys.stderr)
        return 1
    stem = os.path.splitext(os.path.basename(args.csv))[0]
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.csv)), "plots", stem)
    os.makedirs(out_dir, exist_ok=True)
    for (family, shape), rows in sorted(groups.items()):
        print(plot_group(plt, family, shape, rows, out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
