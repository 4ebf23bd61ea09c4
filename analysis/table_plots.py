"""Accuracy against routing groups (Table 3), against the number of training tasks (task-count scaling), and each
main-results row's (Table 5) held-out accuracy against a benchmark, drawn from the tables' JSON
(``tables/run_table.py``): mean over seeds, the seeds' std as error bars.

    python -m analysis.table_plots --table_json results/small/routing_granularity.json --output_dir figs
    python -m analysis.table_plots --table_json results/small/task_scaling.json --metric bbh --output_dir figs
    python -m analysis.table_plots --table_json results/small_seeds/main_results.json --metric bbh --output_dir figs
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from analysis.common import write_outputs  # noqa: E402
from mtlora.experiments.registry import TABLES  # noqa: E402
from mtlora.experiments.results import METRICS  # noqa: E402

METRIC_LABELS = {m.name: m.label for m in METRICS}


def groups_of(table_name: str, row_key: str) -> int | None:
    """G of a Table 3 row (1 without fine-grained routing); None for a row that has no adapter (the base model)."""
    row = next((r for r in TABLES[table_name].rows if r.key == row_key), None)
    if row is None:
        return None
    return row.flags.get("routing_groups", 1) if row.flags.get("enable_fine_grained_routing") else 1


def task_count_of(track: str) -> int | None:
    """N of a task-count track (``tasks25`` -> 25)."""
    match = re.fullmatch(r"tasks(\d+)", track)
    return int(match.group(1)) if match else None


def percent(value: dict) -> tuple[float, float]:
    """(mean %, std %) of a table cell; std 0 for one seed."""
    return 100 * value["mean"], 100 * (value["std"] if value["std"] is not None else 0.0)


def points(table: dict, metric: str, x_of, series_of) -> dict[str, list[tuple[float, float, float]]]:
    """{series label: [(x, mean %, std %)]} over the rows that have ``metric``, sorted by x."""
    series: dict[str, list] = {}
    for row in table["rows"]:
        value, x = row.get(metric), x_of(row)
        if not isinstance(value, dict) or x is None:
            continue
        series.setdefault(series_of(row), []).append((x, *percent(value)))
    return {label: sorted(values) for label, values in series.items()}


def plot_series(series: dict, xlabel: str, ylabel: str, title: str, log_x: bool) -> plt.Figure:
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, values in series.items():
        xs, means, stds = zip(*values)
        axis.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
    if log_x:
        axis.set_xscale("log", base=2)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def caption(table: dict) -> str:
    """The table's name (its title before the colon: the metric is on the y axis) and what the bars are."""
    return (f"{table['title'].split(':')[0]}\n(seeds {', '.join(map(str, table['seeds']))}; bars: std over seeds; "
            "no bar: one seed)")


def plot_routing_granularity(table: dict, metric: str = "heldout") -> plt.Figure:
    series = points(table, metric, lambda r: groups_of(table["table"], r["key"]), lambda r: r["track"])
    return plot_series(series, "routing groups G", f"{METRIC_LABELS[metric]} (%)",
                       caption(table), log_x=True)


def plot_task_scaling(table: dict, metric: str = "heldout") -> plt.Figure:
    series = points(table, metric, lambda r: task_count_of(r["track"]), lambda r: r["label"])
    return plot_series(series, "training tasks N", f"{METRIC_LABELS[metric]} (%)",
                       caption(table), log_x=False)


def row_points(table: dict, metric: str) -> list[tuple[str, tuple[float, float], tuple[float, float]]]:
    """[(row label, held-out (mean %, std %), ``metric`` (mean %, std %))] over the rows that have both."""
    return [(row["label"], percent(row["heldout"]), percent(row[metric])) for row in table["rows"]
            if isinstance(row.get("heldout"), dict) and isinstance(row.get(metric), dict)]


def plot_main_results(table: dict, metric: str = "bbh") -> plt.Figure:
    """One point per row: held-out accuracy on the trained tasks (x) against ``metric`` (y)."""
    if metric == "heldout":
        raise SystemExit("error: --metric heldout: the main-results plot draws a benchmark against held-out accuracy; "
                         "pass another metric, e.g. --metric bbh")
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    markers = "os^vD<>Pp*hX"
    for index, (label, (x, x_std), (y, y_std)) in enumerate(row_points(table, metric)):
        axis.errorbar(x, y, xerr=x_std, yerr=y_std, marker=markers[index % len(markers)], linestyle="none",
                      color=plt.cm.tab20(index % 20), capsize=3, label=label)
    axis.set_xlabel(f"{METRIC_LABELS['heldout']} (%)")
    axis.set_ylabel(f"{METRIC_LABELS[metric]} (%)")
    axis.set_title(caption(table), fontsize=9)
    axis.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    return figure


PLOTS = {"routing_granularity": plot_routing_granularity, "routing_granularity_block": plot_routing_granularity,
         "task_scaling": plot_task_scaling, "main_results": plot_main_results}


def table_plot(table_json: str | Path, output_dir: str | Path, metric: str = "heldout") -> Path:
    """Draw the plot of a Table 3 / task-scaling / main-results JSON into ``<output_dir>/<table>_<metric>.png``;
    returns it."""
    table = json.loads(Path(table_json).read_text())
    if table.get("table") not in PLOTS:
        raise SystemExit(f"error: --table_json {table_json}: expected one of {', '.join(PLOTS)}, got {table.get('table')}")
    if metric not in METRIC_LABELS:
        raise SystemExit(f"error: --metric {metric}: expected one of {', '.join(METRIC_LABELS)}")
    name = f"{table['table']}_{metric}"
    png, _ = write_outputs(output_dir, name, PLOTS[table["table"]](table, metric),
                           {"table_json": str(table_json), "metric": metric})
    return png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table_json", required=True)
    parser.add_argument("--metric", default="heldout", help=f"one of {', '.join(METRIC_LABELS)}")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    print(table_plot(args.table_json, args.output_dir, args.metric))


if __name__ == "__main__":
    main()
