"""How often a run answers a BBH question with nothing (its first generated token ends the answer), against its BBH
accuracy: a format failure that moves the paper-protocol score without any reasoning behind it.

    python -m analysis.empty_answers --results_dir <unpacked runs.tar.gz> --output results/small_seeds/bbh_empty_answers

Every run folder ``<results_dir>/*/runs/<track>/<row>-s<seed>-<hash>/`` with per-task BBH files (``eval/bbh/tasks/``)
counts (the base model's, without a seed, too); an answer is empty when its generation is blank after stripping whitespace. Packed results
(``scripts/pack_results.py``) keep generations up to 32 characters, so an empty one survives packing and a dropped one
was long (not empty). Writes ``<output>.json`` (per run; per track and row: mean +- std over seeds; the correlation of
empty share and BBH over all runs) and ``<output>.md``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from mtlora.errors import InvalidInput
from mtlora.evaluation.reporting import markdown_table, read_json
from mtlora.experiments.results import METRICS
from mtlora.experiments.statistics import format_mean_std, mean_std

BBH = next(m for m in METRICS if m.name == "bbh")
RUN_NAME = re.compile(r"(?P<row>.+?)(-s(?P<seed>\d+))?-[0-9a-f]+")  # the base model's runs have no seed


def empty_share(run_dir: Path) -> float | None:
    """Share of BBH items (all tasks together) whose answer is blank; None without per-task files."""
    answers = [item.get("generation") for path in sorted((run_dir / "eval" / "bbh" / "tasks").glob("*.json"))
               for item in read_json(path)["predictions"]]
    return None if not answers else sum(a is not None and not a.strip() for a in answers) / len(answers)


def natural_order(path: Path) -> list:
    """Sort key that puts tasks5 before tasks15."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def run_entries(results_dir: Path) -> list[dict]:
    """One entry per run with BBH per-task files: track, row, seed, empty share and BBH accuracy (both in %)."""
    entries = []
    for run_dir in sorted(results_dir.glob("*/runs/*/*"), key=natural_order):
        match, share = RUN_NAME.fullmatch(run_dir.name), empty_share(run_dir)
        if match is None or share is None:
            continue
        accuracy = BBH.average(run_dir)
        entries.append({"track": run_dir.parent.name, "row": match["row"],
                        "seed": None if match["seed"] is None else int(match["seed"]),
                        "empty": 100 * share, "bbh": None if accuracy is None else 100 * accuracy})
    return entries


def summarise(entries: list[dict]) -> list[dict]:
    """Per (track, row), in order of first appearance: seeds, mean +- std of the empty share and of BBH."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for entry in entries:
        groups.setdefault((entry["track"], entry["row"]), []).append(entry)
    rows = []
    for (track, row), group in groups.items():
        accuracies = [e["bbh"] for e in group if e["bbh"] is not None]
        rows.append({"track": track, "row": row, "seeds": [e["seed"] for e in group],
                     "empty": mean_std([e["empty"] for e in group]),
                     "bbh": mean_std(accuracies) if accuracies else (None, None)})
    return rows


def correlation(entries: list[dict]) -> float | None:
    """Pearson correlation of empty share and BBH over the runs (None with fewer than 3 runs or no spread)."""
    pairs = np.array([(e["empty"], e["bbh"]) for e in entries if e["bbh"] is not None])
    if len(pairs) < 3 or pairs.std(axis=0).min() == 0:
        return None
    return float(np.corrcoef(pairs.T)[0, 1])


def markdown(summary: list[dict], r: float | None) -> str:
    table = markdown_table(["track", "row", "runs", "empty answers %", "BBH (paper protocol) %"],
                           [[s["track"], s["row"], len(s["seeds"]), format_mean_std(*s["empty"], scale=1),
                             format_mean_std(*s["bbh"], scale=1)] for s in summary])
    return f"{table}\n\nCorrelation of empty share and BBH over all runs: {'—' if r is None else f'{r:+.2f}'}.\n"


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
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {"correlation": r, "rows": summary, "runs": entries}
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.output.with_suffix(".md").write_text(markdown(summary, r))
    print(markdown(summary, r))
    return result


if __name__ == "__main__":
    main()
