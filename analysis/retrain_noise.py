"""Run-to-run noise of training itself: the same run (same config, data and seed: the same run folder name) trained
twice on the GPU, each copy evaluated on the same suites. Differences come from non-deterministic GPU kernels alone.

    python -m analysis.retrain_noise --kept results_dir_a --other results_dir_b [results_dir_c ...] \
        --output results/small_seeds/retrain_noise

Every run folder (``*/runs/*/*/`` with a training summary) found in two or more of the folders is compared, copy
against copy, on each metric of the tables (``mtlora.experiments.results.METRICS``) that both copies evaluated: a run
trained three times gives three pairs. Writes ``<output>.json`` (per run, pair and metric: both values and their
difference in points) and ``<output>.md``.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from analysis.common import write_report
from mtlora.errors import InvalidInput
from mtlora.evaluation.reporting import markdown_table
from mtlora.experiments.results import METRICS


def trained_runs(results_dir: Path) -> dict[str, Path]:
    """{scale/runs/track/run name: folder} of the runs that were trained (they have a train_summary.json)."""
    return {str(path.parent.relative_to(results_dir)): path.parent
            for path in sorted(results_dir.glob("*/runs/*/*/train_summary.json"))}


def compare(folders: list[Path]) -> list[dict]:
    """One entry per pair of copies of a run (every two folders in which it was trained) and metric evaluated in both:
    values in %, ``a`` / ``b`` naming the folders (``a`` the earlier on the command line), and b - a."""
    runs = [trained_runs(folder) for folder in folders]
    rows = []
    for i, j in itertools.combinations(range(len(folders)), 2):
        for name in sorted(runs[i].keys() & runs[j].keys()):
            for metric in METRICS:
                a, b = metric.average(runs[i][name]), metric.average(runs[j][name])
                if a is not None and b is not None:
                    rows.append({"run": name, "a": folders[i].name, "b": folders[j].name, "metric": metric.name,
                                 "value_a": 100 * a, "value_b": 100 * b, "difference": 100 * (b - a)})
    return rows


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per metric: how many pairs of copies, the mean absolute and the largest absolute difference (points)."""
    by_metric: dict[str, list[float]] = {}
    for row in rows:
        by_metric.setdefault(row["metric"], []).append(abs(row["difference"]))
    return {metric: {"pairs": len(values), "mean_abs": sum(values) / len(values), "max_abs": max(values)}
            for metric, values in by_metric.items()}


def markdown(rows: list[dict], summary: dict[str, dict]) -> str:
    per_run = markdown_table(["run", "copy a", "copy b", "metric", "a %", "b %", "b - a (points)"],
                             [[r["run"].split("/")[-1], r["a"], r["b"], r["metric"], f"{r['value_a']:.2f}",
                               f"{r['value_b']:.2f}", f"{r['difference']:+.2f}"] for r in rows])
    overall = markdown_table(["metric", "pairs", "mean |difference|", "largest |difference|"],
                             [[m, s["pairs"], f"{s['mean_abs']:.2f}", f"{s['max_abs']:.2f}"] for m, s in summary.items()])
    return f"{overall}\n\n{per_run}\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kept", type=Path, required=True, help="results folder of the copies the tables use")
    parser.add_argument("--other", type=Path, nargs="+", required=True,
                        help="results folders of the other trainings (one per further copy)")
    parser.add_argument("--output", type=Path, required=True, help="output path without suffix (.json and .md)")
    args = parser.parse_args(argv)
    for flag, folder in (("--kept", args.kept), *(("--other", other) for other in args.other)):
        if not trained_runs(folder):
            raise InvalidInput(f"{flag} {folder}: no trained run (*/runs/*/*/train_summary.json) found")
    rows = compare([args.kept, *args.other])
    if not rows:
        raise InvalidInput(f"--kept {args.kept} and --other {' '.join(map(str, args.other))} share no trained run "
                           "evaluated on a common suite")
    summary = summarise(rows)
    write_report(args.output, {"summary": summary, "runs": rows}, markdown(rows, summary))
    return summary


if __name__ == "__main__":
    main()
