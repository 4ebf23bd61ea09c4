"""How often a run answers a BBH question with nothing (its first generated token ends the answer), against its BBH
accuracy and against the same share on the held-out split (the training format): a format failure that moves the
paper-protocol score without any reasoning behind it.

    python -m analysis.empty_answers --results_dir <unpacked runs.tar.gz> --output results/small_seeds/bbh_empty_answers

Every run folder ``<results_dir>/*/runs/<track>/<row>-s<seed>-<hash>/`` with per-task BBH files (``eval/bbh/tasks/``)
counts (the base model's, without a seed, too), with its held-out answers (``eval/heldout/predictions.json``) where it
has them; an answer is empty when its generation is blank after stripping whitespace. Packed results
(``scripts/pack_results.py``) keep generations up to 32 characters, so an empty one survives packing and a dropped one
was long (not empty). Writes ``<output>.json`` (per run; per track and row: mean +- std over seeds; the correlation of
empty share and BBH over all runs) and ``<output>.md``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from analysis.common import write_report
from mtlora.errors import InvalidInput
from mtlora.evaluation.reporting import markdown_table
from mtlora.experiments.results import METRICS, Metric
from mtlora.experiments.statistics import format_mean_std, mean_std

BBH, HELDOUT = (next(m for m in METRICS if m.name == name) for name in ("bbh", "heldout"))
RUN_NAME = re.compile(r"(?P<row>.+?)(-s(?P<seed>\d+))?-[0-9a-f]+")  # the base model's runs have no seed


def empty_share(run_dir: Path, metric: Metric) -> float | None:
    """Share of the metric's items (all tasks together) whose answer is blank; None without its per-item files."""
    items = metric.items(run_dir)
    if not items:
        return None
    answers = [item.get("generation") for _, item in items]
    return sum(a is not None and not a.strip() for a in answers) / len(answers)


def natural_order(path: Path) -> list:
    """Sort key that puts tasks5 before tasks15."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def run_entries(results_dir: Path) -> list[dict]:
    """One entry per run with BBH per-task files: track, row, seed, the empty share of BBH and of held-out answers
    and BBH accuracy (all in %; None where not evaluated)."""
    entries = []
    for run_dir in sorted(results_dir.glob("*/runs/*/*"), key=natural_order):
        match, share = RUN_NAME.fullmatch(run_dir.name), empty_share(run_dir, BBH)
        if match is None or share is None:
            continue
        entries.append({"track": run_dir.parent.name, "row": match["row"],
                        "seed": None if match["seed"] is None else int(match["seed"]), "empty": 100 * share,
                        "empty_heldout": percent(empty_share(run_dir, HELDOUT)), "bbh": percent(BBH.average(run_dir))})
    return entries


def percent(share: float | None) -> float | None:
    return None if share is None else 100 * share


def summarise(entries: list[dict]) -> list[dict]:
    """Per (track, row), in order of first appearance: seeds, mean +- std of each empty share and of BBH (over the
    runs that have it; (None, None) where none has)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for entry in entries:
        groups.setdefault((entry["track"], entry["row"]), []).append(entry)
    rows = []
    for (track, row), group in groups.items():
        rows.append({"track": track, "row": row, "seeds": [e["seed"] for e in group]})
        for field in ("empty", "empty_heldout", "bbh"):
            values = [e[field] for e in group if e[field] is not None]
            rows[-1][field] = mean_std(values) if values else (None, None)
    return rows


def correlation(entries: list[dict]) -> dict:
    """Pearson correlation of empty share and BBH over the runs with BBH (``r`` None with fewer than 3 runs or no
    spread), and again without the collapsed runs (every BBH answer empty), which alone can make it look strong."""
    result = {}
    for key, kept in (("all", lambda e: True), ("answering", lambda e: e["empty"] < 100)):
        pairs = np.array([(e["empty"], e["bbh"]) for e in entries if e["bbh"] is not None and kept(e)])
        r = None if len(pairs) < 3 or pairs.std(axis=0).min() == 0 else float(np.corrcoef(pairs.T)[0, 1])
        result[key] = {"runs": len(pairs), "r": r}
    return result


def markdown(summary: list[dict], r: dict) -> str:
    table = markdown_table(["track", "row", "runs", "empty BBH answers %", "BBH (paper protocol) %",
                            "empty held-out answers %"],
                           [[s["track"], s["row"], len(s["seeds"]), format_mean_std(*s["empty"], scale=1),
                             format_mean_std(*s["bbh"], scale=1), format_mean_std(*s["empty_heldout"], scale=1)]
                            for s in summary])

    def text(c: dict) -> str:
        value = '—' if c["r"] is None else f'{c["r"]:+.2f}'
        return f"{value} over {c['runs']} runs"

    return (f"{table}\n\nCorrelation of empty share and BBH: {text(r['all'])} (every run with BBH); "
            f"{text(r['answering'])} that answer at least one BBH question.\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results_dir", type=Path, required=True, help="a table runner's results folder")
    parser.add_argument("--output", type=Path, required=True, help="output path without suffix (.json and .md)")
    args = parser.parse_args(argv)
    entries = run_entries(args.results_dir)
    if not entries:
        raise InvalidInput(f"--results_dir {args.results_dir}: no run with BBH per-task files "
                           "(*/runs/<track>/<row>-s<seed>-<hash>/eval/bbh/tasks/*.json)")
    summary, r = summarise(entries), correlation(entries)
    result = {"correlation": r, "rows": summary, "runs": entries}
    write_report(args.output, result, markdown(summary, r))
    return result


if __name__ == "__main__":
    main()
